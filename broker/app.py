"""Wiring: settings in, a running aiohttp application out.

Each resource has its own ``cleanup_ctx`` (the HTTP session, the store, the Vault client, identity, the
domain, and each background task), so they open in order at start-up and close in reverse at shutdown,
and handlers reach them through typed ``AppKey``s. Nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from broker import __version__, api, background, journal
from broker.approvals import ApprovalManager
from broker.audit.checkpoints import Checkpointer, StoreVerifier
from broker.audit.export import EXPORTER, Exporter, FileSink, Sink, WebhookSink
from broker.audit.signing import load_signing_key
from broker.audit.tailer import VaultAuditTailer
from broker.audit.tailers import VaultAuditTailers
from broker.config import Settings
from broker.console import LOGIN_KEY_LABEL, SESSIONS, add_console_routes
from broker.delegation import Catalog
from broker.errors import BrokerError, ConfigError, VaultError
from broker.faults import CrashHook, no_crash
from broker.identity import (
    AgentVerifier,
    ClusterTrust,
    DelegationIssuerTrust,
    DelegationVerifier,
    IssuerTrust,
    JwksKeySet,
    JwksUrlKeySource,
    KeySource,
    StaticKeySource,
    UserVerifier,
)
from broker.identity.cache import VerifiedTokenCache
from broker.instrument import instrument_middleware
from broker.journal import JournalMode
from broker.keyfiles import read_private_file
from broker.leases import LeaseManager
from broker.limits import RateLimiter
from broker.metrics import Metrics
from broker.readiness import Readiness
from broker.revocations import IntentSettler, Maintenance, Revocations, Revoker
from broker.sealing import TokenSealer
from broker.signals.keys import load_public_key_file
from broker.signals.keys import load_signing_key as load_ssf_key
from broker.signals.transmitter import Receiver, Transmitter
from broker.signals.web import TRANSMITTER_INFO, TransmitterInfo
from broker.singletons import Singleton, replica_id
from broker.store import LeaseLimits, Store, open_store
from broker.store.wakeups import ApprovalListener
from broker.tasks import TaskManager
from broker.vault import Sensitive, VaultClient
from broker.vault.tls import vault_tls_context

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


SETTINGS = web.AppKey("settings", Settings)
CRASH: web.AppKey[CrashHook] = web.AppKey("crash_hook")
HTTP = web.AppKey("http_session", aiohttp.ClientSession)
REVOKER = web.AppKey("revoker", Revoker)
SETTLER = web.AppKey("intent_settler", IntentSettler)
MAINTENANCE = web.AppKey("maintenance", Maintenance)
JOURNAL = web.AppKey("issuance_journal", JournalMode)
TRANSMITTER = web.AppKey("signal_transmitter", Transmitter)


def make_app(settings: Settings, *, clock: Callable[[], float] = time.time,
             crash: CrashHook = no_crash, process_metrics: bool = True) -> web.Application:
    """The broker's application. Its resources open when it starts, one ``cleanup_ctx`` each, in order.

    ``crash`` is the crash-point hook of the crash-consistency tests; it does nothing by default.
    ``process_metrics=False`` leaves the ``process_*`` series out of ``/metrics``.
    """
    # The instrument middleware is outermost: it counts and times the problem answers the error middleware makes.
    app = web.Application(client_max_size=settings.server.max_body_bytes,
                          middlewares=[instrument_middleware, api.error_middleware])
    app[SETTINGS] = settings
    app[CRASH] = crash
    app[api.CLOCK] = clock
    app[api.METRICS] = Metrics(version=__version__, clock=clock, process=process_metrics)
    app[api.REPLICA] = replica_id()
    app[api.SINGLETONS] = []
    app[api.REQUESTS] = _rate(settings.limits.request_rate_per_identity, settings.limits.request_burst_per_identity)
    app.cleanup_ctx.extend([
        _http_session, _store, _signals, _vault, _identity, _domain,
        _background("vault-token-renewer", lambda a: _renew_own_token(a[api.VAULT])),
        _background("approval-wakeups", _approval_wakeups),
        # Work one replica does at a time, each under its lease in the store (broker.singletons).
        _singleton("maintenance", lambda a: a[MAINTENANCE].run_forever),
        _singleton("vault-audit-tailer", lambda a: a[api.VAULT_TAILERS].run_forever if api.VAULT_TAILERS in a
                   else None),
        _singleton("audit-exporter", lambda a: a[EXPORTER].run_forever if EXPORTER in a else None),
        # Every replica gates its issuance on the export backlog, whichever replica exports.
        _background("audit-export-backlog", lambda a: a[EXPORTER].watch_forever() if EXPORTER in a else None),
        _background("issuance-journal-probe", lambda a: _probe_journal(a[api.VAULT], a[api.STORE], a[JOURNAL])
                    if JOURNAL in a else None),
        _background("signal-transmitter", lambda a: a[TRANSMITTER].run_forever() if TRANSMITTER in a else None),
    ])
    api.add_routes(app)
    lim = settings.limits
    add_console_routes(app, sessions_per_person=lim.console_sessions_per_person,
                       sign_in_rate=_rate(lim.sign_in_rate_per_person, lim.sign_in_burst_per_person))
    return app


def _rate(rate: float, burst: int) -> RateLimiter:
    return RateLimiter(rate=rate, burst=burst, clock=time.monotonic)


# -- one context per resource (aiohttp's background_tasks example) --------------------------------------


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    """The one HTTP client session: Vault, JWKS URLs and the export webhook."""
    timeout = aiohttp.ClientTimeout(total=app[SETTINGS].vault.timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=128)) as session:
        app[HTTP] = session
        yield


async def _store(app: web.Application) -> AsyncIterator[None]:
    """The store, migrated to head; closed last but the session."""
    store = await open_store(app[SETTINGS].store.url)
    store.observe_with(app[api.METRICS].observe_transaction)
    app[api.STORE] = store
    try:
        yield
    finally:
        await store.close()


async def _signals(app: web.Application) -> AsyncIterator[None]:
    """The SSF transmitter (broker.signals), when ``[signals]`` names an issuer and a key: its metadata, and
    its receivers set on the store, so that every task end from now on commits their deliveries with it."""
    settings, store = app[SETTINGS], app[api.STORE]
    sig = settings.signals
    if sig.issuer is None or sig.signing_key_file is None:
        yield
        return
    key = load_ssf_key(sig.signing_key_file)
    app[TRANSMITTER_INFO] = TransmitterInfo(sig.issuer, key, tuple(load_public_key_file(p)
                                                                   for p in sig.retired_key_files))
    receivers = {r.name: Receiver(r.name, r.url, r.aud, r.timeout, _authorization(r.authorization_file))
                 for r in sig.receivers}
    transmitter = app[TRANSMITTER] = Transmitter(
        store=store, session=app[HTTP], issuer=sig.issuer, key=key, receivers=receivers, clock=app[api.CLOCK],
        max_attempts=sig.max_attempts, max_age=sig.max_age, max_backoff=sig.max_backoff,
        poll_interval=sig.poll_interval, metrics=app[api.METRICS])
    store.signal_receivers = tuple(r.name for r in sig.receivers if "session-revoked" in r.events)
    store.signal_wake = transmitter.wake
    try:
        yield
    finally:
        store.signal_receivers = ()
        store.signal_wake = None


def _authorization(path: Path | None) -> Sensitive | None:
    """The Authorization header value a receiver asked for, read once from its file (mode 0600).

    Raises:
        ConfigError: unreadable, readable by others, empty, or more than one line (a header must not be split).
    """
    if path is None:
        return None
    value = read_private_file(path, what="SSF receiver authorization file").decode("utf-8", "replace").strip()
    if not value or any(c in value for c in "\r\n\x00"):
        msg = f"the SSF receiver authorization file {path} must hold one non-empty line"
        raise ConfigError(msg)
    return Sensitive(value)


async def _vault(app: web.Application) -> AsyncIterator[None]:
    """The broker's Vault client (its own token, read once) and the readiness probe over it and the store."""
    settings = app[SETTINGS]
    vault = VaultClient(app[HTTP], settings.vault.addrs, token=read_vault_token(settings),
                        timeout=settings.vault.timeout, namespace=settings.vault.namespace,
                        failover_timeout=settings.vault.failover_timeout, observe=app[api.METRICS].observe_vault,
                        ssl_context=vault_tls_context(settings.vault.ca_cert))
    app[api.VAULT] = vault
    # Readiness probes Vault no longer than an agent's health check would wait.
    app[api.READINESS] = Readiness(store=app[api.STORE], vault=vault, clock=app[api.CLOCK],
                                   timeout=min(2.0, settings.vault.timeout))
    yield
    vault.close()


