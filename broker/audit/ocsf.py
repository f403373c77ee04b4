"""Audit records as OCSF events (Open Cybersecurity Schema Framework 1.8.0, the newest release): a pure
mapping, no I/O.

Every record becomes one **API Activity** event (``class_uid`` 6003, category 6 Application Activity):
the broker and Vault are APIs, and every record is an operation on one of them (start a task, issue or
renew a credential, a Vault request, a vote on an approval, an end or a revocation). Each event
validates against the released 1.8.0 schema of that class with no profile (``tests/unit/test_ocsf.py``
checks every kind the broker writes against the vendored JSON Schema in ``tests/data/ocsf/``), and
``metadata.version`` names that release, never a ``-dev`` schema.

- ``class_uid``, ``category_uid``, ``activity_id`` (1 Create, 2 Read, 3 Update, 4 Delete, 99 Other),
  ``type_uid = class_uid * 100 + activity_id``, ``status_id`` (1 Success, 2 Failure, 99 Other),
  ``severity_id`` (1..4), ``time`` (integer milliseconds), ``metadata`` (``product``, ``version``,
  ``uid`` = the record's sequence number, ``correlation_uid`` = the task, ``tenant_uid``, ``log_name``
  = the broker's origin, ``event_code`` = the broker's event name).
- ``actor`` (required, at least one of its fields): ``user`` is the delegating person (``uid`` their
  person id ``<issuer>#<subject>``, ``name`` their display name); a record with no person (the
  broker's own expiry, a Vault request nobody explains) has ``app_name`` = the service that acted.
- ``src_endpoint`` (required): the caller's address the record holds (``ip`` when it is one, else
  ``name``): the HTTP socket peer, or the remote address OpenBao logged. A record with no address
  (background work, records written before addresses were kept) names the service itself.
- ``api``: ``operation`` (the broker action or Vault operation), ``service.name`` (``vault`` or the
  broker), ``request.uid`` (Vault's request id).
- ``resources``: the role, grant, selector or Vault path the record is about.

1.8.0 has no home for the agent or the delegation: its ``ai_operation`` profile holds ``ai_model`` and
``message_context`` only (``ai_agent`` and ``delegation`` exist on the schema's main branch or in open
pull requests, not in a release). Both go to ``unmapped``: ``unmapped.agent`` (``uid`` = the SPIFFE
ID, ``name``) and ``unmapped.delegation`` (``uid`` = the task id, ``issuer_uid`` = the broker's origin,
``created_time`` on the task's start). So do the fields OCSF has no place for (the event name, the
outcome word, the lease id, the reason text). Nothing here adds information the record does not hold:
the mapping of a redacted record is as free of secrets as the record. docs/audit.md has the table.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from broker import __version__
from broker.audit import AuditRecord

__all__ = ["OCSF_VERSION", "PRODUCT_NAME", "activity_of", "to_ocsf"]

OCSF_VERSION: Final = "1.8.0"
PRODUCT_NAME: Final = "agent-secrets-broker"
API_ACTIVITY: Final = 6003
APPLICATION_ACTIVITY: Final = 6

_ACTIVITY_NAMES: Final = {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}
_SEVERITY_NAMES: Final = {1: "Informational", 2: "Low", 3: "Medium", 4: "High"}
_STATUS: Final = {"success": (1, "Success"), "failure": (2, "Failure"), "denied": (2, "Failure"),
                  "pending": (99, "Other")}

# The broker's own events: what happened to what.
_EVENT_ACTIVITY: Final = {
    "task.started": 1, "lease.issued": 1, "approval.requested": 1, "revocation.created": 1,
    "lease.renewed": 3, "approval.approved": 3, "approval.denied": 3, "approval.expired": 3,
    "task.ended": 4, "task.revoked": 4, "task.expired": 4, "task.aborted": 4,
    "lease.revoked": 4, "lease.expired": 4, "lease.aborted": 4, "lock.lifted": 4,
    # A SET pushed to an SSF receiver (broker.signals): the push creates an event at the receiver.
    "signal.delivered": 1, "signal.failed": 1,
}
# Vault's operations (vault.request, vault.unexplained) and the broker's own actions (access.denied).
_OPERATION_ACTIVITY: Final = {
    "create": 1, "read": 2, "list": 2, "update": 3, "delete": 4,
    "issue": 1, "task.start": 1, "renew": 3, "revoke": 4, "unlock": 4,
}


def activity_of(record: AuditRecord) -> int:
    """The OCSF ``activity_id`` of a record: from its event, else from its action (Vault's operation)."""
    if record.event in _EVENT_ACTIVITY:
        return _EVENT_ACTIVITY[record.event]
    return _OPERATION_ACTIVITY.get(record.action or "", 99)


def _severity(record: AuditRecord) -> int:
    if record.event in ("vault.unexplained", "vault.audit_gap"):
        return 4
    if record.outcome == "denied":
        return 3
    if record.outcome == "failure":
        return 2
    return 1


def _resource(resource: str) -> dict[str, str]:
    """``role:support-triage`` is a task role, ``user:x`` a revocation's selector, ``receiver:x`` an SSF
    receiver, anything else a Vault path."""
    kind, sep, name = resource.partition(":")
    if sep and kind in ("role", "user", "agent", "task", "tenant", "grant", "receiver"):
        return {"name": name, "type": f"broker.{kind}", "uid": resource}
    return {"name": resource, "type": "vault.path", "uid": resource}


def _src_endpoint(record: AuditRecord, origin: str, vault: bool) -> dict[str, str]:
    """Where the operation came from: the recorded address, else the service that acted on its own."""
    address = record.caller_address
    if address:
        try:
            return {"ip": str(ipaddress.ip_address(address))}
        except ValueError:
            return {"name": address}  # a unix socket path, or a name a proxy passed on
    if vault:
        return {"svc_name": "vault"}
    return {"name": origin, "svc_name": PRODUCT_NAME}


def to_ocsf(record: AuditRecord, seq: int, *, origin: str = "agent-broker",
            product_version: str = __version__) -> dict[str, Any]:
    """One OCSF 1.8.0 API Activity event for record ``seq`` of the chain (keys with no value are left out)."""
    activity = activity_of(record)
    status_id, status = _STATUS[record.outcome]
    severity = _severity(record)
    vault = record.event.startswith("vault.")
    service = "vault" if vault else PRODUCT_NAME
    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": PRODUCT_NAME, "vendor_name": PRODUCT_NAME, "version": product_version},
        "uid": str(seq),
        "log_name": origin,
        "event_code": record.event,
    }
    if record.task is not None:
        metadata["correlation_uid"] = record.task
    if record.tenant is not None:
        metadata["tenant_uid"] = record.tenant
    actor: dict[str, Any]
    if record.user is not None:
        actor = {"user": {"uid": record.user, "name": record.user_name or record.user}}
    else:
        actor = {"app_name": service}
    api: dict[str, Any] = {"operation": record.action or record.event, "service": {"name": service}}
    if record.vault_request_id is not None:
        api["request"] = {"uid": record.vault_request_id}
    event: dict[str, Any] = {
        "class_uid": API_ACTIVITY,
        "class_name": "API Activity",
        "category_uid": APPLICATION_ACTIVITY,
        "category_name": "Application Activity",
        "activity_id": activity,
        "activity_name": _ACTIVITY_NAMES[activity],
        "type_uid": API_ACTIVITY * 100 + activity,
        "type_name": f"API Activity: {_ACTIVITY_NAMES[activity]}",
        "severity_id": severity,
        "severity": _SEVERITY_NAMES[severity],
        "status_id": status_id,
        "status": status,
        "time": round(record.time * 1000),
        "metadata": metadata,
        "actor": actor,
        "api": api,
        "src_endpoint": _src_endpoint(record, origin, vault),
    }
    if record.outcome != "success" and record.reason:
        event["status_detail"] = record.reason
    if record.resource is not None:
        event["resources"] = [_resource(record.resource)]
    unmapped: dict[str, Any] = {"event": record.event, "outcome": record.outcome, "reason": record.reason,
                                "lease": record.lease, "action": record.action,
                                "delegation_jti": record.delegation_jti, "revocation": record.revocation,
                                "key_fingerprint": record.key_fingerprint}
    if record.agent is not None:
        unmapped["agent"] = {"uid": record.agent, "name": record.agent.rsplit("/", 1)[-1]}
    if record.task is not None:
        delegation: dict[str, Any] = {"uid": record.task, "issuer_uid": origin}
        if record.event == "task.started":
            delegation["created_time"] = event["time"]
        unmapped["delegation"] = delegation
    event["unmapped"] = {k: v for k, v in unmapped.items() if v is not None}
    if record.reason:
        event["message"] = f"{record.event}: {record.reason}"
    else:
        event["message"] = record.event
    return event
