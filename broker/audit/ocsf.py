"""Audit records as OCSF events (Open Cybersecurity Schema Framework 1.9.0): a pure mapping, no I/O.

Every record becomes one **API Activity** event (``class_uid`` 6003, category 6 Application Activity):
the broker and Vault are APIs, and every record is an operation on one of them (start a task, issue or
renew a credential, a Vault request, a vote on an approval, an end or a revocation).

What each field holds, and how sure we are of it ("confirmed" = seen in published schema documentation
for 1.x or in the ocsf-schema repository's merged changes; "unconfirmed" = our best reading, not seen
verbatim for 1.9):

- ``class_uid`` 6003 / ``category_uid`` 6, ``activity_id`` 1 Create, 2 Read, 3 Update, 4 Delete,
  99 Other, ``type_uid = class_uid * 100 + activity_id``, ``status_id`` 1 Success, 2 Failure, 99 Other,
  ``severity_id`` 1..4 (Informational, Low, Medium, High), ``time`` in integer milliseconds,
  ``metadata.product``, ``metadata.version``, ``metadata.uid``, ``metadata.correlation_uid``,
  ``metadata.tenant_uid``, ``actor.user``, ``resources``, ``unmapped``: confirmed.
- ``actor.ai_agent`` (object ``ai_agent``, ``uid`` required, ``name``): confirmed as merged into the
  schema (ocsf-schema PR 1641, "placements on actor and process", gated by the ``ai_operation``
  profile, hence ``metadata.profiles``).
- ``delegation`` (``uid`` required, ``issuer_uid``, ``created_time``): confirmed as merged (ocsf-schema
  PR 1665) as an optional attribute that the ``ai_operation`` profile adds to events; its ``uid`` here
  is the broker's task id (one delegation = one task), ``issuer_uid`` the broker's origin.
- ``api.operation`` (required in the ``api`` object), ``api.service.name``, ``api.request.uid``:
  ``operation`` confirmed; ``service`` and ``request.uid`` unconfirmed for 1.9 (present in earlier 1.x).
- ``src_endpoint`` is required by API Activity but the broker's records do not hold a caller address:
  omitted (a validator in strict mode will say so).

Fields with no OCSF home (the broker's event name, the lease id, the reason text, the outcome word) go
to ``unmapped``. Nothing here adds information that the record does not hold: the mapping of a
redacted record is as free of secrets as the record.
"""

from __future__ import annotations

from typing import Any, Final

from broker import __version__
from broker.audit import AuditRecord

__all__ = ["OCSF_VERSION", "PRODUCT_NAME", "activity_of", "to_ocsf"]

OCSF_VERSION: Final = "1.9.0"
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
    """``role:support-triage`` is a task role, ``user:x`` a revocation's selector, anything else a Vault path."""
    kind, sep, name = resource.partition(":")
    if sep and kind in ("role", "user", "agent", "task", "tenant", "grant"):
        return {"name": name, "type": f"broker.{kind}", "uid": resource}
    return {"name": resource, "type": "vault.path", "uid": resource}


def to_ocsf(record: AuditRecord, seq: int, *, origin: str = "agent-broker",
            product_version: str = __version__) -> dict[str, Any]:
    """One OCSF 1.9.0 API Activity event for record ``seq`` of the chain (keys with no value are left out)."""
    activity = activity_of(record)
    status_id, status = _STATUS[record.outcome]
    severity = _severity(record)
    vault = record.event.startswith("vault.")
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
    actor: dict[str, Any] = {}
    if record.user is not None:
        actor["user"] = {"name": record.user, "uid": record.user}
    if record.agent is not None:
        actor["ai_agent"] = {"uid": record.agent, "name": record.agent.rsplit("/", 1)[-1]}
        metadata["profiles"] = ["ai_operation"]
    api: dict[str, Any] = {"operation": record.action or record.event,
                           "service": {"name": "vault" if vault else PRODUCT_NAME}}
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
    }
    if record.outcome != "success" and record.reason:
        event["status_detail"] = record.reason
    if record.resource is not None:
        event["resources"] = [_resource(record.resource)]
    if record.task is not None:
        delegation: dict[str, Any] = {"uid": record.task, "issuer_uid": origin}
        if record.event == "task.started":
            delegation["created_time"] = event["time"]
        event["delegation"] = delegation
    unmapped = {"event": record.event, "outcome": record.outcome, "reason": record.reason, "lease": record.lease,
                "action": record.action, "revocation": record.revocation, "key_fingerprint": record.key_fingerprint}
    event["unmapped"] = {k: v for k, v in unmapped.items() if v is not None}
    if record.reason:
        event["message"] = f"{record.event}: {record.reason}"
    else:
        event["message"] = record.event
    return event