async def _identity(app: web.Application) -> AsyncIterator[None]:
    """Who is calling: the agents' trust domains and the people's issuers, with their key sources."""
    settings, session, clock = app[SETTINGS], app[HTTP], app[api.CLOCK]
    leeway = float(settings.server.token_leeway)
    agents = AgentVerifier(
        {t.trust_domain: _key_source(t.jwks_file, t.jwks_url, session) for t in settings.agents.trust},
        audience=settings.server.audience, leeway=leeway, max_lifetime=float(settings.agents.max_token_lifetime),
        clock=clock, user_issuers=[i.issuer for i in settings.users.issuers],
        clusters=[ClusterTrust(c.trust_domain, c.issuer, _key_source(c.jwks_file, c.jwks_url, session),
                               float(c.max_token_lifetime)) for c in settings.agents.kubernetes])
    app[api.AGENTS] = VerifiedTokenCache(agents.verify, clock=clock)
    # Never cached: each delegation token is accepted once, and its jti is what the store remembers.
    app[api.DELEGATIONS] = DelegationVerifier(
        [DelegationIssuerTrust(i.issuer, _key_source(i.jwks_file, i.jwks_url, session), i.groups_claim,
                               float(i.max_token_lifetime)) for i in settings.users.delegation_issuers],
        audience=settings.server.audience, leeway=leeway, clock=clock)
    app[api.USERS] = UserVerifier(
        [IssuerTrust(i.issuer, _key_source(i.jwks_file, i.jwks_url, session), i.groups_claim, i.trust_email,
                     i.email_domains) for i in settings.users.issuers],
        audience=settings.server.audience, leeway=leeway, clock=clock)
    yield


