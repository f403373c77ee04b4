"""Vault's own audit record, read and judged: a parser of OpenBao file-audit lines and a classifier.

Both are pure (no I/O, no clock); ``broker.audit.tailer`` does the reading and the writing.

What a file-audit line holds (measured on OpenBao 2.7.2; see ``docs/vault-audit.md``):

- every request writes a ``request`` entry and then a ``response`` entry with the same ``request.id``;
- plain: ``auth.display_name``, ``auth.policies``, ``auth.metadata.*``, ``request.id``, ``path``,
  ``operation``, ``mount_*``, ``remote_address``; HMAC'd (``hmac-sha256:...``): tokens, accessors
  (unless the device has ``hmac_accessor=false``), every string of ``request.data`` and
  ``response.data``;
- a token's metadata is its own: a child token does not inherit its parent's. The broker's task token
  carries ``{task, user, agent, tenant, role}``, an issuance token (a child of the task token)
  ``{task, lease, grant}``, and a token the agent obtains through a token-role grant (a child of the
  issuance token) carries none at all. Such a token is attributed through the ``response`` entry of
  the request that created it: that entry is made by a token the broker knows and names the new
  token's HMAC'd accessor in ``response.auth.accessor`` (:func:`created_token`), which is the value
  later entries show in ``auth.accessor``.

Only ``response`` entries are merged, so each request counts once. A ``request`` entry with no
``response`` (Vault died mid-request, or could not write the response entry; such a request may still
have created something) is not merged by the tailer: :func:`orphan_requests` finds them in a window of
entries for ``broker audit verify --vault-log``.

Nothing from ``request.data`` or ``response.data`` (HMAC'd or not) is ever copied into a record, and
neither is Vault's error text: a record says "permission denied" or "error", nothing more.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import date as dt_date
from typing import Annotated, Any, Literal

import msgspec
import orjson

from broker.audit import AuditRecord
from broker.errors import AuditLineInvalid
from broker.rows import TaskRow

__all__ = [
    "DEFAULT_SKEW",
    "TokenOrigin",
    "VaultAuditEntry",
    "VaultAuth",
    "attribute",
    "classify",
    "classify_batch",
    "created_token",
    "is_request_line",
    "orphan_requests",
    "parse_line",
    "parse_responses",
]

# A request the task token made just before the task ended may be written a little after the end.
DEFAULT_SKEW = 2.0
_MAX_LINE = 1 << 20  # OpenBao lines are ~1.5 KB; a megabyte is not an audit entry
# The opening of a ``request`` entry as OpenBao writes it (Go's encoding/json: struct order, no spaces):
# ``{"time":"<RFC 3339>","type":"request",``. See is_request_line.
_REQUEST_OPENING = re.compile(rb'\{"time":"[^"\\]{1,64}","type":"request",')
# The header a journaled issuance sends (lower case, as the device writes header names) and what its value
# may be: a broker lease id (broker.leases.new_lease_id) or the journal's own probe id.
INTENT_HEADER = "x-broker-intent"
_INTENT_VALUE = re.compile(r"^(?:lse|jpr)_[A-Za-z0-9_-]{8,40}$")
_INTENT_BYTES = INTENT_HEADER.encode()
_EPOCH_DATE = dt_date(1970, 1, 1)
_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$", re.ASCII)


# The entries are msgspec Structs, not dataclasses: a frozen dataclass is built through object.__setattr__
# field by field (~3 us an entry, a third of a line's parse); a Struct is built in C and is as immutable.
class VaultAuth(msgspec.Struct, frozen=True, gc=False):
    """The ``auth`` block of an entry: who made the request. ``accessor`` is HMAC'd unless configured not to be."""

    display_name: str | None
    policies: tuple[str, ...]
    metadata: Mapping[str, str]
    accessor: str | None
    token_type: str | None


