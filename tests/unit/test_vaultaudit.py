"""The Vault audit parser and classifier, on lines captured from a real OpenBao 2.7.2 file audit device.

``tests/data/openbao_audit.jsonl`` (tokens and HMAC'd data scrubbed; accessors kept, they are HMACs and
carry the linkage) holds, in order: the broker token creating a task token; the task token creating an
issuance token; that issuance token issuing a certificate (pki/issue/agents, lease lse_fixture1); a
second issuance token (lease lse_fixture2) creating an agent child token through the agent-child token
role; the child token's lookup-self; the task token's lookup-self (denied); the broker token looking up
an accessor; and a token the broker never issued issuing a certificate on the grant path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.audit import AuditRecord
from broker.audit.vaultlog import (
    TokenOrigin,
    VaultAuditEntry,
    VaultAuth,
    _parse_any,  # _parse_any and _parse_typed: the two readers parse_line chooses between
    _parse_typed,
    attribute,
    classify,
    classify_batch,
    is_request_line,
    orphan_requests,
    parse_line,
    parse_responses,
    parse_time,
)
from broker.errors import AuditLineInvalid
from broker.rows import TaskRow

DATA = Path(__file__).parent.parent / "data" / "openbao_audit.jsonl"
GRANT_PATHS = ("database/creds/tickets-ro", "pki/issue/agents", "auth/token/create/agent-child")
TASK = "tsk_fixture1"
USER = "alice@example.com"
AGENT = "spiffe://example.org/agent/support-1"


def lines() -> list[str]:
    return DATA.read_text().splitlines()


def entries() -> list[VaultAuditEntry]:
    return [parse_line(x) for x in lines()]


def task_row(**kw: object) -> TaskRow:
    t0 = entries()[0].time
    base = TaskRow(id=TASK, user=USER, agent=AGENT, role="support-triage", tenant="acme", reason="r",
                   created_at=t0 - 1, expires_at=t0 + 600, state="active", ended_at=None, token_accessor="acc",
                   sealed_token=b"x")
    return replace(base, **kw)  # type: ignore[arg-type]


def merged(rows: dict[str, TaskRow]) -> list[AuditRecord]:
    records, _ = classify_batch(entries(), known_tasks=rows.get, broker_paths=GRANT_PATHS)
    return records


class TestParser:
    def test_every_captured_line_parses(self) -> None:
        """All 18 captured lines are entries: 9 requests, each followed by its response with the same id."""
        es = entries()
        assert [e.type for e in es] == ["request", "response"] * 9
        assert all(a.request_id == b.request_id for a, b in zip(es[::2], es[1::2], strict=True))

    def test_a_task_token_entry(self) -> None:
        """The task token's metadata, display name, policies and token type are plain; its accessor is HMAC'd."""
        e = entries()[3]
        assert (e.type, e.path, e.operation, e.mount_type) == ("response", "auth/token/create", "update", "token")
        assert e.auth is not None
        assert e.auth.metadata == {"agent": AGENT, "role": "support-triage", "task": TASK, "tenant": "acme",
                                   "user": USER}
        assert e.auth.display_name == "token-task-support-triage"
        assert e.auth.policies == ("broker-task-support-triage",)
        assert e.auth.token_type == "service"
        assert e.auth.accessor is not None and e.auth.accessor.startswith("hmac-sha256:")
        assert e.remote_address == "127.0.0.1"
        assert not e.error and e.error_kind is None
        # The token it created (an issuance token) is named by its HMAC'd accessor.
        assert e.created_accessor is not None and e.created_accessor.startswith("hmac-sha256:")

    def test_an_agent_child_token_carries_no_metadata(self) -> None:
        """A token created through the agent-child role has no metadata: it must be attributed another way."""
        e = entries()[11]
        assert e.path == "auth/token/lookup-self" and e.auth is not None
        assert e.auth.metadata == {} and e.auth.display_name == "token"
        assert e.auth.accessor == entries()[9].created_accessor

    def test_an_error_is_a_short_label(self) -> None:
        """A denied request is flagged with a fixed label, not Vault's text."""
        e = entries()[13]
        assert e.error and e.error_kind == "permission denied"

    def test_time_keeps_microseconds(self) -> None:
        """Nanosecond RFC 3339 times become Unix seconds (microsecond precision), any offset."""
        assert parse_time("2026-11-28T14:38:05.541346449Z") == pytest.approx(1795876685.541346)
        assert parse_time("2026-11-28T15:38:05+01:00") == pytest.approx(1795876685.0)

    @settings(max_examples=500, deadline=None)
    @given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)), st.text("0123456789", max_size=9))
    def test_utc_times_are_the_datetime_result(self, when: datetime, digits: str) -> None:
        """UTC times (OpenBao's) take a path without datetimes: the same float, to the last bit."""
        text = when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{digits}" if digits else "") + "Z"
        micro = (digits or "0")[:6].ljust(6, "0")
        expected = datetime.fromisoformat(f"{text[:19]}.{micro}+00:00").timestamp()
        assert parse_time(text) == expected

    @pytest.mark.parametrize("text", ["2026-02-30T00:00:00Z", "2026-13-01T00:00:00Z", "2026-01-01T24:00:00Z",
                                      "2026-01-01T23:60:00Z", "2026-01-01T23:59:60Z", "2026-01-01T\u0661\u0662:00:00Z"])
    def test_impossible_times_are_refused(self, text: str) -> None:
        with pytest.raises(AuditLineInvalid):
            parse_time(text.encode().decode("unicode_escape"))

    def test_unknown_fields_are_tolerated(self) -> None:
        """New fields in a future OpenBao do not break the parser."""
        obj = json.loads(lines()[3])
        obj["something_new"] = {"x": 1}
        obj["auth"]["also_new"] = [1, 2]
        assert parse_line(json.dumps(obj)).request_id == entries()[3].request_id

    @pytest.mark.parametrize("garbage", [
        "", "not json", "[1, 2]", '{"type": "request"}', '{"type": "other", "time": "2026-11-28T14:38:05Z"}',
        '{"type": "request", "time": "yesterday", "request": {"id": "x", "path": "p"}}',
        '{"type": "request", "time": "2026-11-28T14:38:05Z", "request": {"path": "p"}}',
        b"\xff\xfe{",
    ])
    def test_garbage_is_a_typed_error(self, garbage: str | bytes) -> None:
        """Anything that is not an audit entry raises AuditLineInvalid."""
        with pytest.raises(AuditLineInvalid):
            parse_line(garbage)


