"""Every error the broker raises on purpose.

Each class carries a stable ``code`` (the problem ``type`` suffix clients match on) and the HTTP status
the API answers with. Messages are written for the caller and never contain a secret, a token or a
password; detail meant only for the audit trail goes in ``reason``.

Hierarchy::

    BrokerError (500 internal)
    ├── BadRequest (400 bad_request)
    │   ├── ConfigError (400 invalid_config)         -- raised at start-up, never over HTTP
    │   ├── MalformedJson (400 invalid_json)         -- not UTF-8 JSON, or a repeated member name
    │   ├── JsonTooDeep (400 json_too_deep)
    │   └── NumberOutOfRange (400 number_out_of_range) -- NaN, Infinity, beyond int64 or the query's bounds
    ├── UnsupportedMediaType (415 unsupported_media_type) -- a body that is not application/json (UTF-8)
    ├── HeaderTooLarge (431 header_too_large)        -- answered by the broker, not by aiohttp's parser
    ├── InvalidIdentity (401 invalid_token)          -- one generic message whatever failed (no oracle)
    │   ├── InsufficientAuthentication (401 insufficient_user_authentication) -- RFC 9470: sign in again
    │   └── SignInRequired (401 sign_in_required)    -- the console: no live session (a page, never a problem)
    ├── Denied (403 denied)
    │   ├── NotDelegator (403 not_delegator)
    │   ├── AgentNotAllowed (403 agent_not_allowed)
    │   ├── NotTaskAgent (403 not_task_agent)
    │   ├── GrantNotInRole (403 grant_not_in_role)
    │   ├── Locked (403 locked)                        -- an operator's lock on the user, agent or tenant
    │   ├── ApprovalRequired (403 approval_required)   -- a high-risk grant, and no approvers configured
    │   ├── ApprovalMismatch (403 approval_mismatch)   -- the approval was given for another request
    │   ├── NotApprover (403 not_approver)
    │   └── CsrfRefused (403 csrf)                     -- the console: a form not sent from it (a page)
    ├── NotFound (404 not_found)
    ├── Conflict (409 conflict)
    ├── Gone (410 gone)                                -- the task is no longer active
    ├── RateLimited (429 rate_limited, Retry-After)
    │   └── BudgetExceeded (429 budget_exceeded)
    ├── PayloadTooLarge (413 payload_too_large)
    ├── StoreUnavailable (503 store_unavailable)       -- the store cannot be written
    ├── AuditBacklogFull (503 audit_backlog, Retry-After) -- the audit export is behind: nothing is issued
    ├── ExportFailed (503 audit_export_failed)         -- an export sink did not take a batch (background)
    ├── AuditChainBroken (500 audit_chain_broken)      -- verification reports it; never a problem
    ├── CheckpointInvalid (500 checkpoint_invalid)     -- verification reports it; never a problem
    ├── AuditLineInvalid (500 vault_audit_line_invalid) -- a Vault audit line that is not an entry (tailer)
    ├── SealBroken (500 seal_broken)                   -- a sealed task token does not open with the key
    ├── ApprovalPending (202 approval_pending)         -- raised by the SDK for a 202 answer, never sent
    ├── Unreachable (503 unreachable)                  -- the client got no answer from the broker, never sent
    ├── BadResponse (502 bad_response)                 -- the client got an answer it cannot use, never sent
    ├── ToolRefused (400 tool_refused)                 -- `broker mcp`/SDK helpers: not for this grant or input
    │   └── HostNotAllowed (403 host_not_allowed)      -- an HTTP grant's credential, to a host off its list
    ├── UpstreamFailed (502 upstream_failed)           -- the grant's own server (database, Redis, HTTP) failed
    └── VaultError (502 vault_error)
        ├── VaultDenied (502 vault_denied)            -- Vault refused the broker: a setup problem
        ├── VaultBadResponse (502 vault_bad_response)
        ├── VaultTLSFailed (502 vault_tls_failed)     -- no TLS handshake with Vault: [vault].ca_cert, or an attack
        └── VaultUnavailable (503 vault_unavailable)  -- unreachable, sealed, standby: retry later

Every code is unique, the SDK decodes each into its class, and the OpenAPI document lists every code an
API route can answer (``tests/unit/test_errors.py``).
"""