class VaultAuditEntry(msgspec.Struct, frozen=True, gc=False):
    """One line of OpenBao's file audit device, reduced to what the broker may record.

    ``created_accessor`` is ``response.auth.accessor``: the (HMAC'd) accessor of a token this request
    created, if it created one. ``error`` is whether the entry carries an error; ``error_kind`` is a
    short fixed label, never Vault's text.
    """

    type: Literal["request", "response"]
    time: float
    request_id: str
    path: str
    operation: str
    mount_point: str | None = None
    mount_type: str | None = None
    remote_address: str | None = None
    auth: VaultAuth | None = None
    error: bool = False
    error_kind: str | None = None
    status: int | None = None
    created_accessor: str | None = None
    # The ``X-Broker-Intent`` request header (broker.journal), which the device writes in plain text once
    # ``sys/config/auditing/request-headers`` names it; and the lease the response created (plain).
    intent: str | None = None
    lease_id: str | None = None


@dataclass(frozen=True)
class TokenOrigin:
    """What the broker knows about a token with no metadata of its own: the task (and lease) it descends from."""

    task: str
    lease: str | None = None


def parse_time(text: str) -> float:
    """Unix seconds from an RFC 3339 time with up to nanosecond precision (``2026-11-28T14:38:05.541346449Z``).

    Raises:
        AuditLineInvalid: not such a time.
    """
    m = _TIME.match(text)
    if m is not None and m.group(3) == "Z":
        # The shape OpenBao writes (UTC): the same float as the datetime path below, whose timestamp() is
        # exactly this sum, without building two datetimes per line. Out-of-range fields take that path.
        seconds = _utc_seconds(text[:19])
        if seconds is not None:
            frac = m.group(2)
            return (seconds * 1_000_000 + (int(frac[:6].ljust(6, "0")) if frac else 0)) / 1_000_000
    if m is None:
        raise AuditLineInvalid("not an audit entry", reason="the entry's time is not RFC 3339")
    base, frac, zone = m.groups()
    micro = (frac or "0")[:6].ljust(6, "0")
    iso = f"{base}.{micro}{'+00:00' if zone == 'Z' else zone}"
    try:
        return datetime.fromisoformat(iso).astimezone(UTC).timestamp()
    except ValueError as exc:
        raise AuditLineInvalid("not an audit entry", reason="the entry's time is out of range") from exc


@functools.lru_cache(maxsize=4096)
def _utc_seconds(stamp: str) -> int | None:
    """Unix seconds of a ``YYYY-MM-DDTHH:MM:SS`` UTC time, None when there is no such time.

    Cached: consecutive lines share their second (tens of thousands of lines a second at full speed).
    """
    hour, minute, second = int(stamp[11:13]), int(stamp[14:16]), int(stamp[17:19])
    day = _epoch_day(stamp[:10])
    if day is None or hour >= 24 or minute >= 60 or second >= 60:
        return None
    return day * 86400 + hour * 3600 + minute * 60 + second


@functools.lru_cache(maxsize=64)
def _epoch_day(date: str) -> int | None:
    """Days since 1970-01-01 of a ``YYYY-MM-DD`` date, None when there is no such date. A log spans few days."""
    try:
        return (dt_date.fromisoformat(date) - _EPOCH_DATE).days
    except ValueError:
        return None


def _opt_str(m: Mapping[str, Any], key: str) -> str | None:
    v = m.get(key)
    return v if isinstance(v, str) and v else None


def _parse_auth(a: Any) -> VaultAuth | None:
    if not isinstance(a, dict) or not a:
        return None
    meta_raw = a.get("metadata")
    meta = {str(k): v for k, v in meta_raw.items() if isinstance(v, str)} if isinstance(meta_raw, dict) else {}
    pol = a.get("policies")
    policies = tuple(p for p in pol if isinstance(p, str)) if isinstance(pol, list) else ()
    return VaultAuth(display_name=_opt_str(a, "display_name"), policies=policies, metadata=meta,
                     accessor=_opt_str(a, "accessor"), token_type=_opt_str(a, "token_type"))


