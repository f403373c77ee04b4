"""The OCSF mapping (broker.audit.ocsf), pinned by golden events: a change to any field must change a test."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker import __version__
from broker.audit import AuditRecord
from broker.audit.ocsf import OCSF_VERSION, activity_of, to_ocsf

AGENT = "spiffe://example.org/agent/support-1"
T = 1_800_000_000.123456

STARTED = AuditRecord(T, "task.started", "success", user="alice@example.com", agent=AGENT, task="tsk_1",
                      tenant="acme", resource="role:support-triage", action="task.start", reason="ticket 7")
VAULT_READ = AuditRecord(T + 1, "vault.request", "success", user="alice@example.com", agent=AGENT, task="tsk_1",
                         tenant="acme", resource="database/creds/tickets-ro", action="read", lease="lse_1",
                         vault_request_id="0f1e2d3c-aaaa-bbbb-cccc-000000000001",
                         reason="by the issuance token of lease lse_1")


class TestGolden:
    def test_task_started(self) -> None:
        """A task start is an API Activity Create by the delegating user, with the agent as ai_agent and the
        task as the delegation and correlation id."""
        assert to_ocsf(STARTED, 41) == {
            "class_uid": 6003, "class_name": "API Activity",
            "category_uid": 6, "category_name": "Application Activity",
            "activity_id": 1, "activity_name": "Create", "type_uid": 600301, "type_name": "API Activity: Create",
            "severity_id": 1, "severity": "Informational", "status_id": 1, "status": "Success",
            "time": 1_800_000_000_123,
            "metadata": {"version": "1.9.0",
                         "product": {"name": "agent-secrets-broker", "vendor_name": "agent-secrets-broker",
                                     "version": __version__},
                         "uid": "41", "log_name": "agent-broker", "event_code": "task.started",
                         "correlation_uid": "tsk_1", "tenant_uid": "acme", "profiles": ["ai_operation"]},
            "actor": {"user": {"name": "alice@example.com", "uid": "alice@example.com"},
                      "ai_agent": {"uid": AGENT, "name": "support-1"}},
            "api": {"operation": "task.start", "service": {"name": "agent-secrets-broker"}},
            "resources": [{"name": "support-triage", "type": "broker.role", "uid": "role:support-triage"}],
            "delegation": {"uid": "tsk_1", "issuer_uid": "agent-broker", "created_time": 1_800_000_000_123},
            "unmapped": {"event": "task.started", "outcome": "success", "reason": "ticket 7",
                         "action": "task.start"},
            "message": "task.started: ticket 7",
        }

    def test_vault_request(self) -> None:
        """A Vault read made with a task's credential: Read on the Vault path, Vault's request id in api.request."""
        event = to_ocsf(VAULT_READ, 42)
        assert (event["activity_id"], event["type_uid"], event["status_id"]) == (2, 600302, 1)
        assert event["api"] == {"operation": "read", "service": {"name": "vault"},
                                "request": {"uid": "0f1e2d3c-aaaa-bbbb-cccc-000000000001"}}
        assert event["resources"] == [{"name": "database/creds/tickets-ro", "type": "vault.path",
                                       "uid": "database/creds/tickets-ro"}]
        assert event["delegation"] == {"uid": "tsk_1", "issuer_uid": "agent-broker"}
        assert event["unmapped"]["lease"] == "lse_1"
        assert "status_detail" not in event

    def test_unexplained_without_task(self) -> None:
        """A Vault request nobody explains: High severity, no actor user, no delegation, no correlation id."""
        rec = AuditRecord(T, "vault.unexplained", "success", resource="database/creds/tickets-ro", action="read",
                          vault_request_id="r-9", reason="grant path used by token 'root' the broker did not issue")
        event = to_ocsf(rec, 7, origin="prod-eu")
        assert event["severity_id"] == 4 and event["severity"] == "High"
        assert event["actor"] == {}
        assert "delegation" not in event and "correlation_uid" not in event["metadata"]
        assert "profiles" not in event["metadata"]
        assert event["metadata"]["log_name"] == "prod-eu"

    def test_denied_is_a_failure_with_detail(self) -> None:
        """access.denied: status Failure, Medium severity, the reason as status_detail."""
        rec = AuditRecord(T, "access.denied", "denied", agent=AGENT, task="tsk_1", resource="grant:prod-write",
                          action="issue", reason="grant not in role")
        event = to_ocsf(rec, 3)
        assert (event["status_id"], event["status"], event["severity_id"]) == (2, "Failure", 3)
        assert event["status_detail"] == "grant not in role"
        assert event["activity_id"] == 1
        assert event["resources"][0]["type"] == "broker.grant"

    def test_pending_approval_is_other(self) -> None:
        """A pending approval has status Other (99)."""
        rec = AuditRecord(T, "approval.requested", "pending", user="alice@example.com", task="tsk_1",
                          resource="database/creds/tickets-rw", action="issue", reason="needs 1 approval(s)")
        assert to_ocsf(rec, 5)["status_id"] == 99

    def test_time_is_integer_milliseconds_and_json_serialisable(self) -> None:
        """time is an int in ms (rounded), and the event serialises to JSON as is."""
        event = to_ocsf(AuditRecord(0.0015, "task.ended", "success", task="t"), 1)
        assert event["time"] == 2 and isinstance(event["time"], int)
        json.dumps(event)
        assert event["metadata"]["version"] == OCSF_VERSION == "1.9.0"


class TestActivities:
    @pytest.mark.parametrize(("event", "action", "expected"), [
        ("lease.issued", "issue", 1), ("lease.renewed", "renew", 3), ("lease.revoked", None, 4),
        ("lease.expired", None, 4), ("task.ended", None, 4), ("task.revoked", None, 4),
        ("approval.approved", "approve", 3), ("revocation.created", "revoke", 1), ("lock.lifted", "unlock", 4),
        ("vault.request", "create", 1), ("vault.request", "update", 3), ("vault.request", "delete", 4),
        ("vault.request", "list", 2), ("vault.request", "sudo", 99), ("vault.audit_gap", None, 99),
        ("access.denied", "issue", 1), ("access.denied", "task.start", 1),
    ])
    def test_activity_of(self, event: str, action: str | None, expected: int) -> None:
        """Each event (or Vault operation) maps to one OCSF activity; unknown ones to Other."""
        assert activity_of(AuditRecord(T, event, "success", action=action)) == expected

    def test_type_uid_is_class_times_100_plus_activity(self) -> None:
        """type_uid = class_uid * 100 + activity_id for every record kind."""
        for event in ("task.started", "lease.renewed", "lease.revoked", "vault.audit_gap"):
            e: dict[str, Any] = to_ocsf(AuditRecord(T, event, "success"), 1)
            assert e["type_uid"] == e["class_uid"] * 100 + e["activity_id"]