async def _domain(app: web.Application) -> AsyncIterator[None]:
    """The catalog and the orchestrators: tasks, leases, approvals, revocations, maintenance, the audit side."""
    settings, store, vault, clock = app[SETTINGS], app[api.STORE], app[api.VAULT], app[api.CLOCK]
    catalog = Catalog.from_settings(settings)
    sealer = TokenSealer.from_file(settings.store.key_file)
    app[SESSIONS].bind(store, sealer.derive(LOGIN_KEY_LABEL))  # the console's, alike on every replica
    app[api.CATALOG] = catalog
    app[api.METRICS].know_grants(g for r in catalog.roles.values() for g in r.grants)
    v, m, lim, audit = settings.vault, settings.maintenance, settings.limits, settings.audit
    revoker = app[REVOKER] = Revoker(store=store, vault=vault, clock=clock, confirm_timeout=v.revoke_confirm_timeout,
                                     max_backoff=m.max_backoff)
    # Vault's audit device as the issuance journal (broker.journal), once the probe finds that it records it.
    journal_mode = JournalMode() if v.audit_log is not None and v.journal else None
    if journal_mode is not None:
        app[JOURNAL] = journal_mode
    settler = app[SETTLER] = IntentSettler(store=store, vault=vault, clock=clock,
                                           bootstrap_ttl=v.task_token_bootstrap_ttl, vault_timeout=v.timeout,
                                           attempt_timeout=v.revoke_confirm_timeout, max_backoff=m.max_backoff,
                                           journal=journal_mode)
    app[api.TASKS] = TaskManager(catalog=catalog, store=store, vault=vault, sealer=sealer, revoker=revoker,
                                 settler=settler, clock=clock, bootstrap_ttl=v.task_token_bootstrap_ttl,
                                 crash=app[CRASH],
                                 start_rate=_rate(lim.task_start_rate_per_user, lim.task_start_burst_per_user))
    # Audit export sinks (broker.audit.export), only when one is configured; their backlog gates issuance.
    exporter = _exporter(settings, store, app[HTTP], clock, app[api.METRICS])
    backlog_ok = exporter.check if exporter is not None else None
    if exporter is not None:
        app[EXPORTER] = exporter
    approvals = app[api.APPROVALS] = ApprovalManager(
        catalog=catalog, store=store, clock=clock, max_auth_age=settings.people.approval_max_auth_age,
        ttl=settings.people.approval_ttl, backlog_ok=backlog_ok,
        decide_rate=_rate(lim.decide_rate_per_approver, lim.decide_burst_per_approver),
        max_waits=lim.long_polls_per_identity)
    app[api.LEASES] = LeaseManager(
        catalog=catalog, store=store, vault=vault, sealer=sealer, clock=clock, crash=app[CRASH], settler=settler,
        bootstrap_ttl=v.task_token_bootstrap_ttl, approvals=approvals,
        limits=LeaseLimits(per_agent=lim.max_live_leases_per_agent, per_user=lim.max_live_leases_per_user),
        agent_rate=_rate(lim.issue_rate_per_agent, lim.issue_burst_per_agent),
        user_rate=_rate(lim.issue_rate_per_user, lim.issue_burst_per_user),
        renew_rate=_rate(lim.renew_rate_per_agent, lim.renew_burst_per_agent), backlog_ok=backlog_ok,
        journal=journal_mode)
    app[api.REVOCATIONS] = Revocations(store=store, revoker=revoker, clock=clock)
    # Signed checkpoints of the audit chain, only with a signing key (broker.audit.checkpoints).
    signing_key = load_signing_key(audit.signing_key_file) if audit.signing_key_file is not None else None
    checkpointer = None if signing_key is None else Checkpointer(
        store=store, key=signing_key, origin=audit.origin, every=audit.checkpoint_every,
        interval=audit.checkpoint_interval, witness_file=audit.witness_file, clock=clock)
    app[api.AUDIT_VERIFIER] = StoreVerifier(store, signing_key.public_key() if signing_key else None, audit.origin,
                                            audit.witness_file)
    app[MAINTENANCE] = Maintenance(store=store, vault=vault, revoker=revoker, settler=settler, clock=clock,
                                   interval=m.interval, intent_grace=m.intent_grace,
                                   bootstrap_ttl=v.task_token_bootstrap_ttl,
                                   sole_writer=settings.store.url.startswith("sqlite"), checkpointer=checkpointer)
    if v.audit_logs:
        # Vault's own record merged into the chain: one tailer per node's file (broker.audit.tailers).
        tailers = [VaultAuditTailer(
            store=store, path=path, metrics=app[api.METRICS], clock=clock, dedupe=len(v.audit_logs) > 1,
            broker_paths=[g.path for r in catalog.roles.values() for g in r.grants.values()],
            hasher=_hasher(vault, device) if device is not None else None)
            for path, device in zip(v.audit_logs, _devices(settings), strict=True)]
        app[api.VAULT_TAILER] = tailers[0]
        app[api.VAULT_TAILERS] = VaultAuditTailers(tailers, metrics=app[api.METRICS])
    yield


