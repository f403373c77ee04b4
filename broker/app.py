"""Wiring: settings in, a running aiohttp application out.

Dependencies are built in one ``cleanup_ctx`` so they open in order at start-up and close in reverse at
shutdown, and handlers reach them through typed ``AppKey``s. Nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from broker import api
from broker.approvals import ApprovalManager
from broker.audit.checkpoints import Checkpointer, StoreVerifier
from broker.config import Settings
from broker.console import add_console_routes
from broker.delegation import Catalog
from broker.errors import ConfigError, VaultError
from broker.audit.export import EXPORTER, Exporter, FileSink, Sink, WebhookSink
from broker.faults import CrashHook, no_crash
from broker.identity import (
    AgentVerifier,
    IssuerTrust,
    JwksKeySet,
    JwksUrlKeySource,
    KeySource,
    StaticKeySource,
    UserVerifier,
)
from broker.identity.cache import VerifiedTokenCache
from broker.leases import LeaseManager
from broker.limits import RateLimiter
from broker.metrics import Metrics
from broker.readiness import Readiness
from broker.revocations import IntentSettler, Maintenance, Revocations, Revoker
from broker.sealing import TokenSealer
from broker.audit.signing import load_signing_key
from broker.store import LeaseLimits, Store, open_store
from broker.audit.tailer import VaultAuditTailer
from broker.tasks import TaskManager
from broker.vault import Sensitive, VaultClient

log = logging.getLogger(__name__)

_TOKEN_RENEW_EVERY = 3600.0
EXPORT_INTERVAL = 1.0  # seconds between audit export rounds


def read_vault_token(settings: Settings) -> Sensitive:
    """Raises: ConfigError: the token file is missing or empty."""
    path = settings.vault.token_file
    try:
        token = path.read_text().strip()
    except OSError as exc:
        msg = f"cannot read the broker's Vault token from {path}: {exc.strerror}"
        raise ConfigError(msg) from exc
    if not token:
        msg = f"the Vault token file {path} is empty"
        raise ConfigError(msg)
    return Sensitive(token)


def _key_source(jwks_file: object, jwks_url: str | None, session: aiohttp.ClientSession) -> KeySource:
    if jwks_url is not None:
        insecure = jwks_url.startswith(("http://127.", "http://localhost", "http://[::1]"))
        return JwksUrlKeySource(jwks_url, session=session, allow_insecure_http=insecure)
    return StaticKeySource(JwksKeySet.from_file(str(jwks_file)))


def make_app(settings: Settings, *, clock: Callable[[], float] = time.time,
             crash: CrashHook = no_crash) -> web.Application:
    """The broker's application. Dependencies open when it starts (``cleanup_ctx``).

    ``crash`` is the crash-point hook of the crash-consistency tests; it does nothing by default.
    """
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[api.error_middleware])
    app[api.METRICS] = Metrics()
    app.cleanup_ctx.append(_dependencies(settings, clock, crash))
    api.add_routes(app)
    lim = settings.limits
    add_console_routes(app, sessions_per_person=lim.console_sessions_per_person,
                       sign_in_rate=RateLimiter(rate=lim.sign_in_rate_per_person, burst=lim.sign_in_burst_per_person,
                                                clock=time.monotonic))
    return app


def _dependencies(settings: Settings, clock: Callable[[], float], crash: CrashHook
                  ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        catalog = Catalog.from_settings(settings)
        sealer = TokenSealer.from_file(settings.store.key_file)
        audit = settings.audit
        signing_key = load_signing_key(audit.signing_key_file) if audit.signing_key_file is not None else None
        token = read_vault_token(settings)
        timeout = aiohttp.ClientTimeout(total=settings.vault.timeout)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=128)) as session:
            vault = VaultClient(session, settings.vault.addr, token=token, timeout=settings.vault.timeout,
                                namespace=settings.vault.namespace)
            store = await open_store(settings.store.url)
            try:
                leeway = float(settings.server.token_leeway)
                agents = AgentVerifier(
                    {t.trust_domain: _key_source(t.jwks_file, t.jwks_url, session) for t in settings.agents.trust},
                    audience=settings.server.audience, leeway=leeway,
                    max_lifetime=float(settings.agents.max_token_lifetime), clock=clock,
                    user_issuers=[i.issuer for i in settings.users.issuers],
                )
                app[api.AGENTS] = VerifiedTokenCache(agents.verify, clock=clock)
                app[api.USERS] = UserVerifier(
                    [IssuerTrust(i.issuer, _key_source(i.jwks_file, i.jwks_url, session), i.groups_claim, i.trust_email)
                     for i in settings.users.issuers],
                    audience=settings.server.audience, leeway=leeway, clock=clock,
                )
                app[api.CATALOG] = catalog
                app[api.STORE] = store
                app[api.VAULT] = vault
                # Readiness probes Vault no longer than an agent's health check would wait.
                app[api.READINESS] = Readiness(store=store, vault=vault, clock=clock,
                                               timeout=min(2.0, settings.vault.timeout))
                revoker = Revoker(store=store, vault=vault, clock=clock,
                                  confirm_timeout=settings.vault.revoke_confirm_timeout,
                                  max_backoff=settings.maintenance.max_backoff)
                lim = settings.limits
                settler = IntentSettler(store=store, vault=vault, clock=clock,
                                        bootstrap_ttl=settings.vault.task_token_bootstrap_ttl,
                                        vault_timeout=settings.vault.timeout,
                                        attempt_timeout=settings.vault.revoke_confirm_timeout,
                                        max_backoff=settings.maintenance.max_backoff)
                app[api.TASKS] = TaskManager(catalog=catalog, store=store, vault=vault, sealer=sealer, revoker=revoker,
                                             settler=settler, clock=clock,
                                             bootstrap_ttl=settings.vault.task_token_bootstrap_ttl, crash=crash,
                                             start_rate=RateLimiter(rate=lim.task_start_rate_per_user,
                                                                    burst=lim.task_start_burst_per_user,
                                                                    clock=time.monotonic))
                # Audit export sinks (broker.audit.export), only when one is configured; their backlog gates issuance.
                exporter = _exporter(settings, store, session, clock, app[api.METRICS])
                backlog_ok = exporter.check if exporter is not None else None
                if exporter is not None:
                    app[EXPORTER] = exporter
                approvals = ApprovalManager(catalog=catalog, store=store, clock=clock,
                                            max_auth_age=settings.people.approval_max_auth_age,
                                            ttl=settings.people.approval_ttl, backlog_ok=backlog_ok,
                                            decide_rate=RateLimiter(rate=lim.decide_rate_per_approver,
                                                                    burst=lim.decide_burst_per_approver,
                                                                    clock=time.monotonic),
                                            max_waits=lim.long_polls_per_identity)
                app[api.APPROVALS] = approvals
                app[api.CLOCK] = clock
                app[api.LEASES] = LeaseManager(
                    catalog=catalog, store=store, vault=vault, sealer=sealer, clock=clock, crash=crash, settler=settler,
                    bootstrap_ttl=settings.vault.task_token_bootstrap_ttl, approvals=approvals,
                    limits=LeaseLimits(per_agent=lim.max_live_leases_per_agent, per_user=lim.max_live_leases_per_user),
                    agent_rate=RateLimiter(rate=lim.issue_rate_per_agent, burst=lim.issue_burst_per_agent,
                                           clock=time.monotonic),
                    user_rate=RateLimiter(rate=lim.issue_rate_per_user, burst=lim.issue_burst_per_user,
                                          clock=time.monotonic),
                    renew_rate=RateLimiter(rate=lim.renew_rate_per_agent, burst=lim.renew_burst_per_agent,
                                           clock=time.monotonic),
                    backlog_ok=backlog_ok,
                )
                app[api.REVOCATIONS] = Revocations(store=store, revoker=revoker, clock=clock)
                m = settings.maintenance
                # Signed checkpoints of the audit chain, only with a signing key (broker.audit.checkpoints).
                checkpointer = None if signing_key is None else Checkpointer(
                    store=store, key=signing_key, origin=audit.origin, every=audit.checkpoint_every,
                    interval=audit.checkpoint_interval, witness_file=audit.witness_file, clock=clock)
                app[api.AUDIT_VERIFIER] = StoreVerifier(store, signing_key.public_key() if signing_key else None,
                                                        audit.origin, audit.witness_file)
                maintenance = Maintenance(store=store, vault=vault, revoker=revoker, settler=settler, clock=clock,
                                          interval=m.interval,
                                          intent_grace=m.intent_grace,
                                          bootstrap_ttl=settings.vault.task_token_bootstrap_ttl,
                                          sole_writer=settings.store.url.startswith("sqlite"),
                                          checkpointer=checkpointer)
                background = [asyncio.create_task(_renew_own_token(vault), name="vault-token-renewer"),
                              asyncio.create_task(maintenance.run_forever(), name="maintenance")]
                if settings.vault.audit_log is not None:
                    # Vault's own record merged into the chain (one tailer per file: see broker.audit.tailer).
                    device = settings.audit.vault_device
                    tailer = VaultAuditTailer(
                        store=store, path=settings.vault.audit_log, metrics=app[api.METRICS], clock=clock,
                        broker_paths=[g.path for r in catalog.roles.values() for g in r.grants.values()],
                        hasher=lambda value: vault.audit_hash(device, value))
                    app[api.VAULT_TAILER] = tailer
                    background.append(asyncio.create_task(tailer.run_forever(), name="vault-audit-tailer"))
                if exporter is not None:
                    background.append(asyncio.create_task(exporter.run_forever(), name="audit-exporter"))
                try:
                    yield
                finally:
                    for t in background:
                        t.cancel()
                    for t in background:
                        with contextlib.suppress(asyncio.CancelledError):
                            await t
            finally:
                await store.close()

    return ctx


def _exporter(settings: Settings, store: Store, session: aiohttp.ClientSession, clock: Callable[[], float],
              metrics: Metrics) -> Exporter | None:
    """The audit exporter for ``[audit].export_file`` / ``export_url``; None when neither is set."""
    audit = settings.audit
    sinks: list[Sink] = []
    if audit.export_file is not None:
        sinks.append(FileSink(audit.export_file, audit.export_format, origin=audit.origin))
    if audit.export_url is not None:
        sinks.append(WebhookSink(audit.export_url, audit.export_format, session, origin=audit.origin))
    if not sinks:
        return None
    return Exporter(store=store, sinks=sinks, backlog_limit=audit.export_backlog_limit, clock=clock,
                    interval=EXPORT_INTERVAL,
                    on_backlog=lambda n: metrics.set("broker_audit_export_backlog", n))


async def _renew_own_token(vault: VaultClient) -> None:
    """Keep the broker's periodic Vault token alive. A failure is logged and retried, never fatal."""
    while True:
        try:
            await vault.renew_self()
        except VaultError as exc:
            log.warning("could not renew the broker's Vault token: %s", exc.code)
        await asyncio.sleep(_TOKEN_RENEW_EVERY)
