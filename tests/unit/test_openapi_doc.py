"""The OpenAPI document says what the API really does: ids and tags, headers, bounds, and the durations it takes.

The durations are checked both ways: every value the wire models accept matches the document's schema
(validated with ``jsonschema``, which schemathesis uses too), and every value they refuse does not.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from broker.models import DURATION_SCHEMA, CredentialRequest, RenewRequest, TaskCreate
from broker.openapi import spec

OPERATIONS = [(path, method, op) for path, ops in spec()["paths"].items() for method, op in ops.items()]


class TestOperations:
    def test_every_operation_has_a_unique_id_and_a_declared_tag(self) -> None:
        """Generated clients get one method per operation, grouped by a tag the document describes."""
        ids = [op["operationId"] for _, _, op in OPERATIONS]
        assert len(ids) == len(set(ids)) == len(OPERATIONS)
        declared = {t["name"] for t in spec()["tags"]}
        assert all(len(op["tags"]) == 1 and op["tags"][0] in declared for _, _, op in OPERATIONS)

    @pytest.mark.parametrize(("path", "method", "op"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
    def test_every_operation_documents_431_and_500(self, path: str, method: str, op: dict[str, Any]) -> None:
        """The HTTP parser's 431 and the middleware's 500 can meet any request."""
        assert {"431", "500"} <= set(op["responses"])

    def test_retry_after_and_www_authenticate_are_documented(self) -> None:
        """Every 429 and 503 problem names Retry-After; every 401 names WWW-Authenticate."""
        for _, _, op in OPERATIONS:
            for status, answer in op["responses"].items():
                if status in ("429", "503") and "problem+json" in str(answer.get("content")):
                    assert answer["headers"]["Retry-After"]["schema"]["type"] == "integer"
                if status == "401":
                    assert "WWW-Authenticate" in answer["headers"]

    def test_ending_a_task_documents_202_revoke_pending(self) -> None:
        """The end answers 200 or 202 with the same model, whose `revocation` says which."""
        responses = spec()["paths"]["/v1/tasks/{task_id}/end"]["post"]["responses"]
        assert responses["202"]["content"] == responses["200"]["content"]
        end = spec()["components"]["schemas"]["EndOut"]["properties"]
        assert end["revocation"]["enum"] == ["revoke_pending", "revoked"]

    def test_waits_are_bounded(self) -> None:
        """A long poll's `wait` and a revocation's `wait` have a documented maximum (60 s, as the code enforces)."""
        poll = next(p for p in spec()["paths"]["/v1/approvals/{approval_id}"]["get"]["parameters"]
                    if p["name"] == "wait")
        assert poll["schema"]["maximum"] == 60
        assert spec()["components"]["schemas"]["RevocationCreate"]["properties"]["wait"]["maximum"] == 60


ACCEPTED = [1, 600, 600.0, "600", "0600", "15m", "1h30m", "90s", "2h", "1m30s", 31_622_400]
REFUSED = [0, -5, 600.5, "", " 600", "600 ", "15 m", "1.5h", "15min", "m", "h1", "-60", True, None, [], {},
           "1" * 21, 31_622_401, float("inf")]


class TestDurations:
    @pytest.mark.parametrize("value", ACCEPTED, ids=repr)
    def test_what_the_models_take_the_document_allows(self, value: object) -> None:
        """600, 600.0 (an integer in JSON Schema), "600", "15m": accepted by the code and by the schema."""
        assert TaskCreate(agent="a", role="r", ttl=value, reason="x").ttl >= 1  # type: ignore[arg-type]
        jsonschema.validate(value, DURATION_SCHEMA)

    @pytest.mark.parametrize("value", REFUSED, ids=repr)
    def test_what_the_models_refuse_the_document_refuses(self, value: object) -> None:
        """600.5, " 600", "1.5h", 0, booleans: refused by the code and by the schema (so a fuzzer's negative case
        is refused, and a generated client never sends one)."""
        with pytest.raises(ValueError, match="ttl"):
            TaskCreate(agent="a", role="r", ttl=value, reason="x")  # type: ignore[arg-type]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, DURATION_SCHEMA)

    def test_every_duration_field_carries_the_schema(self) -> None:
        """ttl and increment in the document are DURATION_SCHEMA (optional ones also null)."""
        schemas = spec()["components"]["schemas"]
        assert schemas["TaskCreate"]["properties"]["ttl"]["anyOf"] == DURATION_SCHEMA["anyOf"]
        for model, field in ((CredentialRequest, "ttl"), (RenewRequest, "increment")):
            assert schemas[model.__name__]["properties"][field]["anyOf"] == [*DURATION_SCHEMA["anyOf"],
                                                                             {"type": "null"}]
