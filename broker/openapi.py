"""The OpenAPI 3.1 document of the v1 API, built from the wire models so the two cannot drift apart."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel

import broker.errors
from broker import __version__
from broker.models import (
    ApprovalDecision,
    ApprovalList,
    ApprovalOut,
    ApprovalPendingOut,
    AuditPage,
    AuditVerifyOut,
    CredentialOut,
    CredentialRequest,
    DelegatedTaskCreate,
    EndOut,
    HealthOut,
    Jwks,
    LeasePage,
    Problem,
    RenewOut,
    RenewRequest,
    RevocationCreate,
    RevocationLift,
    RevocationList,
    RevocationOut,
    SsfConfiguration,
    TaskCreate,
    TaskGrants,
    TaskOut,
    TaskPage,
)

_APPROVAL_MODELS: tuple[type[BaseModel], ...] = (ApprovalPendingOut, ApprovalOut, ApprovalList, ApprovalDecision)
_MODELS: tuple[type[BaseModel], ...] = (*_APPROVAL_MODELS,
    TaskCreate, TaskOut, CredentialRequest, CredentialOut, RenewRequest, RenewOut, EndOut, AuditPage, HealthOut,
    DelegatedTaskCreate,
    Problem, RevocationCreate, RevocationLift, RevocationOut, RevocationList, LeasePage, TaskPage, AuditVerifyOut,
    SsfConfiguration, Jwks, TaskGrants,
)


# Codes no API route answers with, left out of ``Problem.code``'s enum: raised at start-up
# (invalid_config) or by the SDK itself for a 202 (approval_pending); the console's, shown as HTML pages
# (csrf, sign_in_required); and those caught where they are raised -- the audit verifier reports a broken
# chain or checkpoint in its answer, and the Vault audit tailer and the export sinks run in the background.
NOT_ANSWERED: frozenset[str] = frozenset({
    "invalid_config", "approval_pending", "csrf", "sign_in_required", "audit_chain_broken", "checkpoint_invalid",
    "vault_audit_line_invalid", "audit_export_failed",
    "unreachable", "bad_response",  # the client's own: raised by broker.client, never answered by the broker
    "tool_refused", "host_not_allowed", "upstream_failed",  # broker mcp's tools and the SDK's helpers
})
# What ``api.error_middleware`` answers for aiohttp's own HTTP errors that no BrokerError stands for.
_HTTP_ERROR_CODES = ("method_not_allowed", "http_error")


def problem_codes() -> list[str]:
    """Every ``code`` an API problem can carry: the errors' codes but ``NOT_ANSWERED``, and aiohttp's."""
    codes = {cls.code for cls in vars(broker.errors).values()
             if isinstance(cls, type) and issubclass(cls, broker.errors.BrokerError)}
    return sorted((codes - NOT_ANSWERED).union(_HTTP_ERROR_CODES))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _problems(*statuses: int) -> dict[str, Any]:
    texts = {400: "Malformed request", 401: "Token did not verify", 403: "Denied by the catalog",
             404: "Not found (or not yours)", 409: "Conflict", 410: "Task no longer active",
             413: "Body too large", 415: "The body is not application/json in UTF-8",
             429: "Rate limit or live-credential budget; see Retry-After",
             431: "A request header is larger than the broker accepts (8 KiB)",
             500: "The broker failed; `request_id` names the failure in its log",
             502: "Vault refused or answered badly",
             503: "Vault or the store is unavailable; see Retry-After"}
    return {
        str(s): {"description": texts[s], "content": {"application/problem+json": {"schema": _ref(Problem)}},
                 **({"headers": _HEADERS[s]} if s in _HEADERS else {})}
        for s in statuses
    }


_RETRY_AFTER = {"description": "Seconds to wait before retrying (RFC 9110 §10.2.3)",
                "schema": {"type": "integer", "minimum": 0}}
# Error answers' headers (api.error_middleware): Retry-After with 429 and 503 where the broker knows when;
# WWW-Authenticate with every 401 (RFC 6750 invalid_token, or RFC 9470 insufficient_user_authentication
# with max_age when an approval needs a fresher sign-in).
_HEADERS: dict[int, dict[str, Any]] = {
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
    401: {"WWW-Authenticate": {
        "description": 'Bearer error="invalid_token", or Bearer error="insufficient_user_authentication", '
                       'error_description="...", max_age=N (RFC 9470): sign in again, no longer ago than N s',
        "schema": {"type": "string"}}},
}
# Every operation's id and tags, for generated clients: (method, path) -> (operationId, tag).
_OPERATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("post", "/v1/tasks"): ("startTask", "tasks"),
    ("get", "/v1/tasks"): ("listTasks", "tasks"),
    ("get", "/v1/tasks/{task_id}"): ("getTask", "tasks"),
    ("get", "/v1/tasks/{task_id}/grants"): ("getTaskGrants", "tasks"),
    ("post", "/v1/tasks/{task_id}/end"): ("endTask", "tasks"),
    ("post", "/v1/tasks/{task_id}/credentials"): ("issueCredential", "credentials"),
    ("post", "/v1/leases/{lease_id}/renew"): ("renewLease", "credentials"),
    ("get", "/v1/leases"): ("listLeases", "leases"),
    ("post", "/v1/revocations"): ("createRevocation", "revocations"),
    ("get", "/v1/revocations"): ("listRevocations", "revocations"),
    ("get", "/v1/revocations/{revocation_id}"): ("getRevocation", "revocations"),
    ("delete", "/v1/revocations/{revocation_id}"): ("liftRevocation", "revocations"),
    ("get", "/v1/approvals"): ("listApprovals", "approvals"),
    ("get", "/v1/approvals/{approval_id}"): ("getApproval", "approvals"),
    ("post", "/v1/approvals/{approval_id}"): ("decideApproval", "approvals"),
    ("get", "/v1/audit"): ("listAudit", "audit"),
    ("get", "/v1/audit/verify"): ("verifyAudit", "audit"),
    ("get", "/v1/health"): ("getHealth", "operations"),
    ("get", "/metrics"): ("getMetrics", "operations"),
    ("get", "/v1/openapi.json"): ("getOpenApi", "operations"),
    ("get", "/.well-known/ssf-configuration"): ("getSsfConfiguration", "signals"),
    ("get", "/v1/signals/jwks.json"): ("getSignalKeys", "signals"),
}
_TAGS = [
    {"name": "tasks", "description": "Delegations of a task role by a person to an agent"},
    {"name": "credentials", "description": "What a task's agent obtains and renews"},
    {"name": "leases", "description": "Live and past credentials (operators, auditors)"},
    {"name": "revocations", "description": "Revocations and locks by user, agent, task or tenant (operators)"},
    {"name": "approvals", "description": "High-risk grants decided by people"},
    {"name": "audit", "description": "The tamper-evident record and its verification (auditors)"},
    {"name": "operations", "description": "Health, metrics and this document (unauthenticated)"},
    {"name": "signals", "description": "The Shared Signals transmitter's metadata and keys (unauthenticated)"},
]


def _finish(doc: dict[str, Any]) -> None:
    """Ids, tags and the answers every operation may get: 431 from the HTTP parser, 500 from the middleware.

    Raises:
        KeyError: an operation without an entry in ``_OPERATIONS`` (tests/unit/test_openapi_doc.py).
    """
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            op["operationId"], tag = _OPERATIONS[(method, path)]
            op["tags"] = [tag]
            for status, answer in _problems(431, 500).items():
                op["responses"].setdefault(status, answer)
    doc["tags"] = _TAGS


def _op(summary: str, security: str | None, ok: tuple[int, type[BaseModel]], errors: tuple[int, ...],
        body: type[BaseModel] | None = None, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    # Any request may meet the edge check (a control character or an oversized value in the path or query),
    # and any authenticated one its identity's request rate (429).
    statuses = sorted({400, *errors, *((429,) if security else ())})
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(ok[0]): {"description": "OK", "content": {"application/json": {"schema": _ref(ok[1])}}},
                      **_problems(*statuses)},
    }
    if security:
        op["security"] = [{security: []}]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if params:
        op["parameters"] = params
    return op


def _delegated_start(op: dict[str, Any]) -> None:
    """``POST /v1/tasks`` by an agent with an IdP-issued delegation (RFC 8693): the header, the body, the caller."""
    op["summary"] += ("; or, by an agent with X-Delegation-Token, for the user its IdP says delegated it "
                      "(body without `agent`)")
    op["security"] = [{"user": []}, {"agent": []}]
    op["parameters"] = [{
        "name": "X-Delegation-Token", "in": "header", "required": False,
        "description": "An RFC 8693 token-exchange result from a [[users.delegation_issuers]] issuer: sub = the "
                       "user, act.sub = the calling agent's SPIFFE ID, aud includes the broker, scope holds "
                       "task:<role>, a jti (accepted once). With it, the bearer token is the agent's (JWT-SVID or "
                       "Kubernetes service-account token) and the body is DelegatedTaskCreate. Any failure: 401.",
        # A header line is at most 8,190 bytes, name included (longer: 431 header_too_large from the parser).
        "schema": {"type": "string", "maxLength": 8000}}]
    op["requestBody"]["content"]["application/json"]["schema"] = {"oneOf": [_ref(TaskCreate),
                                                                            _ref(DelegatedTaskCreate)]}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$"}}


def _query(name: str, type_: str = "string", **bounds: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": type_, **bounds}}


_INT64_MAX = 2**63 - 1
_LIMIT = _query("limit", "integer", minimum=1, maximum=1000)


@functools.cache
def spec() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
    schemas[Problem.__name__]["properties"]["code"]["enum"] = problem_codes()
    auth_errors = (400, 401, 403, 404, 409, 410, 413, 415, 429, 502, 503)
    filters = [_query("user"), _query("agent"), _query("tenant"), _query("state"), _query("after"), _LIMIT]
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Agent secrets broker", "version": __version__,
                 "description": "Task-scoped, short-lived Vault credentials for AI agents, delegated by people."},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "user": {"type": "http", "scheme": "bearer", "bearerFormat": "OIDC ID token"},
                "agent": {"type": "http", "scheme": "bearer",
                          "bearerFormat": "JWT-SVID or Kubernetes projected service-account token"},
            },
        },
        "paths": {
            "/v1/tasks": {"post": _op("Start a task: delegate a role to an agent", "user", (201, TaskOut),
                                      (400, 401, 403, 413, 415, 429, 502, 503), body=TaskCreate),
                          "get": _op("Tasks, filtered and paged (operators, auditors)", "user", (200, TaskPage),
                                     (400, 401, 403, 503), params=filters)},
            "/v1/leases": {"get": _op("Leases, filtered and paged (operators, auditors)", "user", (200, LeasePage),
                                      (400, 401, 403, 503), params=[*filters, _query("task")])},
            "/v1/revocations": {
                "post": {**_op("Revoke by user, agent, task or tenant; user/agent/tenant also lock (operators). "
                               "200 when Vault confirmed everything within `wait`, else 202", "user",
                               (200, RevocationOut), (400, 401, 403, 413, 415, 503), body=RevocationCreate)},
                "get": _op("Revocations and locks; ?active=true for live locks (operators, auditors)", "user",
                           (200, RevocationList), (400, 401, 403, 503), params=[_query("active", "boolean")]),
            },
            "/v1/revocations/{revocation_id}": {
                "get": _op("A revocation's progress (operators, auditors)", "user", (200, RevocationOut),
                           (401, 403, 404, 503), params=[_path_param("revocation_id")]),
                "delete": _op("Lift a revocation's lock (operators)", "user", (200, RevocationOut),
                              (400, 401, 403, 404, 413, 415, 503), body=RevocationLift,
                              params=[_path_param("revocation_id")]),
            },
            "/v1/tasks/{task_id}": {"get": {**_op("A task and its leases (its user, its agent, operators, auditors)",
                                                  "user", (200, TaskOut), (401, 404, 503),
                                                  params=[_path_param("task_id")]),
                                            "security": [{"user": []}, {"agent": []}]}},
            "/v1/tasks/{task_id}/grants": {"get": {**_op(
                "The task's grants: risk, how each ends, where its credential is used (as GET /v1/tasks/{id})",
                "user", (200, TaskGrants), (401, 404, 503), params=[_path_param("task_id")]),
                "security": [{"user": []}, {"agent": []}]}},
            "/v1/tasks/{task_id}/credentials": {"post": _op(
                "Obtain a grant's credential for the task (the task's agent)", "agent", (200, CredentialOut),
                auth_errors, body=CredentialRequest, params=[_path_param("task_id")])},
            "/v1/tasks/{task_id}/end": {"post": {**_op(
                "End the task and revoke everything it holds (its user or agent). 200 when Vault confirmed "
                "everything gone; 202 revoke_pending when Vault answered but is still revoking, or refused one "
                "revocation (the broker retries; poll the task); "
                "503 when Vault or the store is down", "user", (200, EndOut),
                (401, 404, 429, 502, 503), params=[_path_param("task_id")]),
                "security": [{"user": []}, {"agent": []}]}},
            "/v1/leases/{lease_id}/renew": {"post": _op(
                "Extend a lease, never past its task's end (the task's agent)", "agent", (200, RenewOut),
                auth_errors, body=RenewRequest, params=[_path_param("lease_id")])},
            "/v1/audit": {"get": _op("Audit records, oldest first (auditors)", "user", (200, AuditPage),
                                     (400, 401, 403, 503),
                                     params=[_query("user"), _query("agent"), _query("task"),
                                             _query("since", "number", minimum=0, maximum=1e11),
                                             _query("until", "number", minimum=0, maximum=1e11),
                                             _query("after", "integer", minimum=0, maximum=_INT64_MAX), _LIMIT])},
            "/v1/audit/verify": {"get": _op("Recompute the audit chain and check every signed checkpoint (auditors)",
                                            "user", (200, AuditVerifyOut), (401, 403, 503))},
            "/v1/health": {"get": {**_op("Readiness for issuing: Vault answers and the store commits a write "
                                         "(probes cached for about a second)", None, (200, HealthOut), ()),
                                   "responses": {
                                       "200": {"description": "Ready",
                                               "content": {"application/json": {"schema": _ref(HealthOut)}}},
                                       "503": {"description": "Not ready: `vault` or `store` names the part "
                                                              "that is down",
                                               "content": {"application/json": {"schema": _ref(HealthOut)}}}}}},
            "/v1/openapi.json": {"get": {"summary": "This document",
                                         "responses": {"200": {"description": "OpenAPI 3.1",
                                                               "content": {"application/json": {}}}}}},
        },
    }
    _delegated_start(doc["paths"]["/v1/tasks"]["post"])
    doc["paths"]["/v1/tasks/{task_id}/credentials"]["post"]["responses"]["202"] = {
        "description": "A high-risk grant: nothing issued; an approval is pending (poll it, then repeat the request "
                       "with its approval_id)",
        "content": {"application/json": {"schema": _ref(ApprovalPendingOut)}},
    }
    doc["paths"]["/v1/approvals"] = {"get": _op(
        "Approvals with the full request; ?state=pending for the queue (approvers, auditors)", "user",
        (200, ApprovalList), (400, 401, 403, 503), params=[_query("state")])}
    doc["paths"]["/v1/approvals/{approval_id}"] = {
        "get": {**_op("An approval's state; ?wait=N long-polls up to 60 s (its agent, approvers, auditors)", "agent",
                      (200, ApprovalOut), (400, 401, 403, 404, 429, 503),
                      params=[_path_param("approval_id"), _query("wait", "number", minimum=0, maximum=60)]),
                "security": [{"agent": []}, {"user": []}]},
        "post": _op("Approve or deny (approvers with an authentication no older than people.approval_max_auth_age; "
                    "401 insufficient_user_authentication otherwise)", "user", (200, ApprovalOut),
                    (400, 401, 403, 404, 409, 413, 415, 429, 503), body=ApprovalDecision,
                    params=[_path_param("approval_id")]),
    }
    doc["paths"]["/metrics"] = {"get": {
        "summary": "Prometheus metrics (bounded labels only: never an identity, an id, a path or a secret)",
        "responses": {"200": {"description": "Prometheus text exposition format, version 0.0.4",
                              "content": {"text/plain": {}}}}}}
    doc["paths"]["/v1/tasks/{task_id}/end"]["post"]["responses"]["202"] = {
        "description": "Ended; Vault answered the revocation but has not confirmed every lease gone yet "
                       "(revocation: revoke_pending). The broker keeps confirming; GET /v1/tasks/{task_id} "
                       "shows `revocation` until it is revoked",
        "content": {"application/json": {"schema": _ref(EndOut)}},
    }
    _add_signal_paths(doc)
    doc["paths"]["/v1/revocations"]["post"]["responses"]["202"] = {
        "description": "Fenced and locked; Vault has not confirmed every lease yet (poll the revocation)",
        "content": {"application/json": {"schema": _ref(RevocationOut)}},
    }
    _finish(doc)
    return doc


def _add_signal_paths(doc: dict[str, Any]) -> None:
    """The SSF transmitter's public documents (broker.signals.web): 404 when [signals] is not configured."""
    from broker.signals.web import CONFIGURATION_PATH, JWKS_PATH

    for path, summary, model in (
        (CONFIGURATION_PATH, "SSF 1.0 Transmitter Configuration Metadata: issuer, jwks_uri, push delivery",
         SsfConfiguration),
        (JWKS_PATH, "The keys that sign the broker's Security Event Tokens (the signing key first)", Jwks),
    ):
        doc["paths"][path] = {"get": {"summary": summary, "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": _ref(model)}}},
            **_problems(400, 404)}}}
