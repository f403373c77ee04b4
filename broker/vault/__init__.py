"""Vault/OpenBao: the hot-path client, the admin client for set-up, and the values that cross the boundary.

``client`` holds ``VaultClient``: one async method per endpoint the broker calls while serving, status
codes and transport errors translated to ``VaultError`` subclasses at one boundary, tokens wrapped in
``Sensitive``. ``transport`` holds the keep-alive HTTP/1.1 connections it sends them on (httptools'
parser; its failures told apart as the failover rules need). ``admin`` holds ``VaultAdmin``, a small
typed wrapper around hvac (synchronous) for set-up only: policies, token roles, mounts, engine
configuration. It is not imported here, so that the serving broker never loads it. ``sync`` derives the
policies and token roles from the catalog and writes them through ``VaultAdmin`` (``broker vault
sync``).
"""

from __future__ import annotations

from broker.vault.client import (
    Sensitive,
    VaultClient,
    VaultHealth,
    VaultLeaseInfo,
    VaultSecret,
    VaultTokenAuth,
    VaultTokenInfo,
    validate_path,
)

__all__ = ["Sensitive", "VaultClient", "VaultHealth", "VaultLeaseInfo", "VaultSecret", "VaultTokenAuth",
           "VaultTokenInfo", "validate_path"]
