"""The tamper-evident delegation audit log.

Floors (nothing here imports upward; ``tests/unit/test_layers.py`` holds them):

* pure, below the store: ``chain`` (records, redaction, canonical bytes, the hash chain), ``signing``
  (Ed25519 checkpoint notes), ``verify`` (the auditor's check), ``ocsf`` (the OCSF mapping) and
  ``vaultlog`` (OpenBao's file-audit lines parsed and classified);
* I/O, above the store: ``tailer`` (follows Vault's audit device), ``export`` (JSONL/OCSF sinks with a
  fail-closed backlog), ``checkpoints`` (the checkpointer and witness);
* ``replay``: the delegation timeline, read over the API through ``broker.client``.

This package's face re-exports the pure record and chain names only, so the store can import it.
"""

from __future__ import annotations

from broker.audit.chain import (
    ADDED_FIELDS,
    CALLER_ADDRESS,
    CHAIN_DOMAIN,
    GENESIS,
    AuditRecord,
    ChainLink,
    Outcome,
    TaskLike,
    canonical_bytes,
    chain_hash,
    redact,
    verify_chain,
)

__all__ = ["ADDED_FIELDS", "CALLER_ADDRESS", "CHAIN_DOMAIN", "GENESIS", "AuditRecord", "ChainLink", "Outcome",
           "TaskLike", "canonical_bytes", "chain_hash", "redact", "verify_chain"]
