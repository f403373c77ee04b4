"""``broker audit``: the auditor's commands.

``verify`` recomputes the hash chain, checks every signed checkpoint and the witness file, prints a
short table and exits 0 when the log verifies, 1 when it does not. ``public-key`` prints the PEM that
auditors verify checkpoints with. Both read the store directly (a copy of the database will do).

``replay`` asks a running broker instead (``GET /v1/audit``, through ``broker.client``, as an auditor
with ``BROKER_TOKEN`` or ``--token-file``), follows the pages, and prints the timeline that
:mod:`broker.audit.replay` renders.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit.checkpoints import StoreVerifier
from broker.audit.replay import (
    ReplayRecord,
    parse_time,
    records_from_api,
    render_jsonl,
    render_ocsf,
    render_table,
)
from broker.audit.signing import (
    key_id,
    load_public_key,
    load_signing_key,
    public_key_pem,
)
from broker.audit.verify import VerifyReport
from broker.cli.common import (
    EXISTING_FILE,
    connection_options,
    iso_option,
    print_json,
    read_token,
    run,
    settings_from,
)
from broker.client import BadResponse, BrokerClient
from broker.config import Settings
from broker.errors import AuditLineInvalid, BrokerError

__all__ = ["audit_group", "fetch_records", "render"]

_MAX_RECORDS = 1_000_000
_PAGE = 1000


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log: verify it, export its public key."""


@audit_group.command("verify")
@click.option("--config", "config", type=EXISTING_FILE, required=True, help="The broker's TOML configuration.")
@click.option("--witness", type=EXISTING_FILE, help="A witness file of checkpoints (default: [audit].witness_file).")
@click.option("--public-key", "public_key", type=EXISTING_FILE,
              help="The checkpoint public key, PEM (default: derived from [audit].signing_key_file).")
@click.option("--vault-log", "vault_logs", type=EXISTING_FILE, multiple=True,
              help="Vault's file audit log (repeat for rotated files): every request made with this broker's "
                   "task tokens must be in the chain.")
@click.option("--json", "as_json", is_flag=True, help="Machine output: the verdict as one JSON object on stdout.")
def verify_cmd(config: Path, witness: Path | None, public_key: Path | None, vault_logs: tuple[Path, ...],
               as_json: bool) -> None:
    """Recompute the chain and check every checkpoint. Exit 0 when the log verifies, 1 when not."""
    settings = settings_from(config)
    try:
        key = _public_key(settings, public_key)
        report = asyncio.run(_verify(settings, key, witness or settings.audit.witness_file))
        missing = asyncio.run(_missing_vault_requests(settings, vault_logs)) if vault_logs else None
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    ok = report.ok and not (missing and missing[1])
    if as_json:
        print_json(verify_json(report, checked=key is not None, missing=missing, ok=ok))
        sys.exit(0 if ok else 1)
    click.echo(render(report, checked=key is not None))
    if missing is not None:
        checked, absent = missing
        click.echo(f"  {'vault log':<14} {checked} task-token requests, {len(absent)} missing from the chain")
        for request_id in absent[:10]:
            click.echo(f"  {'missing':<14} {request_id}")
    sys.exit(0 if ok else 1)


def verify_json(report: VerifyReport, *, checked: bool, missing: tuple[int, list[str]] | None,
                ok: bool) -> dict[str, object]:
    """``verify --json``: the API's ``GET /v1/audit/verify`` fields, and the Vault log check when asked for."""
    out: dict[str, object] = {"ok": ok, "records": report.records, "checkpoints": report.checkpoints,
                              "checkpoints_checked": checked, "witnessed": report.witnessed,
                              "first_bad_seq": report.first_bad_seq, "reason": report.reason}
    if missing is not None:
        out["vault_log"] = {"task_token_requests": missing[0], "missing": missing[1]}
    return out


async def _missing_vault_requests(settings: Settings, paths: tuple[Path, ...]) -> tuple[int, list[str]]:
    """(requests made with this store's task tokens in the Vault logs, those whose request id the chain lacks)."""
    from broker.audit.vaultlog import parse_line, task_token_requests
    from broker.store import open_store

    entries = []
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                try:
                    entries.append(parse_line(line))
                except AuditLineInvalid:
                    continue  # a torn last line; the tailer reads only complete lines too
    store = await open_store(settings.store.url, migrate=False)
    try:
        tasks = {t.id for t in await store.find_tasks(limit=10_000_000)}
        seen: set[str] = set()
        after = 0
        while True:
            rows = await store.query_audit(after_seq=after, limit=5000)
            if not rows:
                break
            seen.update(r.record.vault_request_id for r in rows
                        if r.record.vault_request_id and r.record.event.startswith("vault."))
            after = rows[-1].seq
    finally:
        await store.close()
    wanted = task_token_requests(entries, tasks=tasks)
    return len(wanted), [e.request_id for e in wanted if e.request_id not in seen]


