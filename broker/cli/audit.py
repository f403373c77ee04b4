"""``broker audit``: the auditor's commands, reading the store directly (a copy of the database will do).

``verify`` recomputes the hash chain, checks every signed checkpoint and the witness file, prints a
short table and exits 0 when the log verifies, 1 when it does not. ``public-key`` prints the PEM that
auditors verify checkpoints with. Other modules attach more commands to ``audit_group``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit.checkpoints import StoreVerifier
from broker.audit.signing import key_id, load_public_key, load_signing_key, public_key_pem
from broker.audit.verify import VerifyReport
from broker.config import Settings, load_settings
from broker.errors import AuditLineInvalid, BrokerError

__all__ = ["audit_group", "register"]

_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


def _settings(config: Path) -> Settings:
    try:
        return load_settings(os.environ, config)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log: verify it, export its public key."""


@audit_group.command("verify")
@click.option("--config", "config", type=_FILE, required=True, help="The broker's TOML configuration.")
@click.option("--witness", type=_FILE, help="A witness file of checkpoints (default: [audit].witness_file).")
@click.option("--public-key", "public_key", type=_FILE,
              help="The checkpoint public key, PEM (default: derived from [audit].signing_key_file).")
@click.option("--vault-log", "vault_logs", type=_FILE, multiple=True,
              help="Vault's file audit log (repeat for rotated files): every request made with this broker's "
                   "task tokens must be in the chain.")
def verify_cmd(config: Path, witness: Path | None, public_key: Path | None, vault_logs: tuple[Path, ...]) -> None:
    """Recompute the chain and check every checkpoint. Exit 0 when the log verifies, 1 when not."""
    settings = _settings(config)
    try:
        key = _public_key(settings, public_key)
        report = asyncio.run(_verify(settings, key, witness or settings.audit.witness_file))
        missing = asyncio.run(_missing_vault_requests(settings, vault_logs)) if vault_logs else None
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render(report, checked=key is not None))
    if missing is not None:
        checked, absent = missing
        click.echo(f"  {'vault log':<14} {checked} task-token requests, {len(absent)} missing from the chain")
        for request_id in absent[:10]:
            click.echo(f"  {'missing':<14} {request_id}")
    sys.exit(0 if report.ok and not (missing and missing[1]) else 1)


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
@click.option("--config", "config", type=_FILE, required=True, help="The broker's TOML configuration.")
def public_key_cmd(config: Path) -> None:
    """Print the checkpoint signing key's public half (PEM); its key id goes to stderr."""
    settings = _settings(config)
    if settings.audit.signing_key_file is None:
        raise click.ClickException("[audit].signing_key_file is not set: checkpoints are not signed")
    try:
        pub = load_signing_key(settings.audit.signing_key_file).public_key()
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
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


def register(group: click.Group) -> None:
    """Attach ``audit`` to the ``broker`` command."""
    group.add_command(audit_group)