def _approval_wakeups(app: web.Application) -> Coroutine[Any, Any, None] | None:
    """On PostgreSQL, decisions made on other replicas wake this one's long polls (broker.store.wakeups)."""
    url = app[SETTINGS].store.url
    if url.startswith("sqlite"):
        return None
    approvals = app[api.APPROVALS]
    listener = ApprovalListener(url, approvals.wake)
    approvals.listening = lambda: listener.connected
    return listener.run_forever()


def _devices(settings: Settings) -> list[str | None]:
    """Each audit file's device name, for ``sys/audit-hash``; None where it is not known (several files, one
    name: it names the first file's device)."""
    files, device = settings.vault.audit_logs, settings.audit.vault_device
    if isinstance(device, str):
        return [device] + [None] * (len(files) - 1)
    return list(device)


def _hasher(vault: VaultClient, device: str) -> Callable[[str], Coroutine[Any, Any, str]]:
    return lambda value: vault.audit_hash(device, value)


def _singleton(name: str, work: Callable[[web.Application], Callable[[], Coroutine[Any, Any, None]] | None]
               ) -> Callable[[web.Application], AsyncIterator[None]]:
    """Work one replica at a time does, as its own context: held under the store's lease ``name``."""
    def start(app: web.Application) -> Coroutine[Any, Any, None] | None:
        run = work(app)
        if run is None:
            return None
        single = Singleton(name, run, store=app[api.STORE], holder=app[api.REPLICA])
        app[api.SINGLETONS].append(single)
        return single.run_forever()
    return _background(name, start)


