"""One error module: every BrokerError in broker/errors.py, one code each, all known to the SDK and the API document."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import broker
from broker import api, client, errors, openapi

# Codes no API route answers with, each for the reason given; everything else must be in the OpenAPI
# document's ``Problem.code``. Changing this list is a decision, not an accident.
NEVER_ANSWERED: dict[str, str] = {
    "invalid_config": "ConfigError: raised at start-up",
    "approval_pending": "ApprovalPending: raised by the SDK itself for a 202 answer",
    "csrf": "CsrfRefused: the console answers with an HTML page",
    "sign_in_required": "SignInRequired: the console redirects, or answers with an HTML page",
    "audit_chain_broken": "AuditChainBroken: the verifier reports it in its answer (AuditVerifyOut)",
    "checkpoint_invalid": "CheckpointInvalid: the verifier reports it in its answer (AuditVerifyOut)",
    "vault_audit_line_invalid": "AuditLineInvalid: the Vault audit tailer and `broker audit verify` skip the line",
    "audit_export_failed": "ExportFailed: the background export retries; requests meet audit_backlog",
    "unreachable": "Unreachable: broker.client got no answer from the broker",
    "bad_response": "BadResponse: broker.client got an answer it cannot use",
    "tool_refused": "ToolRefused: broker mcp's tools and the SDK's helpers refuse a request they will not make",
    "host_not_allowed": "HostNotAllowed: an HTTP grant's credential would leave its allow-list (tools, SDK)",
    "upstream_failed": "UpstreamFailed: a grant's own server failed under a tool or an SDK helper",
}


def all_errors() -> list[type[errors.BrokerError]]:
    """BrokerError and every subclass, after importing the whole package (so none defined elsewhere hides)."""
    for module in pkgutil.walk_packages(broker.__path__, "broker."):
        if module.name != "broker.__main__":  # runs the CLI
            importlib.import_module(module.name)
    found: list[type[errors.BrokerError]] = []
    todo: list[type[errors.BrokerError]] = [errors.BrokerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def documented_codes() -> list[str]:
    codes: list[str] = openapi.spec()["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
    return codes


class TestOneModule:
    def test_every_error_is_defined_in_broker_errors(self) -> None:
        """No BrokerError subclass lives outside broker/errors.py."""
        elsewhere = sorted(f"{c.__module__}.{c.__qualname__}" for c in all_errors() if c.__module__ != "broker.errors")
        assert not elsewhere, f"move these to broker/errors.py: {elsewhere}"

    def test_every_error_is_in_the_hierarchy_tree(self) -> None:
        """The module docstring's tree names every class with its status and code."""
        assert errors.__doc__ is not None
        for cls in all_errors():
            assert f"{cls.__name__} ({cls.http_status} {cls.code}" in errors.__doc__, cls.__name__

    def test_codes_are_unique(self) -> None:
        """A code names one class: clients (and the SDK) tell errors apart by it."""
        seen: dict[str, str] = {}
        for cls in all_errors():
            assert cls.code not in seen, f"{cls.__name__} and {seen[cls.code]} share {cls.code!r}"
            seen[cls.code] = cls.__name__


class TestSdk:
    def test_the_sdk_maps_every_code_to_its_class(self) -> None:
        """The SDK's code map holds every error, each under its own code."""
        assert {code: cls.__name__ for code, cls in client._ERRORS.items()} == {
            cls.code: cls.__name__ for cls in all_errors()
        }

    @pytest.mark.parametrize("cls", all_errors(), ids=lambda c: c.__name__)
    def test_every_problem_decodes_into_its_class(self, cls: type[errors.BrokerError]) -> None:
        """A problem document becomes an instance of exactly its class, with the broker's detail as message."""
        exc = client.decode_error(cls.http_status, {"code": cls.code, "detail": "what the broker said"}, {})
        assert type(exc) is cls
        assert str(exc) == "what the broker said" and exc.reason == "what the broker said"

    def test_decoded_errors_carry_the_headers_they_need(self) -> None:
        """Retry-After becomes retry_after; insufficient_user_authentication's max_age comes from WWW-Authenticate."""
        limited = client.decode_error(429, {"code": "budget_exceeded", "detail": "d"}, {"Retry-After": "7"})
        assert isinstance(limited, errors.BudgetExceeded) and limited.retry_after == 7
        stale = client.decode_error(401, {"code": "insufficient_user_authentication", "detail": "sign in again"}, {
            "WWW-Authenticate": 'Bearer error="insufficient_user_authentication", error_description="x", max_age=300'})
        assert isinstance(stale, errors.InsufficientAuthentication) and stale.max_age == 300

    def test_an_unknown_code_is_a_plain_broker_error(self) -> None:
        """A code this SDK does not know (a newer broker's) is still a BrokerError, not a crash."""
        exc = client.decode_error(418, {"code": "from_the_future", "detail": "d"}, {})
        assert type(exc) is errors.BrokerError and str(exc) == "d"
        assert type(client.decode_error(502, None, {})) is errors.BrokerError


class TestOpenApi:
    def test_the_document_lists_every_answered_code(self) -> None:
        """Problem.code's enum is every error's code but the never-answered ones, and aiohttp's own."""
        codes = {cls.code for cls in all_errors()}
        assert set(NEVER_ANSWERED) <= codes, "a never-answered code that no error has any more"
        assert set(openapi.NOT_ANSWERED) == set(NEVER_ANSWERED)
        assert documented_codes() == sorted(codes - set(NEVER_ANSWERED) | {"method_not_allowed", "http_error"})

    @pytest.mark.parametrize(
        ("raised", "code"),
        [
            (web.HTTPNotFound(), "not_found"),
            (web.HTTPMethodNotAllowed("PUT", ["GET"]), "method_not_allowed"),
            (web.HTTPRequestEntityTooLarge(1024, 2048), "payload_too_large"),
            (web.HTTPBadGateway(), "http_error"),
            (RuntimeError("boom"), "internal"),
            (errors.Locked("locked"), "locked"),
        ],
    )
    async def test_the_middleware_answers_only_documented_codes(self, raised: Exception, code: str) -> None:
        """What error_middleware answers for aiohttp's exceptions and for a crash is in the document too."""
        async def handler(request: web.Request) -> web.StreamResponse:
            raise raised

        respond: Callable[[web.Request], Awaitable[web.StreamResponse]] = handler
        request = make_mocked_request("PUT", "/v1/tasks")
        request.match_info.route.resource.canonical = "/v1/tasks"  # make_mocked_request's route is a Mock
        resp = await api.error_middleware(request, respond)
        assert isinstance(resp, web.Response) and isinstance(resp.text, str)
        assert f'"code":"{code}"' in resp.text
        assert code in documented_codes()
