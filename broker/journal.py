"""Vault's own audit device as the issuance journal: one Vault request per credential, nothing left behind.

An issuance used to read its credential with a fresh child of the task token (its issuance token), so
that one accessor, written in its intent first, named everything the read could create: two Vault
requests per credential. A journaled issuance reads with the task token itself and sends its intent's
id in the ``X-Broker-Intent`` header. Vault's file audit device is synchronous and fail-closed, and it
writes that header in plain text once ``sys/config/auditing/request-headers`` names it (``broker vault
sync`` does): its ``request`` entry says Vault received the read, its ``response`` entry names the lease
(``response.secret.lease_id``, always plain) or the token it created. The audit tailer copies those
entries into the store (``vault_journal``), so after a crash or a lost answer the broker finds what Vault
issued for an intent and revokes exactly that.

Rules this module keeps (it is pure: the decision, no I/O; ``broker.revocations.IntentSettler`` acts):

1. Only entries made by a task token count (its metadata names the task and no lease): an agent's own
   token can send any header, so its entries never speak for an intent, and an entry must come from the
   intent's own task.
2. "Vault never received it" is concluded only from the journal having been read past the last moment
   Vault could have received the read: the intent's creation plus one Vault timeout plus a margin. Only
   entries that carry the header count (``vault_audit_position.last_entry_at``), so a device that stops
   recording it stops the mark instead of vouching for absences. When no issuance moves the journal, the
   settler makes one cheap request carrying a probe id to move it.
3. A ``request`` entry with no ``response`` entry after Vault's own request deadline means Vault could
   not write its answer (a full disk, say): it may have created a lease that nothing names. That lease
   was made by the task token, so it dies with the task: the intent is final as ``task_bound`` and the
   reason says so. A token created by the task token whose accessor the device HMACs is the same case.
4. A journaled intent whose answer the broker did receive holds what it named (``Intent.vault_ref``):
   no journal needed.
5. The journal's entries are read from Vault's audit file only, never from what an agent says.
6. A read can reach Vault after the broker gave up on it (a network that held it, then let it go): its
   answer then appears in the journal after the intent was final. The maintenance loop sweeps such late
   answers (``Store.journal_unswept``) and revokes what they name; nothing an aborted intent obtained
   stays live because it arrived late.
7. An issuance token's answers are swept too (``issued_entries_of``, kind ``issued``): Vault checks a
   token when a request arrives, not when it registers the lease, so a read still inside Vault while its
   issuance token is revoked (the task ended, on another replica, say) makes a lease no token holds,
   and if its answer is lost, only the log names it. Such an entry is found by the token's metadata
   (``task``, ``lease``: the intent's id), which the broker set; it is only ever swept, never read by
   ``decide``, so it can make the broker revoke what that token created and nothing else.
8. A journaled issuance writes its intent once, after Vault answered, in the transaction that records
   the lease (``Store.record_issuance``), or, when it gives up, as ``aborting`` (``give_up_issuance``):
   no store commit before the read. A broker that dies between Vault's answer and that write leaves an
   answer no intent names. The maintenance loop claims such answers once they are older than the intent
   grace (with one broker on SQLite: older than its start) and made in a task this store holds (another
   deployment sharing the Vault and its audit log is not ours to clean up), writing the intent
   ``aborting`` in the answer's task (``orphan_intent``; ``Store.claim_orphan_answers``), and the
   settler revokes what the answer created as for any other. The intent's primary key decides
   between a claim and an issuance still recording it: whichever writes first wins, and a lost
   issuance hands nothing out. So no clock (Vault's, the broker's, the grace) can make the sweep take
   a credential that was handed out.
9. A backend error is not a refusal. OpenBao cancels a request's context when its client disconnects
   (a broker killed mid-read), and a lease registration cut short that way can persist the lease but
   not its index under the token, then fail to delete it: the answer is an error, the log names no
   lease, and revoking the token does not reach it (seen in the crash test: "failed to register lease
   ... context canceled"). So an answer whose error is not a refusal before the backend ran (permission
   denied, invalid token, unsupported path) makes the settler look for such a leftover: the leases
   Vault lists under the request's path, issued between its request and its answer, that neither the
   store nor any journal entry names (every answer that created a lease names it, so a lease being
   recorded right now is excluded), once the journal has been read past the answer. A read made with an
   issuance token (rule 7's answers, on a grant path: not the token's own ``sys/`` renewal) is searched
   the same way once its intent is ``aborted`` (``IntentSettler.search_failed_reads``), from its intent's
   creation, which precedes the read, but never more than Vault's request limit before the answer:
   revoking that token does not reach such a lease either (seen in the crash test, after a restart,
   before the start-up probe made the journal ready). Only an answer of the intent's own task counts
   (rule 1), a path whose search Vault does not answer backs off, and nothing is searched while the
   journal is not known to work: its mark (rule 2) is what says every answer that could name a lease in
   the window has been read. A token create (``auth/token/create[/<role>]``) is not searched: what it
   may leave is a child token of the task token, which dies with it (as rule 3); the broker's policy
   lists no token leases (seen in the crash test: such an intent waited for a listing Vault denies, and
   never settled).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from broker.audit.vaultlog import VaultAuditEntry
from broker.intents import IntentEvent, IntentState, next_state
from broker.rows import Intent, JournalEntry

__all__ = ["ISSUED", "PROBE_PREFIX", "Decision", "JournalMode", "decide", "entries_of", "failed_read_window", "hmacd",
           "issued_entries_of", "new_probe_id", "orphan_intent"]

# Vault's own bound on a request (``max_request_duration``, 90 s by default): an answer is written by then.
VAULT_MAX_REQUEST = 90.0
# Entries are written in about the order of their times, not exactly (one goroutine per request).
MARGIN = 5.0
PROBE_PREFIX = "jpr_"
ISSUED = "issued"  # the kind of an issuance token's answer that created something (rule 7)


def new_probe_id() -> str:
    return PROBE_PREFIX + secrets.token_urlsafe(12)


class JournalMode:
    """Whether Vault's audit device is known to journal issuances, as the start-up probe found it.

    Until the probe's own entry is read back with its header in plain text, issuances use issuance tokens
    (broker.leases rule 2): a device that does not record the header must never be trusted as a journal.
    Token grants need the device to write accessors in plain text too (``hmac_accessor = false``), or a
    lost answer's token could not be revoked by what the log names.
    """

    def __init__(self) -> None:
        self.ready = False
        self.plain_accessors = False

    def covers(self, path: str) -> bool:
        """Whether an issuance on ``path`` is journaled (one Vault request) rather than read with an issuance token."""
        return self.ready and (self.plain_accessors or not path.startswith("auth/token/"))


def entries_of(entries: Iterable[VaultAuditEntry]) -> list[JournalEntry]:
    """The journal's entries among parsed audit entries: those a task token made with an intent header,
    and the start-up probe's (``jpr_...``, made by the broker's own token)."""
    out: list[JournalEntry] = []
    for e in entries:
        if e.intent is None or e.auth is None:
            continue
        if e.intent.startswith(PROBE_PREFIX):
            # The start-up probe (JournalMode): whose token made it shows how the device writes accessors.
            out.append(JournalEntry(intent_id=e.intent, kind=e.type, task_id="", request_id=e.request_id, at=e.time,
                                    failed=e.error, accessor=e.auth.accessor))
            continue
        task = e.auth.metadata.get("task")
        if not task or e.auth.metadata.get("lease"):
            continue  # rule 1: not a task token
        # A refusal (ACL, token, route) comes before the backend runs; any other error is the backend's (rule 9).
        backend = e.error and e.type == "response" and e.error_kind == "error"
        out.append(JournalEntry(intent_id=e.intent, kind=e.type, task_id=task, request_id=e.request_id, at=e.time,
                                failed=e.error and not backend, lease_id=e.lease_id if e.type == "response" else None,
                                accessor=e.created_accessor if e.type == "response" else None,
                                vault_error=backend, path=e.path if backend else None))
    return out


def issued_entries_of(entries: Iterable[VaultAuditEntry]) -> list[JournalEntry]:
    """What issuance tokens' answers created, for the late-answer sweep (rule 7): answers without the
    header, made by a token whose metadata names a task, a lease and a grant, that created a lease or a
    token the log names in plain text; and those answers that are backend errors (rule 9), with their
    path, for the leftover search."""
    out: list[JournalEntry] = []
    for e in entries:
        if e.type != "response" or e.intent is not None or e.auth is None:
            continue
        meta = e.auth.metadata
        task, lease = meta.get("task"), meta.get("lease")
        if not task or not lease or not meta.get("grant"):
            continue
        if e.error:
            # The backend's (not a refusal) on a grant path: the read itself. A token create leaves a child of
            # the issuance token, which its revocation takes; ``sys/`` is the broker's own renewal of the lease.
            if e.error_kind == "error" and not e.path.startswith(("auth/token/", "sys/")):
                out.append(JournalEntry(intent_id=lease, kind=ISSUED, task_id=task, request_id=e.request_id,
                                        at=e.time, failed=False, vault_error=True, path=e.path))
            continue
        accessor = e.created_accessor if e.created_accessor and not hmacd(e.created_accessor) else None
        if e.lease_id is None and accessor is None:
            continue
        out.append(JournalEntry(intent_id=lease, kind=ISSUED, task_id=task, request_id=e.request_id, at=e.time,
                                failed=False, lease_id=e.lease_id, accessor=accessor))
    return out


def hmacd(value: str) -> bool:
    """Whether the device wrote this value HMAC'd (its default for accessors): it cannot be revoked by it."""
    return value.startswith("hmac-")