@audit_group.command("public-key")
@click.option("--config", "config", type=EXISTING_FILE, required=True, help="The broker's TOML configuration.")
@click.option("--json", "as_json", is_flag=True, help='Machine output: {"public_key_pem", "key_id"} on stdout.')
def public_key_cmd(config: Path, as_json: bool) -> None:
    """Print the checkpoint signing key's public half (PEM); its key id goes to stderr."""
    settings = settings_from(config)
    if settings.audit.signing_key_file is None:
        raise click.ClickException("[audit].signing_key_file is not set: checkpoints are not signed")
    try:
        pub = load_signing_key(settings.audit.signing_key_file).public_key()
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        print_json({"public_key_pem": public_key_pem(pub), "key_id": key_id(pub).hex()})
        return
    click.echo(public_key_pem(pub), nl=False)
    click.echo(f"key id {key_id(pub).hex()}", err=True)


def _public_key(settings: Settings, path: Path | None) -> Ed25519PublicKey | None:
    """Raises: ConfigError: an unreadable or malformed key."""
    if path is not None:
        return load_public_key(path.read_bytes())
    if settings.audit.signing_key_file is not None:
        return load_signing_key(settings.audit.signing_key_file).public_key()
    return None


async def _verify(settings: Settings, key: Ed25519PublicKey | None, witness: Path | None) -> VerifyReport:
    from broker.store import open_store

    # migrate=False: an auditor's copy of the database is evidence, and is read, never upgraded.
    store = await open_store(settings.store.url, migrate=False)
    try:
        return await StoreVerifier(store, key, settings.audit.origin, witness).verify()
    finally:
        await store.close()


def render(report: VerifyReport, *, checked: bool = True) -> str:
    """The short table ``verify`` prints."""
    rows = [("records", str(report.records)),
            ("checkpoints", str(report.checkpoints) if checked else "not checked (no public key)"),
            ("witnessed", str(report.witnessed)),
            ("result", "ok" if report.ok else "FAILED")]
    if not report.ok:
        rows += [("first bad seq", "-" if report.first_bad_seq is None else str(report.first_bad_seq)),
                 ("reason", report.reason or "")]
    return "\n".join(f"  {k:<14} {v}" for k, v in rows)



async def fetch_records(client: BrokerClient, filters: Mapping[str, str | None], *, limit: int = _MAX_RECORDS
                        ) -> list[ReplayRecord]:
    """Every record matching ``filters`` (up to ``limit``), following ``next_after``.

    Raises:
        BrokerError: as ``broker.client`` raises it; ``BadResponse`` for items that are not audit records.
    """
    async with client:
        items, _ = await client.pages("/v1/audit", "records", filters, limit, page_size=_PAGE)
    try:
        return records_from_api(items)
    except ValueError as exc:
        raise BadResponse(str(exc)) from exc


@audit_group.command("replay")
@click.option("--user", help="Every record naming this user (who delegated, or the operator who acted).")
@click.option("--agent", help="Every record naming this agent (SPIFFE ID).")
@click.option("--task", help="Every record of this task.")
@click.option("--since", help="From this time on (Unix seconds or ISO 8601).")
@click.option("--until", help="Before this time (Unix seconds or ISO 8601).")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "ocsf"]), default="table", show_default=True,
              help="table: the timeline per task; jsonl: canonical records; ocsf: OCSF 1.8.0 events.")
@click.option("--json", "as_json", is_flag=True, help="Machine output: the records as one JSON array on stdout.")
@iso_option
@click.option("--origin", default="agent-broker", show_default=True,
              help="The log's origin (OCSF metadata.log_name and delegation issuer).")
@connection_options
def replay(user: str | None, agent: str | None, task: str | None, since: str | None, until: str | None, fmt: str,
           as_json: bool, iso: bool, origin: str, url: str, token_file: Path | None) -> None:
    """The delegation timeline of a user, an agent or a task: who started it, for which agent and role, each
    credential, each Vault request made with it, approvals, end or revocation. Needs an auditor's token."""
    chosen = [(k, v) for k, v in (("user", user), ("agent", agent), ("task", task)) if v is not None]
    if not chosen:
        raise click.UsageError("say whose timeline: --user, --agent or --task")
    filters: dict[str, str | None] = dict(chosen)
    if since is not None:
        filters["since"] = repr(parse_time(since))
    if until is not None:
        filters["until"] = repr(parse_time(until))
    token = read_token(token_file)
    records = run(fetch_records(BrokerClient(url, token), filters), token=token)
    if as_json:
        print_json([json.loads(line) for line in render_jsonl(records).splitlines() if line])
        if not records:
            click.echo("no audit records match", err=True)
        return
    if not records:
        click.echo("no audit records match", err=True)
        return
    if fmt == "jsonl":
        click.echo(render_jsonl(records), nl=False)
    elif fmt == "ocsf":
        click.echo(render_ocsf(records, origin=origin), nl=False)
    else:
        click.echo(render_table(records, iso=iso))
