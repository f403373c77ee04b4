"""``broker catalog``: the task roles and their grants as the broker reads them, each saying how it ends.

Read from the configuration only (no server, no token): what a security team reviews before a change.
``ENDS`` is the grant's revocation class (broker.engines): ``revocable`` (revoked with the task),
``expiry-only`` (a certificate: lives at most its TTL) or ``static`` (a KV value: valid until rotated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from broker.cli.common import EXISTING_FILE, settings_from
from broker.cli.ops import Column, render_table
from broker.delegation import Catalog
from broker.errors import BrokerError

__all__ = ["CATALOG_COLUMNS", "catalog", "catalog_rows"]

CATALOG_COLUMNS = (
    Column("ROLE", "role"), Column("TENANT", "tenant"), Column("GRANT", "grant"), Column("ENGINE", "engine"),
    Column("PATH", "path", width=48), Column("MAX TTL", "max_ttl", "count"), Column("RISK", "risk"),
    Column("ENDS", "revocation"), Column("AGENT CHOOSES", "agent_inputs"),
)


def catalog_rows(cat: Catalog) -> list[dict[str, Any]]:
    """One row per grant, roles and grants in name order. Pure."""
    rows = []
    for role in sorted(cat.roles.values(), key=lambda r: r.name):
        for g in sorted(role.grants.values(), key=lambda g: g.name):
            open_inputs = sorted(k for k in g.engine.agent_inputs if k not in g.params)
            rows.append({"role": role.name, "tenant": role.tenant, "grant": g.name, "engine": g.engine.name,
                         "path": g.path, "max_ttl": g.max_ttl, "risk": g.risk, "revocation": g.revocation,
                         "agent_inputs": ",".join(open_inputs) or "-"})
    return rows


@click.command("catalog")
@click.option("--config", "config", type=EXISTING_FILE, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per grant, one per line.")
def catalog(config: Path, as_json: bool) -> None:
    """The catalog's grants: engine, path, max TTL, risk, and how each ends (revocable, expiry-only, static)."""
    try:
        rows = catalog_rows(Catalog.from_settings(settings_from(config)))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
        return
    click.echo(render_table(CATALOG_COLUMNS, rows))
    kept = [r["grant"] for r in rows if r["revocation"] != "revocable"]
    if kept:
        click.echo(f"\nnot revocable (the task's end cannot pull these back): {', '.join(kept)}", err=True)
