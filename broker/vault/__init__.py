"""Vault/OpenBao: the hot-path client, the set-up the broker needs, and the values that cross the boundary.

``client`` holds ``VaultClient``: one async method per endpoint the broker calls while serving, status
codes and aiohttp errors translated to ``VaultError`` subclasses at one boundary, tokens wrapped in
``Sensitive``. ``sync`` derives the policies and token roles from the catalog and writes them
(``broker vault sync``) through the admin client.
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