@dataclass(frozen=True)
class Decision:
    """What to do with a journaled intent the broker gave up on.

    - ``revoke``: revoke ``ref`` (a lease id, or a token accessor) and confirm; then the intent is aborted.
    - ``nothing``: Vault issued nothing for it (it never arrived, or Vault refused it): aborted now.
    - ``task_bound``: Vault may hold something nobody can name; it dies with the task token (rule 3).
    - ``wait``: the log has not been read far enough; ``probe`` asks for a request that moves it.
    - ``search``: Vault's backend failed it; look under the path ``ref`` for a lease it left (rule 9).
    """

    action: Literal["revoke", "nothing", "task_bound", "wait", "search"]
    reason: str
    ref: str | None = None
    ref_kind: Literal["lease", "token"] | None = None
    probe: bool = False
    # ``search`` (rule 9): the leases under ``ref`` (a path) issued in [since, until], Vault's time.
    since: float | None = None
    until: float | None = None


def decide(intent: Intent, entries: Sequence[JournalEntry], *, read_until: float | None, now: float,
           vault_timeout: float) -> Decision:
    """The journal's answer for one ``aborting`` journaled intent (see the module's rules)."""
    if intent.vault_ref is not None:
        kind: Literal["lease", "token"] = "token" if intent.vault_ref_kind == "token" else "lease"
        return Decision("revoke", "Vault's answer named it", ref=intent.vault_ref, ref_kind=kind)
    mine = [e for e in entries if e.task_id == intent.task_id]  # rule 1
    answer = next((e for e in mine if e.kind == "response"), None)
    if answer is not None and answer.vault_error:
        if answer.path is not None and (answer.path == "auth/token/create"
                                        or answer.path.startswith("auth/token/create/")):
            # A token create, cut short: what it may have left is a token, not a lease under a grant path the
            # broker may list, and it was created by the task token under a child role (not an orphan), so it
            # dies with the task token (rule 9, as rule 3).
            return Decision("task_bound", f"Vault's backend failed a token create (request {answer.request_id}); "
                                          "a token it may have left is a child of the task token and dies with it")
        received = next((e for e in mine if e.kind == "request"), None)
        if read_until is None or read_until <= answer.at + MARGIN:
            return Decision("wait", "Vault's backend failed it; the log is read up to its answer first",
                            probe=now > answer.at + MARGIN)
        return Decision("search", f"Vault's backend failed it (request {answer.request_id}); it may have left a "
                                  "lease its log does not name", ref=answer.path,
                        since=received.at if received is not None else answer.at - VAULT_MAX_REQUEST,
                        until=answer.at)
    if answer is not None:
        if answer.failed:
            return Decision("nothing", f"Vault refused it (request {answer.request_id})")
        if answer.lease_id:
            return Decision("revoke", f"Vault's audit log names its lease (request {answer.request_id})",
                            ref=answer.lease_id, ref_kind="lease")
        if answer.accessor and not hmacd(answer.accessor):
            return Decision("revoke", f"Vault's audit log names its token (request {answer.request_id})",
                            ref=answer.accessor, ref_kind="token")
        if answer.accessor:
            return Decision("task_bound", f"Vault created a token (request {answer.request_id}) whose accessor "
                                          "the audit device HMACs; it dies with the task token")
        return Decision("nothing", f"Vault's answer created nothing revocable (request {answer.request_id})")
    received = next((e for e in mine if e.kind == "request"), None)
    if received is not None:
        if now > received.at + VAULT_MAX_REQUEST + MARGIN:
            return Decision("task_bound", f"Vault received it (request {received.request_id}) and wrote no "
                                          "answer; whatever it made dies with the task token")
        return Decision("wait", "Vault received it and has not answered yet")
    deadline = intent.created_at + vault_timeout + MARGIN
    if read_until is not None and read_until > deadline:
        return Decision("nothing", "Vault's audit log, read past the last moment it could arrive, never shows it")
    return Decision("wait", "Vault's audit log has not been read far enough yet", probe=now > deadline)


