"""Audit records: what the broker decided, for whom, on what, with what outcome.

This is the record's first form: every record is written by the store in the same transaction as the
state change it describes, so there is no state change without its record and no record without its
change. The hash chain, signed checkpoints and Vault's own audit entries build on these rows.

Before a record is stored it passes through redaction: no field may carry a token, a password or
anything shaped like one, whatever a caller put there by mistake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

Outcome = Literal["success", "denied", "failure", "pending"]

# Shapes of secrets that must never reach a record: Vault/OpenBao tokens (s., hvs., b., hvb., hvr.),
# JWTs (three base64url segments starting with a JSON header) and PEM private keys.
_SECRET_SHAPES = re.compile(
    r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,}"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)
_MAX_FIELD = 2000


def redact(text: str) -> str:
    """Replace anything shaped like a token, JWT or private key with ``[redacted]`` and bound the length."""
    return _SECRET_SHAPES.sub("[redacted]", text)[:_MAX_FIELD]


@dataclass(frozen=True)
class AuditRecord:
    time: float
    event: str
    outcome: Outcome
    user: str | None = None
    agent: str | None = None
    task: str | None = None
    tenant: str | None = None
    resource: str | None = None
    action: str | None = None
    reason: str | None = None
    lease: str | None = None
    vault_request_id: str | None = None

    def redacted(self) -> AuditRecord:
        """A copy in which every string field has passed :func:`redact`."""
        changes: dict[str, Any] = {
            f.name: redact(v)
            for f in fields(self)
            if isinstance(v := getattr(self, f.name), str) and f.name not in ("event", "outcome")
        }
        return replace(self, **changes)
