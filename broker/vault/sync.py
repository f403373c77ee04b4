"""``broker vault sync``: the Vault side the broker needs, derived from the catalog. Rendering is pure.

Written, each idempotent (a second run changes nothing):
- one ACL policy per task role, ``broker-task-<role>``: exactly its grants' paths, plus child tokens
  of itself (one per issuance), renewing itself (from the bootstrap TTL to the task's end) and
  renewing its own leases (to shorten a database lease to the task's cap);
- one token role per task role, same name: orphan task tokens that may carry only that policy, with
  an explicit max TTL of the role's max TTL (OpenBao ignores ``token_ttl`` on roles);
- the broker's own policy ``agent-broker``: create tokens through exactly those token roles, look up
  and revoke tokens by accessor, look up leases, and revoke one lease by id under the catalog's grant
  paths only (what a journaled issuance left unrecorded, broker.journal). Nothing else: it cannot read
  a secret.
- the audited request header ``X-Broker-Intent``, unHMAC'd, when the broker reads Vault's audit
  device: the issuance journal (broker.journal), one Vault request per credential.

It writes through ``VaultAdmin`` (hvac, synchronous): the CLI calls it directly, async callers in a
worker thread (``await asyncio.to_thread(sync, admin, catalog)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.config import Settings
from broker.delegation import Catalog, TaskRole
from broker.errors import ConfigError
from broker.vault.admin import TokenRole, VaultAdmin
from broker.vault.client import INTENT_HEADER

BROKER_POLICY = "agent-broker"


def task_policy_hcl(role: TaskRole) -> str:
    lines = [f"# Written by `broker vault sync`: the grants of task role {role.name!r} (tenant {role.tenant!r}).", ""]
    for grant in role.grants.values():
        caps = '["read"]' if grant.method == "GET" else '["create", "update"]'
        lines.append(f'path "{grant.path}" {{ capabilities = {caps} }}  # grant {grant.name}')
    lines += [
        "",
        "# Issuance tokens: each credential is read with a fresh child of the task token (no more than",
        "# this policy), so that one credential can be revoked alone and a crash mid-issuance leaves an",
        "# accessor to revoke.",
        'path "auth/token/create" { capabilities = ["update"] }',
        "# Extend the task token from its bootstrap TTL to the task's end, once the task is recorded.",
        'path "auth/token/renew-self" { capabilities = ["update"] }',
        "# Shorten or extend this task's own leases (the broker caps every TTL at the task's end).",
        'path "sys/leases/renew" { capabilities = ["update"] }',
        "",
    ]
    return "\n".join(lines)


def task_token_role(role: TaskRole) -> TokenRole:
    return TokenRole(
        allowed_policies=frozenset({role.vault_policy}),
        orphan=True,
        # Renewable only so the broker can extend it from the bootstrap TTL; never past the explicit max.
        renewable=True,
        token_type="service",  # noqa: S106 -- a token kind, not a password
        token_explicit_max_ttl=role.max_ttl,
        token_no_default_policy=True,
    )


def audit_device_of(settings: Settings) -> str | tuple[str, ...] | None:
    """The file audit device(s) the broker reads, if it reads any (then it may HMAC values with them)."""
    return settings.audit.vault_device if settings.vault.audit_log is not None else None


def broker_policy_hcl(catalog: Catalog, *, audit_device: str | Sequence[str] | None = None,
                      tidy: bool = False) -> str:
    lines = ["# Written by `broker vault sync`: the broker's own token. It can start and end tasks, "
             "not read secrets.", ""]
    for role in sorted(catalog.roles.values(), key=lambda r: r.name):
        lines.append(f'path "auth/token/create/{role.vault_policy}" {{ capabilities = ["update"] }}')
    lines += [
        'path "auth/token/revoke-accessor" { capabilities = ["update"] }',
        'path "auth/token/lookup-accessor" { capabilities = ["update"] }',
        'path "sys/leases/lookup" { capabilities = ["update"] }',
    ]
    # One lease at a time, and only the catalog's own: what a journaled issuance could not record.
    lease_paths = sorted({g.path for r in catalog.roles.values() for g in r.grants.values()
                          if not g.path.startswith("auth/token/")})
    lines += [f'path "sys/leases/revoke/{p}/*" {{ capabilities = ["update"] }}' for p in lease_paths]
    # A grant's leases, listed: where a read that Vault's backend failed may have left one (broker.journal rule
    # 9). Vault asks sudo of a lease listing; on these exact paths it grants nothing else.
    lines += [f'path "sys/leases/lookup/{p}/" {{ capabilities = ["list", "sudo"] }}' for p in lease_paths]
    # What such a read left may have no backend object (a database role never created): revoking it fails
    # forever, so the broker drops that lease itself. No credential of it was ever returned to anyone.
    lines += [f'path "sys/leases/revoke-force/{p}/*" {{ capabilities = ["update", "sudo"] }}' for p in lease_paths]
    if tidy:
        # A cluster: after a leader change, revoke leases whose token is gone (broker.revocations.LeaderWatch).
        lines.append('path "sys/leases/tidy" { capabilities = ["update", "sudo"] }')
    # HMAC a known accessor with the device's salt, to match it in the audit log (update, not sudo).
    for device in (audit_device,) if isinstance(audit_device, str) else audit_device or ():
        lines.append(f'path "sys/audit-hash/{device}" {{ capabilities = ["update"] }}')
    lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class SyncChange:
    kind: str
    name: str
    action: str  # "created", "updated", "unchanged"


def sync(admin: VaultAdmin, catalog: Catalog, *, audit_device: str | Sequence[str] | None = None,
         tidy: bool = False) -> list[SyncChange]:
    """Bring Vault in line with the catalog; what each object needed, in order. ``tidy``: the broker talks to
    a cluster (several ``[vault] addr``) and may tidy leases after a leader change. Raises: VaultError."""
    _check_child_token_roles(admin, catalog)
    changes: list[SyncChange] = []
    for role in sorted(catalog.roles.values(), key=lambda r: r.name):
        changes.append(_policy(admin, role.vault_policy, task_policy_hcl(role)))
        wanted = task_token_role(role)
        current = admin.read_token_role(role.vault_policy)
        if current == wanted:
            changes.append(SyncChange("token role", role.vault_policy, "unchanged"))
        else:
            admin.put_token_role(role.vault_policy, wanted)
            changes.append(SyncChange("token role", role.vault_policy, "created" if current is None else "updated"))
    changes.append(_policy(admin, BROKER_POLICY, broker_policy_hcl(catalog, audit_device=audit_device, tidy=tidy)))
    if audit_device is not None:
        changes.append(_journal_header(admin))
    return changes


def _check_child_token_roles(admin: VaultAdmin, catalog: Catalog) -> None:
    """The token roles the catalog's token grants create through must make children, not orphans.

    A child of the task token dies with it: that is how a task's end takes every token it handed out, and
    how a token create that Vault's backend cut short is settled without a name (broker.journal rule 9). An
    orphan would outlive its task. A role not made yet is the operator's to make (vault/README.md).

    Raises:
        ConfigError: a grant's token role makes orphan tokens.
    """
    names = sorted({g.path.rsplit("/", 1)[1] for r in catalog.roles.values() for g in r.grants.values()
                    if g.path.startswith("auth/token/create/")})
    orphans = [n for n in names if (role := admin.read_token_role(n)) is not None and role.orphan]
    if orphans:
        msg = (f"token role {', '.join(orphans)} makes orphan tokens: a token grant's tokens must die with their "
               "task's token; set orphan=false on it (vault/README.md)")
        raise ConfigError(msg)


def _journal_header(admin: VaultAdmin) -> SyncChange:
    """Vault's audit device must write ``X-Broker-Intent`` in plain text: it is the issuance journal's key."""
    current = admin.audit_request_header(INTENT_HEADER)
    if current is False:
        return SyncChange("audited header", INTENT_HEADER, "unchanged")
    admin.put_audit_request_header(INTENT_HEADER, hmac=False)
    return SyncChange("audited header", INTENT_HEADER, "created" if current is None else "updated")


def _policy(admin: VaultAdmin, name: str, hcl: str) -> SyncChange:
    current = admin.read_policy(name)
    if current is not None and current.strip() == hcl.strip():
        return SyncChange("policy", name, "unchanged")
    admin.put_policy(name, hcl)
    return SyncChange("policy", name, "created" if current is None else "updated")


def write_broker_token(admin: VaultAdmin, path: Path) -> None:
    """Create a periodic orphan token of the broker policy and write it to ``path`` (mode 0600).

    Periodic: the broker renews it itself and it never reaches a max TTL; orphan: it outlives the admin
    token that made it. Raises: VaultError.
    """
    auth = admin.create_token(policies=[BROKER_POLICY], period="24h", no_parent=True, display_name="agent-broker")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth.client_token.reveal() + "\n")
