"""A few Prometheus counters and gauges, rendered in the text exposition format (``GET /metrics``).

Deliberately tiny: in-process values (they restart at zero with the process, which Prometheus's
``rate()`` handles), no labels, no client library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# name -> (type, help). A name not listed here cannot be counted: typos fail loudly in tests.
_DEFINED: dict[str, tuple[str, str]] = {
    "broker_vault_audit_lines_total": ("counter", "Lines of Vault's audit file read and merged by the tailer."),
    "broker_vault_audit_invalid_lines_total": ("counter", "Lines of Vault's audit file that were not audit entries."),
    "broker_vault_audit_requests_total": ("counter", "vault.request records merged into the chain."),
    "broker_vault_audit_unexplained_total": ("counter", ("vault.unexplained records: Vault requests the broker "
                                                         "cannot explain.")),
    "broker_vault_audit_rotations_total": ("counter", "Rotations (rename + reopen) of Vault's audit file followed."),
    "broker_vault_audit_gaps_total": ("counter", ("Times the tailer could not find where it stopped "
                                                  "(file gone or truncated): entries may be missing.")),
    "broker_vault_audit_errors_total": ("counter", "Tailer polls that failed (store or file); retried."),
    "broker_vault_audit_lag_bytes": ("gauge", "Bytes of Vault's audit file not yet merged."),
    "broker_audit_export_backlog": ("gauge", "Audit records not yet delivered to the slowest export sink."),
    "broker_signals_delivered_total": ("counter", "SSF SETs a receiver accepted (HTTP 202)."),
    "broker_signals_retried_total": ("counter", "SSF pushes that failed and will be tried again."),
    "broker_signals_failed_total": ("counter", ("SSF SETs that will never be delivered: refused (HTTP 400), "
                                                "attempts or age spent, or the receiver removed.")),
}


@dataclass
class Metrics:
    """Process-wide counters. Not thread-safe: update them from the event loop only."""

    def __post_init__(self) -> None:
        self._values: dict[str, float] = dict.fromkeys(_DEFINED, 0.0)

    def inc(self, name: str, by: float = 1.0) -> None:
        """Raises: KeyError: ``name`` is not a defined metric."""
        self._values[name] += by

    def set(self, name: str, value: float) -> None:
        """Raises: KeyError: ``name`` is not a defined metric."""
        if name not in self._values:
            raise KeyError(name)
        self._values[name] = value

    def get(self, name: str) -> float:
        """Raises: KeyError: ``name`` is not a defined metric."""
        return self._values[name]

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        out: list[str] = []
        for name, (kind, help_) in _DEFINED.items():
            v = self._values[name]
            text = str(int(v)) if math.isfinite(v) and v == int(v) else repr(v)
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {text}"]
        return "\n".join(out) + "\n"