def _error_kind(error: str) -> str:
    low = error.lower()
    for kind in ("permission denied", "invalid token", "missing client token", "unsupported path"):
        if kind in low:
            return kind
    return "error"


def parse_line(line: str | bytes) -> VaultAuditEntry:
    """Parse one JSON line of the file audit device. Unknown fields are ignored.

    Raises:
        AuditLineInvalid: not JSON, not an object, no ``type`` of request/response, no time, no
            ``request.id`` or no ``request.path``.
    """
    if len(line) > _MAX_LINE:
        raise AuditLineInvalid("not an audit entry", reason="line longer than 1 MiB")
    entry = _parse_typed(line)
    return entry if entry is not None else _parse_any(line)


# The fields the broker reads, typed as OpenBao writes them. A line that fits is decoded without building the
# rest (request and response data, policy results: most of its bytes); one that does not fit, or that this
# path is unsure of, is read again by _parse_any, which decides. So both give the same entry for every line
# (tests/unit/test_vaultaudit.py compares them). gc=False: the decoded objects hold no cycles.
class _TAuth(msgspec.Struct, gc=False):
    display_name: str | None = None
    policies: list[str] | None = None
    metadata: dict[str, str] | None = None
    accessor: str | None = None
    token_type: str | None = None


class _TRequest(msgspec.Struct, gc=False):
    id: str
    path: str
    operation: str | None = None
    mount_point: str | None = None
    mount_type: str | None = None
    remote_address: str | None = None
    headers: dict[str, list[str]] | None = None


class _TSecret(msgspec.Struct, gc=False):
    lease_id: str | None = None


class _TData(msgspec.Struct, gc=False):
    # Bounded: an integer beyond 64 bits is a float to orjson, an int here; _parse_any decides those.
    http_status_code: Annotated[int, msgspec.Meta(ge=0, le=999)] | None = None


class _TCreated(msgspec.Struct, gc=False):
    accessor: str | None = None


class _TResponse(msgspec.Struct, gc=False):
    secret: _TSecret | None = None
    data: _TData | None = None
    auth: _TCreated | None = None


class _TLine(msgspec.Struct, gc=False):
    time: str
    type: str
    request: _TRequest
    auth: _TAuth | None = None
    response: _TResponse | None = None
    error: str | None = None


_TYPED = msgspec.json.Decoder(_TLine)


def _parse_typed(line: str | bytes) -> VaultAuditEntry | None:
    """The entry of a line that has the shape OpenBao writes, else None (the caller reads it with _parse_any)."""
    try:
        t = _TYPED.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    req = t.request
    if t.type not in ("request", "response") or not req.id:
        return None
    a = t.auth
    auth: VaultAuth | None = None
    if a is not None:
        if (a.display_name is None and a.policies is None and a.metadata is None and a.accessor is None
                and a.token_type is None):
            return None  # an empty auth block is none, one with only other fields is not: _parse_any tells
        auth = VaultAuth(display_name=a.display_name or None, policies=tuple(a.policies or ()),
                         metadata=a.metadata if a.metadata is not None else {}, accessor=a.accessor or None,
                         token_type=a.token_type or None)
    resp = t.response
    lease_id = status = created = None
    if resp is not None:
        if resp.secret is not None:
            lease_id = resp.secret.lease_id or None
        if resp.data is not None:
            status = resp.data.http_status_code
        if resp.auth is not None:
            created = resp.auth.accessor or None
    error = t.error
    return VaultAuditEntry(
        type="request" if t.type == "request" else "response",
        time=parse_time(t.time),
        request_id=req.id,
        path=req.path,
        operation=req.operation or "",
        mount_point=req.mount_point or None,
        mount_type=req.mount_type or None,
        remote_address=req.remote_address or None,
        auth=auth,
        error=bool(error),
        error_kind=_error_kind(error) if error else None,
        status=status,
        created_accessor=created,
        intent=_intent_of(req.headers),
        lease_id=lease_id,
    )