class TestClassifier:
    def test_a_known_active_task(self) -> None:
        """Each response by the task, its issuance tokens or the agent's child token is one vault.request with
        the task's people; the broker's own calls are nothing; the stranger on a grant path is unexplained."""
        records = merged({TASK: task_row()})
        got = [(r.event, r.resource, r.action, r.outcome, r.lease) for r in records]
        assert got == [
            ("vault.request", "auth/token/create", "update", "success", None),
            ("vault.request", "pki/issue/agents", "update", "success", "lse_fixture1"),
            ("vault.request", "auth/token/create", "update", "success", None),
            ("vault.request", "auth/token/create/agent-child", "update", "success", "lse_fixture2"),
            ("vault.request", "auth/token/lookup-self", "read", "success", "lse_fixture2"),
            ("vault.request", "auth/token/lookup-self", "read", "failure", None),
            ("vault.unexplained", "pki/issue/agents", "update", "success", None),
        ]
        for r in records[:-1]:
            assert (r.user, r.agent, r.task, r.tenant) == (USER, AGENT, TASK, "acme")
        assert "child token" in (records[4].reason or "") and "permission denied" in (records[5].reason or "")
        assert records[-1].task is None and "did not issue" in (records[-1].reason or "")
        responses = [e for e in entries() if e.type == "response"]
        ids = [r.vault_request_id for r in records]
        assert len(set(ids)) == len(ids) and set(ids) <= {e.request_id for e in responses}

    def test_records_carry_no_request_or_response_data(self) -> None:
        """No HMAC, lease id, error text or data value from the entries reaches a record."""
        raw = DATA.read_text()
        for r in merged({TASK: task_row()}):
            for f in fields(r):
                v = getattr(r, f.name)
                if isinstance(v, str):
                    assert "hmac-sha256" not in v and "pki/issue/agents/" not in v and "error occurred" not in v
        assert "pki/issue/agents/" in raw  # the data was there to leak

    def test_an_unknown_task_is_unexplained(self) -> None:
        """Every request by a token that names a task the store never recorded is flagged."""
        records = merged({})
        assert [r.event for r in records] == ["vault.unexplained"] * 7
        assert all("never recorded" in (r.reason or "") for r in records[:-1])
        assert records[0].task == TASK and records[0].user is None

    def test_after_the_task_ended(self) -> None:
        """Requests after the task's end (beyond the skew) are flagged; within the skew they are not."""
        es = [e for e in entries() if e.type == "response"]
        late = task_row(state="ended", ended_at=es[0].time - 10)
        assert {r.event for r in merged({TASK: late})} == {"vault.unexplained"}
        assert "left active (ended)" in (merged({TASK: late})[0].reason or "")
        just = task_row(state="ended", ended_at=es[-1].time - 1)
        assert {r.event for r in merged({TASK: just})[:-1]} == {"vault.request"}
        expired = task_row(expires_at=es[0].time - 10)  # still "active" in the store: the sweeper is late
        assert {r.event for r in merged({TASK: expired})} == {"vault.unexplained"}

    def test_metadata_that_disagrees_with_the_store(self) -> None:
        """A task token whose metadata names another user than the task's record is flagged."""
        records = merged({TASK: task_row(user="mallory@example.com")})
        assert records[0].event == "vault.unexplained" and "user" in (records[0].reason or "")

    def test_request_entries_and_unrelated_paths_are_nothing(self) -> None:
        """Request entries never become records; an unattributed token off the grant paths is not our business."""
        es = entries()
        assert all(classify(e, known_tasks={}.get, broker_paths=GRANT_PATHS) is None for e in es if e.type == "request")
        assert classify(es[15], known_tasks={}.get, broker_paths=GRANT_PATHS) is None  # broker's lookup-accessor

    def test_child_tokens_need_their_creation(self) -> None:
        """Without the creating entry the child token is unattributed; with a learned accessor it is the lease's."""
        child = entries()[11]
        assert attribute(child, {}) is None
        assert child.auth is not None and child.auth.accessor is not None
        who = attribute(child, {child.auth.accessor: TokenOrigin(TASK, "lse_fixture2")})
        assert who is not None and (who.task, who.via, who.lease) == (TASK, "child token", "lse_fixture2")

    def test_learned_tokens_are_returned(self) -> None:
        """A batch returns the accessors it learned, so the next batch can attribute their requests."""
        _, learned = classify_batch(entries()[:10], known_tasks={}.get, broker_paths=GRANT_PATHS)
        assert learned[entries()[9].created_accessor or ""] == TokenOrigin(TASK, "lse_fixture2")
        records, _ = classify_batch(entries()[10:12], known_tasks={TASK: task_row()}.get,
                                    broker_paths=GRANT_PATHS, tokens=learned)
        assert [(r.event, r.lease) for r in records] == [("vault.request", "lse_fixture2")]

    def test_orphan_requests(self) -> None:
        """A request whose response entry is missing (Vault died) is reported as an orphan."""
        es = entries()
        assert orphan_requests(es) == []
        assert orphan_requests(es[:5] + es[6:]) == [es[4]]