from __future__ import annotations

from typing import ClassVar


class BrokerError(Exception):
    """Root of the broker's errors.

    ``reason`` is detail for the audit record and logs (still never a secret); ``str(self)`` is what the
    caller sees.
    """

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    retry_after: int | None = None

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message or self.title)
        self.reason = reason or message or self.title


class BadRequest(BrokerError):
    code = "bad_request"
    http_status = 400
    title = "Malformed request"


class ConfigError(BadRequest):
    code = "invalid_config"
    title = "Invalid configuration"


class MalformedJson(BadRequest):
    code = "invalid_json"
    title = "The body is not valid JSON"


class JsonTooDeep(BadRequest):
    code = "json_too_deep"
    title = "The body is nested too deeply"


class NumberOutOfRange(BadRequest):
    code = "number_out_of_range"
    title = "A number is out of range"


class UnsupportedMediaType(BrokerError):
    code = "unsupported_media_type"
    http_status = 415
    title = "The body must be application/json in UTF-8"


class HeaderTooLarge(BrokerError):
    code = "header_too_large"
    http_status = 431
    title = "Request header fields too large"


class InvalidIdentity(BrokerError):
    """A token did not verify. The caller always sees the same message; ``reason`` says why."""

    code = "invalid_token"
    http_status = 401
    title = "Invalid credentials"

    def __init__(self, reason: str) -> None:
        super().__init__("the bearer token was not accepted", reason=reason)


class InsufficientAuthentication(InvalidIdentity):
    """RFC 9470: the approver's authentication is too old; re-authenticate and try again."""

    code = "insufficient_user_authentication"
    title = "Re-authentication required"

    def __init__(self, reason: str, *, max_age: int) -> None:
        super().__init__(reason)
        self.args = (f"sign in again (authentication no older than {max_age} s) to decide approvals",)
        self.max_age = max_age


class SignInRequired(InvalidIdentity):
    """No (live) console session: GET pages redirect to sign-in, POSTs get a 401 page."""

    code = "sign_in_required"
    title = "Sign in required"

    def __init__(self) -> None:
        super().__init__("no console session")
        self.args = ("your session has ended or you have not signed in",)


class Denied(BrokerError):
    code = "denied"
    http_status = 403
    title = "Denied"


class NotDelegator(Denied):
    code = "not_delegator"
    title = "User may not delegate this role"


class AgentNotAllowed(Denied):
    code = "agent_not_allowed"
    title = "Agent may not take this role"


class NotTaskAgent(Denied):
    code = "not_task_agent"
    title = "Caller is not this task's agent"


class GrantNotInRole(Denied):
    code = "grant_not_in_role"
    title = "Grant is not part of the task's role"


class Locked(Denied):
    """An operator's revocation locked the user, agent or tenant: nothing new until it is lifted."""

    code = "locked"
    title = "Locked by an operator"


class ApprovalRequired(Denied):
    """A high-risk grant where no approval can be had (no approvers configured): refused outright."""

    code = "approval_required"
    title = "This grant needs a human approval"


class ApprovalMismatch(Denied):
    code = "approval_mismatch"
    title = "The approval does not cover this request"


class NotApprover(Denied):
    code = "not_approver"
    title = "Not allowed to decide this approval"


class CsrfRefused(Denied):
    """A POST without the right synchronizer token or without same-origin evidence."""

    code = "csrf"
    title = "Form refused"


class NotFound(BrokerError):
    code = "not_found"
    http_status = 404
    title = "Not found"


class Conflict(BrokerError):
    code = "conflict"
    http_status = 409
    title = "Conflict"


class Gone(BrokerError):
    code = "gone"
    http_status = 410
    title = "Task is no longer active"


