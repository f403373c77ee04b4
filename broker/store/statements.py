"""Statements compiled once, and the helpers every transaction shares: appending to the chain, locks,
budgets, intents moved along their table, selectors. All run inside the caller's transaction."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql import Select

from broker.audit import AuditRecord, chain_hash
from broker.audit.canonical import RenderedRecord, canonical_record
from broker.errors import (
    BudgetExceeded,
    Locked,
)
from broker.identity import is_person_id, normalize_email
from broker.intents import FINAL, IntentEvent, IntentState, next_state
from broker.rows import (
    LeaseLimits,
    LeaseRow,
    Person,
    TaskRow,
)
from broker.states import LEASES, TASKS, TOKENS, LeaseEvent, LeaseState, TaskEvent, TaskState, TokenEvent
from broker.store.prepared import Prepared
from broker.store.schema import (
    audit_checkpoints,
    audit_events,
    audit_head,
    health_probe,
    intents,
    leases,
    person_emails,
    revocations,
    tasks,
    vault_audit_tokens,
)


def _vals(states: Sequence[enum.StrEnum]) -> list[str]:
    # Plain strings for the driver: psycopg binds a str subclass by its exact type.
    return [s.value for s in states]


# -- statements, compiled once -----------------------------------------------------------------------

_INSERT_TASK = insert(tasks)
_INSERT_LEASE = insert(leases)
_INSERT_INTENT = insert(intents)
_INSERT_AUDIT = insert(audit_events)
_INSERT_REVOCATION = insert(revocations)
_TASK_BY_ID = select(tasks).where(tasks.c.id == bindparam("id"))
_TASK_STATE_FOR_UPDATE = select(tasks.c.state).where(tasks.c.id == bindparam("id")).with_for_update()
_LEASE_BY_ID = select(leases).where(leases.c.id == bindparam("id"))
_INTENT_BY_ID = select(intents).where(intents.c.id == bindparam("id"))
_PROBE = update(health_probe).where(health_probe.c.id == 1).values(probed_at=bindparam("at"))
# A lock on a user names their person id or an email address. An address holds the person behind it:
# it matches the address their token claims now (verified or not: a claim can only lock its presenter
# out), and every address any of their tokens claimed before (person_emails), so a token that drops or
# changes the address is still locked. A lock from before person ids (migration 0009) may hold a bare
# subject: it matches that subject at any issuer (a lock only refuses, so matching wider is safe).
_LOCK_HIT = select(revocations.c.id, revocations.c.kind).where(
    revocations.c.lock.is_(True),
    or_(and_(revocations.c.kind == "user",
             or_(revocations.c.value == bindparam("user"), revocations.c.value == bindparam("email"),
                 revocations.c.value == bindparam("subject"),
                 revocations.c.value.in_(select(person_emails.c.email)
                                         .where(person_emails.c.person == bindparam("user"))))),
        and_(revocations.c.kind == "agent", revocations.c.value == bindparam("agent")),
        and_(revocations.c.kind == "tenant", revocations.c.value == bindparam("tenant"))),
).limit(1)
# The live-lease budgets: the active leases of a user's or an agent's active tasks, summed from each
# task's counter (tasks.live_leases) through ix_tasks_agent_state / ix_tasks_user_state, so the cost
# follows their active tasks, not their leases. An active lease's task is active (a fence moves both in
# one transaction), so inactive tasks' counters never matter.
_LIVE_BY_AGENT = select(func.coalesce(func.sum(tasks.c.live_leases), 0)).where(
    tasks.c.agent == bindparam("agent"), tasks.c.state == TaskState.ACTIVE.value)
_LIVE_BY_USER = select(func.coalesce(func.sum(tasks.c.live_leases), 0)).where(
    tasks.c.user == bindparam("user"), tasks.c.state == TaskState.ACTIVE.value)
# One more live lease for a task that is still active: the row lock and the state check complete_issuance
# needs, and the counter, in one statement (rowcount 0: the task left active).
_ONE_MORE_LIVE = (update(tasks).where(tasks.c.id == bindparam("id"), tasks.c.state == TaskState.ACTIVE.value)
                  .values(live_leases=tasks.c.live_leases + 1))
_RENEW = (update(leases)
          .where(leases.c.id == bindparam("lid"), leases.c.state.in_(_vals(LEASES.sources(LeaseEvent.RENEWED))))
          .values(expires_at=bindparam("new_expiry")))
_RECORD_FIELDS = tuple(AuditRecord.__dataclass_fields__)
_HEAD_FOR_UPDATE = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
_MOVE_HEAD = update(audit_head).where(audit_head.c.id == 1).values(seq=bindparam("new_seq"),
                                                                   hash=bindparam("new_hash"))
_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
# The chain as stored, in AuditRecord's field order so that a row becomes a record positionally (the
# verifier reads a million of them).
_CHAIN_PAGE = (select(audit_events.c.seq, *[audit_events.c[f] for f in _RECORD_FIELDS], audit_events.c.prev_hash,
                      audit_events.c.hash)
               .where(audit_events.c.seq > bindparam("after")).order_by(audit_events.c.seq).limit(bindparam("lim")))
_INSERT_CHECKPOINT = insert(audit_checkpoints)
_LAST_CHECKPOINT = select(audit_checkpoints).order_by(audit_checkpoints.c.seq.desc()).limit(1)



# -- helpers that run inside a transaction -----------------------------------------------------------


# The issuance path's statements, run on the DB-API cursor (broker.store.prepared): the same SQL, without
# SQLAlchemy's per-execution cost. Each is exactly the Core statement it wraps.
P_TASK_BY_ID = Prepared(_TASK_BY_ID)
P_CHAIN_PAGE = Prepared(_CHAIN_PAGE)
P_TASK_STATE_FOR_UPDATE = Prepared(_TASK_STATE_FOR_UPDATE)
P_LOCK_HIT = Prepared(_LOCK_HIT)
P_LIVE_BY_AGENT = Prepared(_LIVE_BY_AGENT)
P_LIVE_BY_USER = Prepared(_LIVE_BY_USER)
P_INSERT_INTENT = Prepared(_INSERT_INTENT)
P_INSERT_LEASE = Prepared(_INSERT_LEASE)
P_ONE_MORE_LIVE = Prepared(_ONE_MORE_LIVE)
P_HEAD_FOR_UPDATE = Prepared(_HEAD_FOR_UPDATE)
P_INSERT_AUDIT = Prepared(_INSERT_AUDIT)
P_MOVE_HEAD = Prepared(_MOVE_HEAD)
# An open intent recorded: the one move of the intent table the issuance path makes (``_move_intent``'s
# values for a final state, compare-and-set on open).
_RECORDED = next_state(IntentState.OPEN, IntentEvent.RECORDED)
# Learn a token unless its accessor is known (the first learning stands): one executemany per merge.
_LEARN_TOKEN_VALUES: dict[str, Any] = {c: bindparam(c) for c in ("accessor_hmac", "task", "lease", "learned_at")}
P_LEARN_TOKEN = Prepared(
    sqlite_insert(vault_audit_tokens).values(_LEARN_TOKEN_VALUES).on_conflict_do_nothing(),
    per_dialect={"postgresql": pg_insert(vault_audit_tokens).values(_LEARN_TOKEN_VALUES).on_conflict_do_nothing()})
# An intent born in a given state (broker.intents rule 1: the state the table gives it), unless its id is
# taken: a journaled issuance that records its lease in one transaction after Vault answered, and whose
# journal entries the orphan sweep may have claimed meanwhile (broker.journal rule 8), loses to the claim.
_INTENT_IF_NEW: dict[str, Any] = {c.name: bindparam(c.name) for c in intents.c}
P_INSERT_INTENT_IF_NEW = Prepared(
    sqlite_insert(intents).values(_INTENT_IF_NEW).on_conflict_do_nothing(),
    per_dialect={"postgresql": pg_insert(intents).values(_INTENT_IF_NEW).on_conflict_do_nothing()})
P_RECORD_INTENT = Prepared(update(intents).where(intents.c.id == bindparam("id"),
                                                 intents.c.state == IntentState.OPEN.value)
                           .values(state=_RECORDED.value, resolved_at=bindparam("now"), next_attempt_at=None))


def _append(conn: Connection, record: AuditRecord) -> None:
    """Append one record to the chain, in the caller's transaction (so with the state change it describes).

    Redaction comes before hashing: a secret can never be part of what the chain commits to.
    """
    _append_many(conn, (record,))


def _append_many(conn: Connection, records: Sequence[AuditRecord | RenderedRecord]) -> None:
    """Append records in order, as ``_append`` does one by one, with 3 statements in all instead of 3 each.

    Same chain, same transaction: the head is read (and locked) once, the hashes computed in order, the
    rows inserted with one executemany, the head moved once. The Vault audit merge appends hundreds of
    records a transaction; per-record statements cost ~0.3 ms each through SQLAlchemy (scripts/bench_audit.py).
    A record that comes rendered (``RenderedRecord``: redacted, its canonical bytes around the seq) is only
    numbered and hashed here.
    """
    if not records:
        return
    seq, head = P_HEAD_FOR_UPDATE.execute(conn).fetchone()
    prev = bytes.fromhex(head)
    prev_hex = prev.hex()
    rows: list[dict[str, Any]] = []
    for record in records:
        seq += 1
        if isinstance(record, RenderedRecord):
            digest = chain_hash(prev, record.body(seq))
            values = dict(zip(_RECORD_FIELDS, record.values, strict=True))
        else:
            red = record.redacted()
            digest = chain_hash(prev, canonical_record(red, seq))
            # The record's own __dict__ (its fields, nothing else: no slots, no properties stored), copied
            # in C; not asdict(), which deep-copies every value.
            values = vars(red)
        digest_hex = digest.hex()
        rows.append({**values, "seq": seq, "prev_hash": prev_hex, "hash": digest_hex})
        prev, prev_hex = digest, digest_hex
    P_INSERT_AUDIT.executemany(conn, rows)
    P_MOVE_HEAD.execute(conn, {"new_seq": seq, "new_hash": prev_hex})


def _insert_tokens(conn: Connection, tokens: Mapping[str, tuple[str, str | None]], now: float) -> None:
    """Learn tokens not yet known: the first learning of an accessor stands."""
    if tokens:
        P_LEARN_TOKEN.executemany(conn, [{"accessor_hmac": a, "task": t, "lease": lease, "learned_at": now}
                                         for a, (t, lease) in tokens.items()])


def _move_intent(conn: Connection, intent_id: str, from_state: IntentState, event: IntentEvent, now: float, *,
                 accessor: str | None = None, attempts: int | None = None,
                 next_attempt_at: float | None = None, vault_ref: tuple[str, str] | None = None) -> bool:
    """One transition of the intent table, compare-and-set, in the caller's transaction.

    ``vault_ref`` is (kind, id): what Vault's answer named (``"lease"`` and a lease id, ``"token"`` and an
    accessor), recorded for a journaled intent whose answer arrived but could not be recorded.
    """
    to = next_state(from_state, event)
    values: dict[str, Any] = {"state": to.value}
    if to in FINAL:
        values.update(resolved_at=now, next_attempt_at=None)
    else:
        values["next_attempt_at"] = next_attempt_at
    if attempts is not None:
        values["attempts"] = attempts
    if accessor is not None:
        values["accessor"] = accessor
    if vault_ref is not None:
        values["vault_ref_kind"], values["vault_ref"] = vault_ref
    res = conn.execute(update(intents).where(intents.c.id == intent_id, intents.c.state == from_state.value)
                       .values(**values))
    return bool(res.rowcount == 1)


def _fence(conn: Connection, task_ids: list[str], *, event: TaskEvent, now: float, retry_after: float,
           revocation_id: str | None) -> list[TaskRow]:
    """Move the tasks along ``event`` (``TASKS``), fence their tokens (``TOKENS``) and leases (``LEASES``).

    Compare-and-set on the table's source states: a task that left active meanwhile is not matched, and
    is not among the rows returned.
    """
    fenced: list[TaskRow] = []
    for chunk in _chunks(task_ids):
        res = conn.execute(
            update(tasks).where(tasks.c.id.in_(chunk), tasks.c.state.in_(_vals(TASKS.sources(event))),
                                tasks.c.token_state.in_(_vals(TOKENS.sources(TokenEvent.FENCED))))
            # The caller settles these now; the maintenance loop takes over only if it has not finished by
            # then (else both would revoke and confirm the same task at once).
            .values(state=TASKS.target(event).value, ended_at=now, token_state=TOKENS.target(TokenEvent.FENCED).value,
                    next_attempt_at=now + retry_after, revocation_id=revocation_id)
            .returning(*tasks.c)
        )
        fenced += [TaskRow(**r) for r in res.mappings()]
    moved = 0
    for chunk in _chunks([t.id for t in fenced]):
        moved += _move_leases(conn, leases.c.task_id.in_(chunk), LeaseEvent.FENCED)
    if revocation_id is not None:
        # The counts as they were at the fence, for the operator's progress report.
        conn.execute(update(revocations).where(revocations.c.id == revocation_id)
                     .values(tasks=len(fenced), leases=moved))
    return fenced


def _move_token(conn: Connection, task_id: str, event: TokenEvent, **values: Any) -> bool:
    """A task token along ``TOKENS`` (compare-and-set); False when it was in no state ``event`` applies in."""
    res = conn.execute(update(tasks).where(tasks.c.id == task_id, tasks.c.token_state.in_(_vals(TOKENS.sources(event))))
                       .values(token_state=TOKENS.target(event).value, **values))
    return bool(res.rowcount == 1)


def _move_leases(conn: Connection, which: Any, event: LeaseEvent, **values: Any) -> int:
    """The leases ``which`` selects along ``LEASES`` (compare-and-set); how many moved.

    A move out of ``active`` recounts ``tasks.live_leases`` for the tasks of those leases (off the
    issuance path: expiry, fencing), so the budgets never drift from the leases themselves.
    """
    res = conn.execute(update(leases).where(which, leases.c.state.in_(_vals(LEASES.sources(event))))
                       .values(state=LEASES.target(event).value, **values))
    moved = int(res.rowcount)
    if moved and LeaseState.ACTIVE in LEASES.sources(event):
        live = (select(func.count()).select_from(leases)
                .where(leases.c.task_id == tasks.c.id, leases.c.state == LeaseState.ACTIVE.value).scalar_subquery())
        conn.execute(update(tasks).where(tasks.c.id.in_(select(leases.c.task_id).where(which)))
                     .values(live_leases=live))
    return moved


def _check_locks(conn: Connection, *, user: str, email: str | None, agent: str, tenant: str) -> None:
    # An absent email or subject binds as "" (never a lock's value: selectors are non-empty), not NULL, so
    # the SQL stays one shape.
    subject = user.partition("#")[2]
    hit = P_LOCK_HIT.execute(conn, {"user": user, "email": email or "", "subject": subject, "agent": agent,
                                    "tenant": tenant}).fetchone()
    if hit is not None:
        msg = f"an operator has locked this {hit[1]}"
        raise Locked(msg, reason=f"lock {hit[0]} on {hit[1]}")


def _check_budget(conn: Connection, *, user: str, agent: str, limits: LeaseLimits, counted: int = 0) -> None:
    """Raise unless the agent and the user hold fewer live leases than allowed, not counting ``counted``
    leases this transaction already added (the one it is recording)."""
    by_agent = (P_LIVE_BY_AGENT.execute(conn, {"agent": agent}).fetchone()[0] or 0) - counted
    by_user = ((P_LIVE_BY_USER.execute(conn, {"user": user}).fetchone()[0] or 0) - counted
               if by_agent < limits.per_agent else 0)
    if by_agent >= limits.per_agent:
        raise BudgetExceeded("this agent holds as many live credentials as allowed",
                             reason=f"agent {agent} holds {by_agent} live leases", retry_after=30)
    if by_user >= limits.per_user:
        raise BudgetExceeded("this user's agents hold as many live credentials as allowed",
                             reason=f"user {user} holds {by_user} live leases", retry_after=30)


def _by_task(q: Select[Any], *, user: str | None, agent: str | None, task: str | None,
             tenant: str | None) -> Select[Any]:
    """Narrow a query over tasks (or leases joined to tasks) to a user, agent, task or tenant.

    ``user`` is a person id, or an email address meaning every person whose tokens carried it trusted
    (and the tasks that recorded it): what an operator who names someone by address means.
    """
    if user is not None:
        q = q.where(_user_is(tasks.c.user, user, email_column=tasks.c.user_email))
    for col, value in ((tasks.c.agent, agent), (tasks.c.id, task), (tasks.c.tenant, tenant)):
        if value is not None:
            q = q.where(col == value)
    return q


def _user_is(column: Any, user: str, *, email_column: Any = None) -> Any:
    """``column`` (a person id) is ``user``: that id, or, for an address, any person known by it."""
    if is_person_id(user):
        return column == user
    email = normalize_email(user)
    known = column.in_(select(person_emails.c.person).where(person_emails.c.email == email))
    # Rows from before person ids (migration 0009) hold the old name itself.
    legacy = column == user
    return or_(known, legacy, email_column == email) if email_column is not None else or_(known, legacy)


def _remember_person(conn: Connection, person: Person, now: float) -> None:
    """Note the address ``person``'s token claimed (once per address; concurrent first sightings are fine)."""
    if person.email is None:
        return
    values = {"person": person.id, "email": person.email, "first_seen": now}
    if conn.dialect.name == "postgresql":
        conn.execute(pg_insert(person_emails).values(**values).on_conflict_do_nothing())
    else:
        conn.execute(sqlite_insert(person_emails).values(**values).on_conflict_do_nothing())


