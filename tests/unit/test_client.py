"""The one client to the broker: its problem+json decoder, and the CLI's lines for what the client raises."""

from __future__ import annotations

import pytest

from broker import errors
from broker.cli.common import failure
from broker.client import (
    BadResponse,
    ProblemResponse,
    Unreachable,
    decode_problem,
    problem_of,
)


def raised(problem: ProblemResponse) -> errors.BrokerError:
    """What ``BrokerClient.call`` raises for ``problem``: its error, caused by it."""
    try:
        raise problem.error() from problem
    except errors.BrokerError as exc:
        return exc


def server_codes() -> list[type[errors.BrokerError]]:
    return [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.BrokerError)]


class TestDecodeProblem:
    @pytest.mark.parametrize("cls", server_codes(), ids=lambda cls: cls.code)
    def test_every_code_becomes_its_class(self, cls: type[errors.BrokerError]) -> None:
        """Each code the broker can answer with comes back as exactly the class that carries it."""
        exc = decode_problem(cls.http_status, {"code": cls.code, "title": cls.title, "detail": "why"}).error()
        assert type(exc) is cls

    def test_detail_is_the_message(self) -> None:
        """The problem's detail is what the caller reads, whatever the class's own constructor would say."""
        assert str(decode_problem(403, {"code": "locked", "detail": "user is locked"}).error()) == "user is locked"
        exc = decode_problem(401, {"code": "invalid_token", "detail": "the bearer token was not accepted"}).error()
        assert isinstance(exc, errors.InvalidIdentity) and str(exc) == "the bearer token was not accepted"

    def test_unknown_code_and_non_problem_bodies(self) -> None:
        """An unknown code, a proxy's HTML page or a JSON list are a plain BrokerError named by the status."""
        for payload in ({"code": "method_not_allowed"}, None, ["x"], "<html>"):
            exc = decode_problem(502, payload, reason="Bad Gateway").error()
            assert type(exc) is errors.BrokerError and str(exc) == "HTTP 502"

    def test_retry_after(self) -> None:
        """Retry-After in whole seconds reaches the error; anything else is ignored, never an exception."""
        assert decode_problem(429, {"code": "rate_limited"}, retry_after="7").error().retry_after == 7
        assert decode_problem(503, {"code": "store_unavailable"}, retry_after="soon").error().retry_after == 5
        assert decode_problem(503, {}, retry_after="2.5").retry_after == 2.5
        assert decode_problem(503, {}, retry_after="2.5").error().retry_after is None

    def test_the_answer_rides_along(self) -> None:
        """problem_of gives the answer exactly as sent: status, code, title, detail."""
        exc = raised(decode_problem(404, {"code": "not_found", "title": "Not found", "detail": "no such task"}))
        problem = problem_of(exc)
        assert problem is not None
        assert (problem.status, problem.code, problem.title, problem.detail) == (404, "not_found", "Not found",
                                                                                 "no such task")
        assert problem_of(errors.NotFound("x")) is None


class TestFailureLines:
    def test_problem(self) -> None:
        """An error answer: the title, detail and code as sent; 403 exits 2; the token is redacted."""
        exc = raised(decode_problem(403, {"code": "denied", "title": "Denied", "detail": "not for tok123"}))
        end = failure(exc, "tok123")
        assert (end.line, end.exit_code, end.status) == ("error: Denied: not for <redacted> (denied)", 2, 403)

    def test_unknown_code_keeps_the_code_sent(self) -> None:
        """A code the client has no class for is still printed as the broker sent it."""
        exc = raised(decode_problem(405, {"code": "method_not_allowed", "title": "Method Not Allowed"}))
        assert failure(exc, "").line == "error: Method Not Allowed: Method Not Allowed (method_not_allowed)"

    def test_unreachable_and_bad_response(self) -> None:
        """No answer is status 0 (worth polling again); a 200 without JSON keeps its status."""
        end = failure(Unreachable("http://127.0.0.1:9", "ClientConnectorError"), "")
        assert (end.line, end.exit_code, end.status) == (
            "error: cannot reach the broker at http://127.0.0.1:9: ClientConnectorError (unreachable)", 1, 0)
        end = failure(BadResponse("HTTP 200 without a JSON object", status=200), "")
        assert (end.line, end.status) == (
            "error: unexpected answer from the broker: HTTP 200 without a JSON object (bad_response)", 200)
