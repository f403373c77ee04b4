"""``broker vault sync``: write what the broker needs on the Vault/OpenBao side (idempotent)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from broker.cli.common import EXISTING_FILE, print_json, settings_from
from broker.delegation import Catalog
from broker.errors import BrokerError, VaultTLSFailed
from broker.vault.sync import audit_device_of

if TYPE_CHECKING:
    from broker.vault.sync import SyncChange

__all__ = ["vault"]


@click.group("vault")
def vault() -> None:
    """Set up the Vault/OpenBao side the broker needs."""


@vault.command("sync")
@click.option("--config", "config", type=EXISTING_FILE, required=True)
@click.option("--write-token", type=click.Path(path_type=Path, dir_okay=False),
              help="Also create a periodic token of the agent-broker policy and write it here (mode 0600).")
@click.option("--json", "as_json", is_flag=True, help="Machine output: what each object needed, as JSON on stdout.")
def vault_sync(config: Path, write_token: Path | None, as_json: bool) -> None:
    """Write the task roles' policies and token roles and the broker's own policy. Idempotent.

    Uses an admin token from VAULT_TOKEN or BAO_TOKEN, VAULT_ADDR or BAO_ADDR (else [vault].addr), and
    for https VAULT_CACERT or BAO_CACERT (else [vault].ca_cert, else the system's trust store).
    """
    # Only what the sync uses: the catalog, [people], [vault].addr and audit_log, [audit].vault_device.
    settings = settings_from(config, vault_setup=True)
    addr = os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR") or settings.vault.addrs[0]
    token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    ca_env = os.environ.get("VAULT_CACERT") or os.environ.get("BAO_CACERT")
    ca_cert = Path(ca_env) if ca_env else settings.vault.ca_cert
    if not token:
        raise click.ClickException("set VAULT_TOKEN (or BAO_TOKEN) to an admin token for the sync")
    try:
        catalog = Catalog.from_settings(settings)
        changes = _sync(addr, token, catalog, write_token, audit_device_of(settings), len(settings.vault.addrs) > 1,
                        ca_cert=ca_cert)
    except VaultTLSFailed as exc:
        raise click.ClickException(f"{exc}: set [vault].ca_cert, or VAULT_CACERT, to the CA that signs Vault's "
                                   "certificate") from exc
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        print_json({"changes": [{"kind": c.kind, "name": c.name, "action": c.action} for c in changes],
                    "token_file": None if write_token is None else str(write_token)})
        return
    width = max(len(c.name) for c in changes)
    for c in changes:
        click.echo(f"  {c.kind:<11} {c.name:<{width}}  {c.action}")
    if write_token is not None:
        click.echo(f"  broker token written to {write_token}")


def _sync(addr: str, token: str, catalog: Catalog, write_token: Path | None,
          audit_device: str | tuple[str, ...] | None, tidy: bool = False, *,
          ca_cert: Path | None = None) -> list[SyncChange]:
    # hvac (synchronous) through VaultAdmin: the admin side never shares the serving broker's client.
    from broker.vault.admin import VaultAdmin
    from broker.vault.sync import sync, write_broker_token
    from broker.vault.tls import vault_tls_context

    if ca_cert is not None:
        vault_tls_context(ca_cert)  # the serving broker's checks of the file, before hvac reads it
    with VaultAdmin(addr, token=token, ca_cert=ca_cert) as admin:
        changes = sync(admin, catalog, audit_device=audit_device, tidy=tidy)
        if write_token is not None:
            write_broker_token(admin, write_token)
        return changes
