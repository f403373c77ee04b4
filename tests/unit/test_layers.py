"""The package's floors hold: what each layer may import, checked on the modules a fresh interpreter loads.

Importing a module in a clean interpreter and looking at ``sys.modules`` catches indirect imports too (a
decision that imports a module that imports the store), which reading import lines would miss.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Decisions and pure rules: no store, no Vault client, no web layer, no CLI, no dev tooling.
PURE = ["broker.delegation", "broker.approval_rules", "broker.limits", "broker.states", "broker.intents",
        "broker.paths", "broker.engines", "broker.sshkeys", "broker.jsontext", "broker.rows", "broker.identity.tokens", "broker.identity.spiffe_id",
        "broker.signals.deliveries", "broker.signals.events", "broker.signals.keys",
        "broker.timeline",
        "broker.endpoints", "broker.mcp.bounds"]
# The audit log's pure parts sit below the store.
AUDIT_PURE = ["broker.audit.chain", "broker.audit.signing", "broker.audit.verify", "broker.audit.stretches", "broker.audit.ocsf",
              "broker.audit.vaultlog"]
BELOW_STORE = ("broker.store", "broker.vault", "broker.api", "broker.app", "broker.console", "broker.server",
               "broker.cli", "broker.dev", "broker.tasks", "broker.leases", "broker.revocations", "broker.approvals",
               "broker.audit.tailer", "broker.audit.export", "broker.audit.checkpoints", "sqlalchemy")
# Production code never depends on dev tooling; nothing under audit/ imports a CLI module.
NO_DEV = ["broker.app", "broker.api", "broker.store", "broker.audit.tailer", "broker.audit.export",
          "broker.audit.replay", "broker.sdk", "broker.mcp.server", "broker.cli.mcp"]


def loaded_by(module: str) -> list[str]:
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('broker', 'sqlalchemy')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return list(json.loads(out.stdout))


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class TestFloors:
    @pytest.mark.parametrize("module", PURE + AUDIT_PURE)
    def test_pure_modules_import_nothing_with_io(self, module: str) -> None:
        """Decisions, records, state tables and the audit log's pure parts load no store, Vault, web or CLI."""
        assert [m for m in loaded_by(module) if _under(m, BELOW_STORE)] == []

    @pytest.mark.parametrize("module", NO_DEV)
    def test_production_code_loads_no_dev_tooling(self, module: str) -> None:
        """The serving broker never imports broker.dev (its dependencies are an optional extra)."""
        assert [m for m in loaded_by(module) if _under(m, ("broker.dev",))] == []

    @pytest.mark.parametrize("module", ["broker.sdk", "broker.mcp.server"])
    def test_agent_side_code_loads_no_broker_internals(self, module: str) -> None:
        """The SDK and `broker mcp` run beside the agent: they reach the broker over HTTP only (no store, Vault, web)."""
        assert [m for m in loaded_by(module) if _under(m, BELOW_STORE)] == []

    def test_nothing_under_audit_imports_a_cli_module(self) -> None:
        """broker/audit/ reads the API through the shared client, never through a CLI module's internals."""
        offenders = []
        for path in sorted((ROOT / "broker" / "audit").glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.name}: {n}" for n in names if _under(n, ("broker.cli",))]
        assert offenders == []