def failed_read_window(intent_created_at: float, answer_at: float) -> tuple[float, float]:
    """When a lease left by an issuance token's failed read (rule 9) was issued, in Vault's time: from the
    intent's creation (which precedes the read; the broker's clock, so less the margin for the two clocks)
    to the answer, but never starting more than Vault's own request limit before the answer (an intent
    kept long must not widen the search to everything its path issued since)."""
    since = max(min(intent_created_at, answer_at) - MARGIN, answer_at - VAULT_MAX_REQUEST)
    return since, answer_at


def orphan_intent(answer: JournalEntry, *, now: float) -> Intent:
    """The intent the orphan sweep writes for an answer no intent names (rule 8): ``aborting`` in the
    answer's task, due now, born when Vault answered; its grant is unknown (Vault's log does not say)."""
    return Intent(id=answer.intent_id, kind="lease", task_id=answer.task_id, grant=None, accessor=None,
                  created_at=answer.at, state=next_state(IntentState.OPEN, IntentEvent.ABANDONED).value,
                  next_attempt_at=now, journaled=True)


def probe_result(entries: Sequence[JournalEntry], *, own_accessor: str) -> tuple[bool, bool] | None:
    """What the probe's entries say: (journal works, accessors in plain text), or None before its answer is read."""
    answer = next((e for e in entries if e.kind == "response"), None)
    if answer is None:
        return None
    return True, answer.accessor == own_accessor