def _full(raw: list[bytes]) -> list[VaultAuditEntry]:
    """The reference: every line parsed, the invalid ones left out, the responses kept."""
    out = []
    for line in raw:
        try:
            e = parse_line(line)
        except AuditLineInvalid:
            continue
        if e.type == "response":
            out.append(e)
    return out


def _variant(line: str, op: int, text: str, cut: int) -> str:
    """A corpus line changed the ways a pre-filter could be fooled: spacing, key order, duplicate keys,
    another type, a mangled time, a truncation, a free-form "response" or "type" in the data."""
    obj = json.loads(line)
    if op == 0:
        return line
    if op == 1:
        return json.dumps(obj)  # spaces after ':' and ','
    if op == 2:
        return json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":"))
    if op == 3:
        return line[:-1] + ',"type":"response"}'  # a second type: JSON readers keep the last one
    if op == 4:
        return line.replace(f'"type":"{obj["type"]}"', f'"type":{json.dumps(text)}', 1)
    if op == 5:
        return line.replace(obj["time"], text, 1)
    if op == 6:
        return line[:cut % (len(line) + 1)]
    if op == 7:
        obj.setdefault("request", {})["data"] = {text: "response", "type": text}
        return json.dumps(obj, separators=(",", ":"))
    return line + text


class TestPreFilter:
    """``is_request_line`` skips lines before parsing: it may skip only what the merge would drop."""

    def test_it_skips_every_captured_request_and_nothing_else(self) -> None:
        """On the recorded OpenBao lines the pre-filter recognises exactly the request entries."""
        for line, e in zip(lines(), entries(), strict=True):
            assert is_request_line(line.encode()) == (e.type == "request"), line[:80]

    def test_the_merge_is_the_same_with_and_without_it(self) -> None:
        """Parsing with the pre-filter gives the same responses, records and learned tokens as parsing all."""
        raw = [x.encode() for x in lines()] + [b"", b"   ", b"not json"]
        responses, invalid = parse_responses(raw)
        assert responses == _full(raw) and invalid == 1
        rows = {TASK: task_row()}
        assert (classify_batch(responses, known_tasks=rows.get, broker_paths=GRANT_PATHS)
                == classify_batch(entries(), known_tasks=rows.get, broker_paths=GRANT_PATHS))

    def test_a_second_type_key_is_parsed(self) -> None:
        """A request line with a later ``"type":"response"`` is a response to a JSON reader: not skipped."""
        request = next(x for x in lines() if '"type":"request"' in x[:60])
        forged = (request[:-1] + ',"type":"response"}').encode()
        assert not is_request_line(forged)
        assert parse_line(forged).type == "response"

    def test_integers_orjson_refuses_still_parse(self) -> None:
        """A line json reads (an integer beyond 64 bits) is not invalid because orjson refuses it."""
        obj = json.loads(lines()[3])
        obj["response"] = {**obj.get("response", {}), "big": 123456789012345678901234567890}
        assert parse_line(json.dumps(obj)).request_id == entries()[3].request_id

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 17), st.integers(0, 8), st.text(max_size=12), st.integers(0, 4000)),
                    min_size=1, max_size=12))
    def test_generated_lines(self, picks: list[tuple[int, int, str, int]]) -> None:
        """On changed lines, a skipped line is never an entry the merge keeps, and the batch is unchanged."""
        corpus = lines()
        raw = [_variant(corpus[i], op, text, cut).encode("utf-8", "surrogatepass") for i, op, text, cut in picks]
        for line in raw:
            if is_request_line(line):
                with contextlib.suppress(AuditLineInvalid):  # invalid: nothing to merge either way
                    assert parse_line(line).type == "request"
        responses, _ = parse_responses(raw)
        assert responses == _full(raw)