def _parse_any(line: str | bytes) -> VaultAuditEntry:
    """parse_line for any JSON: each field taken only where it has the expected type."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        # orjson is stricter than json (integers beyond 64 bits, NaN, lone surrogates): such a line is
        # still an entry if json reads it, so json decides.
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AuditLineInvalid("not an audit entry", reason="not JSON") from exc
    if not isinstance(obj, dict):
        raise AuditLineInvalid("not an audit entry", reason="not a JSON object")
    kind = obj.get("type")
    if kind not in ("request", "response"):
        raise AuditLineInvalid("not an audit entry", reason="type is neither request nor response")
    t = obj.get("time")
    if not isinstance(t, str):
        raise AuditLineInvalid("not an audit entry", reason="no time")
    req = obj.get("request")
    if not isinstance(req, dict):
        raise AuditLineInvalid("not an audit entry", reason="no request")
    rid, path = req.get("id"), req.get("path")
    if not isinstance(rid, str) or not rid or not isinstance(path, str):
        raise AuditLineInvalid("not an audit entry", reason="no request id or path")
    error = obj.get("error")
    has_error = isinstance(error, str) and bool(error)
    resp = obj.get("response")
    status: int | None = None
    created: str | None = None
    lease_id: str | None = None
    if isinstance(resp, dict):
        secret = resp.get("secret")
        if isinstance(secret, dict):
            lease_id = _opt_str(secret, "lease_id")
        data = resp.get("data")
        if isinstance(data, dict) and isinstance(data.get("http_status_code"), int):
            status = int(data["http_status_code"])
        rauth = resp.get("auth")
        if isinstance(rauth, dict):
            created = _opt_str(rauth, "accessor")
    return VaultAuditEntry(
        type=kind,
        time=parse_time(t),
        request_id=rid,
        path=path,
        operation=_opt_str(req, "operation") or "",
        mount_point=_opt_str(req, "mount_point"),
        mount_type=_opt_str(req, "mount_type"),
        remote_address=_opt_str(req, "remote_address"),
        auth=_parse_auth(obj.get("auth")),
        error=has_error,
        error_kind=_error_kind(error) if isinstance(error, str) and error else None,
        status=status,
        created_accessor=created,
        intent=_intent_of(req.get("headers")),
        lease_id=lease_id,
    )


def _intent_of(headers: Any) -> str | None:
    """The journal's intent id from the request's audited headers (``{"x-broker-intent": ["lse_..."]}``)."""
    if not isinstance(headers, dict):
        return None
    values = headers.get(INTENT_HEADER)
    if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str):
        return None
    return values[0] if _INTENT_VALUE.match(values[0]) else None


def is_request_line(line: bytes) -> bool:
    """Whether a raw line is certainly a ``request`` entry, which the merge drops: a pre-filter before parsing.

    True only for a line that opens exactly as OpenBao writes a request entry (``{"time":"...",
    "type":"request",``: the top-level object's first keys, with no quote or backslash in the time, so
    the match cannot sit inside a string) and that holds no ``"response"`` token at all (so no second
    ``type`` key can make it a response for a JSON reader that keeps the last one, and no response
    block is skipped), and that names no journal intent (``x-broker-intent``: the journal keeps those
    request entries, broker.journal). Anything else, including every response entry, goes to
    :func:`parse_line`.
    A skipped line is not validated further: a malformed request entry is not counted as invalid.
    """
    return (_REQUEST_OPENING.match(line) is not None and b'"response"' not in line
            and _INTENT_BYTES not in line)


def parse_responses(lines: Iterable[bytes]) -> tuple[list[VaultAuditEntry], int]:
    """The ``response`` entries of raw lines, in order, and how many lines were invalid.

    Blank lines and request entries (:func:`is_request_line`; any other request entry after parsing) are
    skipped: :func:`classify_batch` would drop them anyway, except those naming a journal intent, which
    are kept (classify ignores them; broker.journal reads them). Pure and synchronous: the tailer runs it
    in a worker thread.
    """
    responses: list[VaultAuditEntry] = []
    invalid = 0
    for line in lines:
        if not line.strip() or is_request_line(line):
            continue
        try:
            entry = parse_line(line)
        except AuditLineInvalid:
            invalid += 1
            continue
        if entry.type == "response" or entry.intent is not None:
            responses.append(entry)
    return responses, invalid


# -- classification ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    """Whose request an entry is: the task it belongs to, through which kind of token, for which lease."""

    task: str
    via: Literal["task token", "issuance token", "child token"]
    lease: str | None = None


def attribute(entry: VaultAuditEntry, tokens: Mapping[str, TokenOrigin]) -> Attribution | None:
    """The task an entry belongs to: from the token's metadata, else from a learned HMAC'd accessor."""
    auth = entry.auth
    if auth is None:
        return None
    task = auth.metadata.get("task")
    if task:
        lease = auth.metadata.get("lease")
        if lease:
            return Attribution(task, "issuance token", lease)
        # Only the broker holds a task token: the journal header it sent names the issuance (broker.journal).
        return Attribution(task, "task token", entry.intent if entry.intent and entry.intent.startswith("lse_")
                           else None)
    if auth.accessor is not None:
        origin = tokens.get(auth.accessor)
        if origin is not None:
            return Attribution(origin.task, "child token", origin.lease)
    return None


def created_token(entry: VaultAuditEntry, tokens: Mapping[str, TokenOrigin]) -> tuple[str, TokenOrigin] | None:
    """A token this (successful) response created by a token of a task: its HMAC'd accessor and origin.

    The issuance token's children inherit the issuance's lease; a task token's child (an issuance
    token) keeps its own metadata anyway, and is mapped to the task alone.
    """
    if entry.type != "response" or entry.error or entry.created_accessor is None:
        return None
    who = attribute(entry, tokens)
    if who is None:
        return None
    return entry.created_accessor, TokenOrigin(who.task, who.lease)


def _normal(path: str) -> str:
    return path.strip("/")


def _task_end(row: TaskRow) -> float:
    end = row.expires_at
    if row.ended_at is not None:
        end = min(end, row.ended_at)
    return end


def classify(
    entry: VaultAuditEntry,
    *,
    known_tasks: Callable[[str], TaskRow | None],
    broker_paths: Iterable[str] | frozenset[str],
    tokens: Mapping[str, TokenOrigin] | None = None,
    skew: float = DEFAULT_SKEW,
) -> AuditRecord | None:
    """The chain record an entry becomes, or None when it is none of the broker's business.

    - a ``response`` entry by a token of a task the store knows, made while the task was active (its
      end, the earlier of ``ended_at`` and ``expires_at``, plus ``skew``): ``vault.request``, with the
      task's user, agent and tenant from the store, resource = path, action = operation, outcome
      success or failure, Vault's request id;
    - by a token of a task the store does not know, made after the task ended, or whose metadata
      disagrees with the task's record: ``vault.unexplained``;
    - on one of ``broker_paths`` (the catalog's grant paths) by a token the broker cannot attribute:
      ``vault.unexplained``;
    - anything else (``request`` entries, other tokens on other paths, the broker's own token): None.
    """
    if entry.type != "response":
        return None
    who = attribute(entry, tokens or {})
    paths = broker_paths if isinstance(broker_paths, frozenset) else frozenset(_normal(p) for p in broker_paths)
    on_grant_path = _normal(entry.path) in paths
    outcome: Literal["success", "failure"] = "failure" if entry.error else "success"
    src = f" from {entry.remote_address}" if entry.remote_address else ""
    failed = f"; {entry.error_kind}" if entry.error else ""
    if who is None:
        if not on_grant_path:
            return None
        name = entry.auth.display_name if entry.auth is not None else None
        by = f"token {name!r}" if name else "an unauthenticated request"
        return AuditRecord(entry.time, "vault.unexplained", outcome, resource=entry.path, action=entry.operation,
                           vault_request_id=entry.request_id, caller_address=entry.remote_address,
                           reason=f"grant path used by {by} the broker did not issue{src}{failed}")
    row = known_tasks(who.task)
    if row is None:
        return AuditRecord(entry.time, "vault.unexplained", outcome, task=who.task, resource=entry.path,
                           action=entry.operation, lease=who.lease, vault_request_id=entry.request_id,
                           caller_address=entry.remote_address,
                           reason=f"{who.via} of a task the broker never recorded{src}{failed}")
    base = {"user": row.user, "agent": row.agent, "task": row.id, "tenant": row.tenant, "resource": entry.path,
            "action": entry.operation, "lease": who.lease, "vault_request_id": entry.request_id,
            "caller_address": entry.remote_address}
    meta = entry.auth.metadata if entry.auth is not None else {}
    mismatch = [k for k in ("user", "agent", "tenant") if k in meta and meta[k] != getattr(row, k)]
    if mismatch:
        return AuditRecord(entry.time, "vault.unexplained", outcome, **base,
                           reason=f"{who.via} metadata disagrees with the task's record on {', '.join(mismatch)}"
                                  f"{src}{failed}")
    if entry.time > _task_end(row) + skew:
        return AuditRecord(entry.time, "vault.unexplained", outcome, **base,
                           reason=f"{who.via} used after the task left active ({row.state}){src}{failed}")
    lease = f" of lease {who.lease}" if who.lease else ""
    return AuditRecord(entry.time, "vault.request", outcome, **base, reason=f"by the {who.via}{lease}{src}{failed}")


def classify_batch(
    entries: Iterable[VaultAuditEntry],
    *,
    known_tasks: Callable[[str], TaskRow | None],
    broker_paths: Iterable[str],
    tokens: Mapping[str, TokenOrigin] | None = None,
    skew: float = DEFAULT_SKEW,
) -> tuple[list[AuditRecord], dict[str, TokenOrigin]]:
    """Classify entries in file order, learning the tokens they create as it goes.

    Returns the records and the tokens newly learned (HMAC'd accessor -> origin), which a later batch
    must be given back in ``tokens``.
    """
    paths = frozenset(_normal(p) for p in broker_paths)
    known = dict(tokens or {})
    learned: dict[str, TokenOrigin] = {}
    records: list[AuditRecord] = []
    for e in entries:
        if e.type != "response":
            continue
        record = classify(e, known_tasks=known_tasks, broker_paths=paths, tokens=known, skew=skew)
        if record is not None:
            records.append(record)
        made = created_token(e, known)
        if made is not None and made[0] not in known:
            known[made[0]] = learned[made[0]] = made[1]
    return records, learned


def orphan_requests(entries: Iterable[VaultAuditEntry]) -> list[VaultAuditEntry]:
    """``request`` entries with no ``response`` entry of the same id in ``entries``, in file order.

    A request near the end of the window may simply not have been answered yet: callers decide how
    old an orphan must be before it counts.
    """
    pending: dict[str, VaultAuditEntry] = {}
    for e in entries:
        if e.type == "request":
            pending.setdefault(e.request_id, e)
        else:
            pending.pop(e.request_id, None)
    return list(pending.values())


def task_token_requests(entries: Iterable[VaultAuditEntry], *, tasks: Container[str]) -> list[VaultAuditEntry]:
    """Response entries made by a token carrying the broker's task metadata, for a task of this store.

    These are what ``broker audit verify --vault-log`` requires to be in the chain (as ``vault.request``
    or ``vault.unexplained``): a request made with a task or issuance token that the chain does not hold
    means the merge lost it, or the chain was cut.
    """
    return [e for e in entries if e.type == "response" and e.auth is not None
            and e.auth.metadata.get("task") in tasks]
