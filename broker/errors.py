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
    │   └── InsufficientAuthentication (401 insufficient_user_authentication)  -- RFC 9470 step-up
    ├── Denied (403 denied)
    │   ├── NotApprover (403 not_approver)
    │   ├── ApprovalMismatch (403 approval_mismatch)
    │   ├── NotDelegator (403 not_delegator)
    │   ├── AgentNotAllowed (403 agent_not_allowed)
    │   ├── NotTaskAgent (403 not_task_agent)
    │   ├── GrantNotInRole (403 grant_not_in_role)
    │   └── Locked (403 locked)                        -- an operator's lock on the user, agent or tenant
    ├── NotFound (404 not_found)
    ├── Conflict (409 conflict)
    ├── Gone (410 gone)                                -- the task is no longer active
    ├── RateLimited (429 rate_limited, Retry-After)
    │   └── BudgetExceeded (429 budget_exceeded)
    ├── PayloadTooLarge (413 payload_too_large)
    └── VaultError (502 vault_error)
        ├── VaultDenied (502 vault_denied)            -- Vault refused the broker: a setup problem
        ├── VaultBadResponse (502 vault_bad_response)
        └── VaultUnavailable (503 vault_unavailable)  -- unreachable, sealed, standby: retry later
        StoreUnavailable (503 store_unavailable)      -- (a BrokerError) the store cannot be written
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


class Denied(BrokerError):
    code = "denied"
    http_status = 403
    title = "Denied"


class NotApprover(Denied):
    code = "not_approver"
    title = "Not allowed to decide this approval"


class ApprovalMismatch(Denied):
    code = "approval_mismatch"
    title = "The approval does not cover this request"


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


class VaultError(BrokerError):
    code = "vault_error"
    http_status = 502
    title = "Vault error"


class VaultDenied(VaultError):
    code = "vault_denied"
    title = "Vault refused the request"


class VaultBadResponse(VaultError):
    code = "vault_bad_response"
    title = "Unexpected answer from Vault"


class VaultUnavailable(VaultError):
    code = "vault_unavailable"
    http_status = 503
    title = "Vault unavailable"
    retry_after = 5