class RateLimited(BrokerError):
    code = "rate_limited"
    http_status = 429
    title = "Too many requests"

    def __init__(self, message: str = "", *, reason: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"
    title = "Live credential budget exhausted"


class PayloadTooLarge(BrokerError):
    code = "payload_too_large"
    http_status = 413
    title = "Payload too large"


class StoreUnavailable(BrokerError):
    code = "store_unavailable"
    http_status = 503
    title = "Store unavailable"
    retry_after = 5


class AuditBacklogFull(BrokerError):
    """The export sinks are more than ``export_backlog_limit`` records behind: no issuance until they catch up."""

    code = "audit_backlog"
    http_status = 503
    title = "The audit export is behind; try again later"
    retry_after = 5


class ExportFailed(BrokerError):
    """A sink did not take a batch (after its retries): the batch stays in the backlog."""

    code = "audit_export_failed"
    http_status = 503
    title = "An audit export sink is unavailable"


class AuditChainBroken(BrokerError):
    """The chain does not verify; ``first_bad_seq`` is the first record that is not proven."""

    code = "audit_chain_broken"
    http_status = 500
    title = "The audit chain does not verify"

    def __init__(self, first_bad_seq: int, reason: str) -> None:
        super().__init__(f"audit chain broken at record {first_bad_seq}", reason=reason)
        self.first_bad_seq = first_bad_seq


class CheckpointInvalid(BrokerError):
    """A checkpoint is malformed, names another origin or key, or its signature does not verify."""

    code = "checkpoint_invalid"
    http_status = 500
    title = "A checkpoint does not verify"


class AuditLineInvalid(BrokerError):
    """A line of the Vault audit file is not an audit entry (not JSON, or missing what every entry has)."""

    code = "vault_audit_line_invalid"
    title = "Invalid Vault audit line"


class SealBroken(BrokerError):
    code = "seal_broken"
    title = "A sealed task token could not be opened"


class Unreachable(BrokerError):
    """No answer: the connection failed or the request timed out. ``reason`` names the aiohttp exception."""

    code = "unreachable"
    http_status = 503
    title = "Cannot reach the broker"

    def __init__(self, url: str, reason: str) -> None:
        super().__init__("cannot reach the broker", reason=reason)
        self.url = url


class BadResponse(BrokerError):
    """An answer the client cannot use, such as a 200 without a JSON object."""

    code = "bad_response"
    http_status = 502
    title = "Unexpected answer from the broker"

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ApprovalPending(BrokerError):
    """Raised by the SDK, never sent: a high-risk grant waits for people (the API answers 202 with the approval).

    ``approval_id`` is what to wait on, ``state`` where it stands.
    """

    code = "approval_pending"
    http_status = 202
    title = "Waiting for approval"

    def __init__(self, approval_id: str, state: str) -> None:
        super().__init__(f"approval {approval_id} is {state}")
        self.approval_id = approval_id
        self.state = state


class ToolRefused(BrokerError):
    """Raised by ``broker mcp``'s tools and the SDK's helpers, never sent: a request they will not make.

    A grant used by the wrong tool, a command that would change the connection's identity, input over a limit.
    """

    code = "tool_refused"
    http_status = 400
    title = "Refused by the tool"


class HostNotAllowed(ToolRefused):
    """An HTTP grant's credential would go to a host that the grant's ``allowed_hosts`` does not name."""

    code = "host_not_allowed"
    http_status = 403
    title = "Host not allowed for this grant"


class UpstreamFailed(BrokerError):
    """The server a grant names (its database, Redis, HTTP API) failed or refused; the message is redacted."""

    code = "upstream_failed"
    http_status = 502
    title = "The grant's server failed"


class VaultError(BrokerError):
    code = "vault_error"
    http_status = 502
    title = "Vault error"


class VaultDenied(VaultError):
    code = "vault_denied"
    title = "Vault refused the request"


class VaultTLSFailed(VaultError):
    """The TLS handshake with Vault failed (its certificate refused, a host name it does not name, no TLS at
    that address): nothing was sent. A configuration problem or an attack, never "retry later";
    ``[vault].ca_cert`` names the CA that signs Vault's certificate."""

    code = "vault_tls_failed"
    title = "TLS with Vault failed"


class VaultBadResponse(VaultError):
    code = "vault_bad_response"
    title = "Unexpected answer from Vault"


class VaultUnavailable(VaultError):
    code = "vault_unavailable"
    http_status = 503
    title = "Vault unavailable"
    retry_after = 5