def _outcome(parse: Callable[[str | bytes], VaultAuditEntry], line: str | bytes) -> object:
    """What a reader makes of a line: the entry, or the reason it refused it."""
    try:
        return parse(line)
    except AuditLineInvalid as exc:
        return ("refused", exc.reason)


# Values of every JSON type, including those a typed reader refuses and the lenient one keeps or skips.
_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8),
    st.just(""), st.just([]), st.just({}), st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), st.integers(), st.none()), max_size=3),
)


def _paths(obj: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a decoded line, nested objects included."""
    if not isinstance(obj, dict):
        return []
    out = []
    for k, v in obj.items():
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _changed(line: str, edits: list[tuple[int, bool, object]]) -> str:
    """A corpus line with some of its fields (at any depth) deleted or given a value of another type."""
    obj = json.loads(line)
    for pick, delete, value in edits:
        paths = _paths(obj)
        if not paths:
            break
        *parents, key = paths[pick % len(paths)]
        node = obj
        for k in parents:
            node = node[k]
        if delete:
            del node[key]
        else:
            node[key] = value
    return json.dumps(obj, separators=(",", ":"))


class TestTypedReader:
    """parse_line reads lines of OpenBao's shape with a typed decoder, and anything else as any JSON: the
    entry must not depend on which reader took the line."""

    def test_every_captured_line_takes_the_typed_path(self) -> None:
        """The lines OpenBao writes fit the typed reader (else it would never be the one used), with the same entry."""
        for line in lines():
            typed = _parse_typed(line)
            assert typed is not None, line[:80]
            assert typed == _parse_any(line), line[:80]

    @settings(max_examples=600, deadline=None)
    @given(st.integers(0, 17), st.lists(st.tuples(st.integers(0, 400), st.booleans(), _JSON_VALUES),
                                        min_size=1, max_size=4))
    def test_changed_lines_read_the_same(self, i: int, edits: list[tuple[int, bool, object]]) -> None:
        """With fields deleted or of another type anywhere in the line, the entry (or the refusal) is the same."""
        line = _changed(lines()[i], edits)
        assert _outcome(parse_line, line) == _outcome(_parse_any, line)
        typed = _outcome(_parse_typed, line)
        assert typed is None or typed == _outcome(_parse_any, line)

    @pytest.mark.parametrize("auth", [{}, {"client_token": "hmac-sha256:x"}, {"policies": []}, {"display_name": ""}])
    def test_an_auth_block_with_nothing_known_in_it(self, auth: dict[str, object]) -> None:
        """An empty auth block is no auth; one with only fields the broker does not read is an empty auth."""
        obj = json.loads(lines()[3])
        obj["auth"] = auth
        line = json.dumps(obj)
        assert parse_line(line).auth == _parse_any(line).auth
        assert parse_line(line).auth == (None if not auth else VaultAuth(None, (), {}, None, None))

    @pytest.mark.parametrize("raw", [
        b'"time":"2026-11-28T14:38:05Z","type":"response"',  # duplicate keys: the last one is read
        b'"time":"2026-11-28T14:38:05Z","type":"response","type":"request"',
        b'"time":"\\ud800","type":"response"',  # a lone surrogate: json reads it, orjson does not
        b'"time":"2026-11-28T14:38:05Z","type":"response","x":123456789012345678901234567890',
        b'"time":"2026-02-30T14:38:05Z","type":"response"',
        b'"time":"2026-11-28T14:38:05.1234567891234Z","type":"response"',
        b'"time":"2026-11-28T14:38:05+01:00","type":"response"',
        *(b'"time":"2026-11-28T14:38:05Z","type":"response","response":{"data":{"http_status_code":%s}}' % v
          for v in (b"0", b"204", b"true", b"200.0", b"null", b'"200"', b"99999999999999999999")),
        b'"time":"2026-11-28T14:38:05Z","type":"response","response":{"secret":{"lease_id":""},"auth":{}}',
        b'"time":"2026-11-28T14:38:05Z","type":"response","response":{"secret":{},"auth":{"accessor":""}}',
        b'"time":"2026-11-28T14:38:05Z","type":"response","error":""',
        b'"time":"2026-11-28T14:38:05Z","type":"response","error":"1 error occurred: permission denied"',
        b'"time":"2026-11-28T14:38:05Z","type":"response","auth":{"metadata":{"task":1}}',
        b'"time":"2026-11-28T14:38:05Z","type":"response","auth":{"policies":["a",1],"accessor":""}',
        b'"time":"2026-11-28T14:38:05Z","type":"response","auth":{"accessor":"","token_type":"","metadata":{}}',
    ])
    def test_edge_lines_read_the_same(self, raw: bytes) -> None:
        """Duplicate keys, surrogates, huge integers and unusual times are read alike by both readers."""
        line = b'{' + raw + b',"request":{"id":"r1","path":"p","headers":{"x-broker-intent":["lse_abcdefgh12"]}}}'
        assert _outcome(parse_line, line) == _outcome(_parse_any, line)
