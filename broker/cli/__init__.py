"""The ``broker`` command: ``serve``, ``vault sync``, ``dev``.

Settings are read here, once (``load_settings(os.environ, path)``), and passed down; no other module
reads the environment. Errors print one line to stderr and exit non-zero, never a traceback with a
token in it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from broker import __version__
from broker.config import Settings, load_settings
from broker.delegation import Catalog
from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.vault.sync import SyncChange


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(os.environ, config)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.version_option(__version__, prog_name="broker")
def main() -> None:
    """Agent secrets broker: task-scoped, short-lived Vault credentials for AI agents."""


@main.command()
@click.option("--config", "config", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="The broker's TOML configuration.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def serve(config: Path, log_level: str) -> None:
    """Serve the HTTP API on [server].listen."""
    from broker.app import make_app

    _setup_logging(log_level)
    settings = _settings(config)
    host, port = settings.server.host_port
    try:
        # broker.server: the access log names method, path (never the query string), status and time, and
        # requests the HTTP parser refuses are answered as problems without repeating their bytes.
        from broker.faults import from_environ
        from broker.server import serve as serve_app

        asyncio.run(serve_app(make_app(settings, crash=from_environ(os.environ)), host, port))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def vault() -> None:
    """Set up the Vault/OpenBao side the broker needs."""


@vault.command("sync")
@click.option("--config", "config", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True)
@click.option("--write-token", type=click.Path(path_type=Path, dir_okay=False),
              help="Also create a periodic token of the agent-broker policy and write it here (mode 0600).")
def vault_sync(config: Path, write_token: Path | None) -> None:
    """Write the task roles' policies and token roles and the broker's own policy. Idempotent.

    Uses an admin token from VAULT_TOKEN or BAO_TOKEN, and VAULT_ADDR or BAO_ADDR (else [vault].addr).
    """
    from broker.vault.sync import audit_device_of

    settings = _settings(config)
    addr = os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR") or settings.vault.addr
    token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    if not token:
        raise click.ClickException("set VAULT_TOKEN (or BAO_TOKEN) to an admin token for the sync")
    try:
        catalog = Catalog.from_settings(settings)
        changes = _sync(addr, token, catalog, write_token, audit_device_of(settings))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    width = max(len(c.name) for c in changes)
    for c in changes:
        click.echo(f"  {c.kind:<11} {c.name:<{width}}  {c.action}")
    if write_token is not None:
        click.echo(f"  broker token written to {write_token}")


def _sync(addr: str, token: str, catalog: Catalog, write_token: Path | None,
          audit_device: str | None) -> list[SyncChange]:
    # hvac (synchronous) through VaultAdmin: the admin side never shares the serving broker's client.
    from broker.vault.admin import VaultAdmin
    from broker.vault.sync import sync, write_broker_token

    with VaultAdmin(addr, token=token) as admin:
        changes = sync(admin, catalog, audit_device=audit_device)
        if write_token is not None:
            write_broker_token(admin, write_token)
        return changes


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path(".broker-dev"),
              show_default=True, help="Where the dev OpenBao, keys, config and SQLite store live.")
@click.option("--port", type=int, default=8400, show_default=True, help="The broker's port on 127.0.0.1.")
@click.option("--pg-dsn", envvar="BROKER_DEV_PG_DSN",
              help="An admin DSN of a PostgreSQL server: adds a database grant to the demo.")
@click.option("--once", is_flag=True, help="Exit after the demo instead of serving until Ctrl-C.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the broker listens on.")
@click.option("--vault-addr", envvar="BROKER_DEV_VAULT_ADDR",
              help="Use this dev Vault/OpenBao instead of starting one (needs --vault-token).")
@click.option("--vault-token", envvar="BROKER_DEV_VAULT_TOKEN", help="Root token of --vault-addr.")
@click.option("--vault-audit-log", envvar="BROKER_DEV_VAULT_AUDIT_LOG", type=click.Path(path_type=Path),
              help="Where --vault-addr writes its file audit device.")
def dev(workdir: Path, port: int, pg_dsn: str | None, once: bool, host: str, vault_addr: str | None,
        vault_token: str | None, vault_audit_log: Path | None) -> None:
    """DEV ONLY: a dev OpenBao, dev identities, the broker on SQLite, and a demo agent walked through a task."""
    from broker.dev.demo import run_dev

    _setup_logging("warning")
    try:
        code = asyncio.run(run_dev(workdir=workdir, port=port, pg_dsn=pg_dsn, once=once, host=host,
                                   vault_addr=vault_addr, vault_token=vault_token, vault_audit_log=vault_audit_log))
    except KeyboardInterrupt:
        code = 0
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


# Operator commands over the HTTP API (revoke, unlock, revocations, leases, tasks).
from broker.cli.ops import register  # noqa: E402 -- registered on the group defined above

register(main)

# The auditor's commands over the store (audit verify, audit public-key; others attach to broker.auditcli.audit_group).
from broker.cli.audit import register as register_audit  # noqa: E402 -- registered on the group defined above

register_audit(main)

# `broker audit replay` attaches itself to audit_group (broker.audit.replay).
import broker.audit.replay  # noqa: E402,F401 -- registers its command on import