def _is_remembered(conn: Connection, person: Person) -> bool:
    """Whether the address ``person``'s token claims is already noted for them (or it claims none)."""
    if person.email is None:
        return True
    return conn.execute(select(person_emails.c.person).where(person_emails.c.person == person.id,
                                                            person_emails.c.email == person.email)).first() is not None


def _persons_sharing_email(person: str) -> Select[Any]:
    """Every person id that claimed an address ``person`` claimed (``person`` included)."""
    mine = select(person_emails.c.email).where(person_emails.c.person == person)
    return select(person_emails.c.person).where(person_emails.c.email.in_(mine))


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    # Bounded IN lists: SQLite caps the bound parameters of one statement.
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _cursor(after: str) -> tuple[float, str]:
    """A page cursor is ``<time>:<id>`` of the last row seen. Raises: BadRequest."""
    from broker.errors import BadRequest

    at, sep, last = after.partition(":")
    try:
        when = float(at) if len(at) <= 32 and len(last) <= 64 else math.nan
    except ValueError:
        when = math.nan
    if not sep or not math.isfinite(when):
        msg = "after is not a cursor this API returned"
        raise BadRequest(msg)
    return when, last


def _lease(r: Any) -> LeaseRow:
    d = dict(r)
    d["renewable"] = bool(d["renewable"])
    return LeaseRow(**d)