def _background(name: str, start: Callable[[web.Application], Coroutine[Any, Any, None] | None]
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A background task as its own context: started after what it needs, cancelled and awaited first."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        coro = start(app)
        if coro is None:  # not configured (no audit log to tail, no export sink)
            yield
            return
        task = asyncio.create_task(coro, name=name)
        try:
            yield
        finally:
            await background.stop(task)

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


async def _probe_journal(vault: VaultClient, store: Store, mode: JournalMode, *, every: float = 2.0) -> None:
    """Find out whether Vault's audit device journals issuances: send a request naming a probe id in
    ``X-Broker-Intent`` and wait for the tailer to read its answer back (broker.journal.JournalMode).

    Until then (a device without the audited header never gets there) issuances use issuance tokens.
    """
    warned = False
    started = time.monotonic()
    while not mode.ready:
        probe = journal.new_probe_id()
        try:
            own = (await vault.lookup_self(intent=probe)).accessor
            # The tailer's first start skips what the file already held: a probe written before it is
            # never read, so a new probe follows soon rather than waiting long for this one.
            for _ in range(12):
                await asyncio.sleep(every / 20)
                found = journal.probe_result(await store.journal_for(probe), own_accessor=own)
                if found is not None:
                    mode.plain_accessors = found[1]
                    mode.ready = True
                    log.info("Vault's audit device journals issuances: one Vault request per credential%s",
                             "" if found[1] else " (token grants excepted: the device HMACs accessors)")
                    return
        except BrokerError as exc:
            log.debug("issuance journal probe: %s", exc.code)
        if not warned and time.monotonic() - started > 30:
            warned = True
            log.warning("Vault's audit device does not record X-Broker-Intent in plain text (run `broker vault "
                        "sync`): each credential is read with its own issuance token, two Vault requests")
        await asyncio.sleep(every)


async def _renew_own_token(vault: VaultClient) -> None:
    """Keep the broker's periodic Vault token alive. A failure is logged and retried, never fatal."""
    while True:
        try:
            await vault.renew_self()
        except VaultError as exc:
            log.warning("could not renew the broker's Vault token: %s", exc.code)
        await asyncio.sleep(_TOKEN_RENEW_EVERY)
