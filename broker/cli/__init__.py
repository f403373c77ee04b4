"""The ``broker`` command.

Every subcommand lives in its own module and is added here the same way, with ``main.add_command``:

- ``serve`` (:mod:`broker.cli.serve`): the HTTP API;
- ``vault sync`` (:mod:`broker.cli.vault`): the Vault/OpenBao side;
- ``catalog`` (:mod:`broker.cli.catalog`): the task roles' grants, each with how it ends;
- ``revoke``, ``unlock``, ``revocations``, ``leases``, ``tasks`` (:mod:`broker.cli.ops`): the operator's
  commands, over the HTTP API;
- ``approvals list``, ``approve``, ``deny`` (:mod:`broker.cli.approvals`): the approver's, over the HTTP API;
- ``audit verify``, ``audit replay``, ``audit public-key`` (:mod:`broker.cli.audit`): the auditor's;
- ``mcp`` (:mod:`broker.cli.mcp`): the MCP server for one task, beside an agent's model;
- ``dev`` (:mod:`broker.cli.dev`): DEV ONLY, the whole path on one machine.

What they share (settings read once from the environment, the token, ``--url``/``--token-file``/
``--json``/``--iso``, one error line and an exit code instead of a traceback) is :mod:`broker.cli.common`.
"""

from __future__ import annotations

import click

from broker import __version__
from broker.cli import approvals, audit, catalog, dev, mcp, ops, serve, vault

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="broker")
def main() -> None:
    """Agent secrets broker: task-scoped, short-lived Vault credentials for AI agents."""


# Modules, not their commands, are imported above: ``broker.cli.serve`` stays the module, not the command.
for _command in (serve.serve, vault.vault, ops.revoke, ops.unlock, ops.revocations, ops.leases, ops.tasks,
                 approvals.approvals, audit.audit_group, catalog.catalog, dev.dev, mcp.mcp):
    main.add_command(_command)
