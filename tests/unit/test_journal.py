"""The issuance journal's decisions (broker.journal), without a server: every outcome of a given-up intent."""

from __future__ import annotations

from broker.audit.vaultlog import VaultAuditEntry, VaultAuth, is_request_line
from broker.journal import (
    ISSUED,
    MARGIN,
    VAULT_MAX_REQUEST,
    JournalMode,
    decide,
    entries_of,
    failed_read_window,
    issued_entries_of,
    probe_result,
)
from broker.rows import Intent, JournalEntry

T0 = 1_800_000_000.0
TIMEOUT = 5.0
INTENT = Intent(id="lse_aaaaaaaaaaaa", kind="lease", task_id="tsk_1", grant="db", accessor=None, created_at=T0,
                state="aborting", journaled=True)
TASK_AUTH = VaultAuth(display_name="token-task", policies=("broker-task-r",), accessor="hmac-sha256:x",
                      metadata={"task": "tsk_1", "role": "r"}, token_type="service")


def entry(kind: str, **kw: object) -> JournalEntry:
    base: dict[str, object] = {"intent_id": INTENT.id, "kind": kind, "task_id": "tsk_1", "request_id": "r1",
                               "at": T0 + 0.1, "failed": False}
    return JournalEntry(**{**base, **kw})  # type: ignore[arg-type]


def audit(kind: str, auth: VaultAuth | None, intent: str | None = INTENT.id, **kw: object) -> VaultAuditEntry:
    return VaultAuditEntry(type=kind, time=T0 + 0.1, request_id="r1", path="database/creds/ro",  # type: ignore[arg-type]
                           operation="read", auth=auth, intent=intent, **kw)  # type: ignore[arg-type]


class TestDecide:
    def test_an_answer_the_broker_received_is_revoked_by_what_it_named(self) -> None:
        held = Intent(**{**INTENT.__dict__, "vault_ref": "database/creds/ro/abc", "vault_ref_kind": "lease"})
        d = decide(held, [], read_until=None, now=T0 + 1, vault_timeout=TIMEOUT)
        assert (d.action, d.ref, d.ref_kind) == ("revoke", "database/creds/ro/abc", "lease")

    def test_the_journals_lease_is_revoked(self) -> None:
        d = decide(INTENT, [entry("request"), entry("response", lease_id="database/creds/ro/x")],
                   read_until=T0 + 1, now=T0 + 2, vault_timeout=TIMEOUT)
        assert (d.action, d.ref, d.ref_kind) == ("revoke", "database/creds/ro/x", "lease")

    def test_a_refused_read_issued_nothing(self) -> None:
        d = decide(INTENT, [entry("response", failed=True)], read_until=T0 + 1, now=T0 + 2, vault_timeout=TIMEOUT)
        assert d.action == "nothing"

    def test_a_token_named_only_by_its_hmac_dies_with_its_task(self) -> None:
        d = decide(INTENT, [entry("response", accessor="hmac-sha256:abc")], read_until=None, now=T0 + 2,
                   vault_timeout=TIMEOUT)
        assert d.action == "task_bound"
        d = decide(INTENT, [entry("response", accessor="plainaccessor")], read_until=None, now=T0 + 2,
                   vault_timeout=TIMEOUT)
        assert (d.action, d.ref_kind) == ("revoke", "token")

    def test_a_received_read_waits_for_vaults_own_deadline_before_it_is_task_bound(self) -> None:
        early = decide(INTENT, [entry("request")], read_until=T0 + 50, now=T0 + 50, vault_timeout=TIMEOUT)
        late = decide(INTENT, [entry("request")], read_until=T0 + 200, now=T0 + 0.1 + VAULT_MAX_REQUEST + MARGIN + 1,
                      vault_timeout=TIMEOUT)
        assert (early.action, late.action) == ("wait", "task_bound")

    def test_silence_counts_only_once_the_journal_is_read_past_the_deadline(self) -> None:
        deadline = T0 + TIMEOUT + MARGIN
        assert decide(INTENT, [], read_until=None, now=deadline + 100, vault_timeout=TIMEOUT).action == "wait"
        before = decide(INTENT, [], read_until=deadline - 0.01, now=deadline + 1, vault_timeout=TIMEOUT)
        assert (before.action, before.probe) == ("wait", True)
        assert decide(INTENT, [], read_until=deadline + 0.01, now=deadline + 1, vault_timeout=TIMEOUT).action \
            == "nothing"
        # Before the deadline no probe is needed: the read may still arrive.
        assert not decide(INTENT, [], read_until=None, now=T0 + 1, vault_timeout=TIMEOUT).probe

    def test_another_tasks_entries_never_speak_for_the_intent(self) -> None:
        d = decide(INTENT, [entry("response", task_id="tsk_2", failed=True)], read_until=None, now=T0 + 1,
                   vault_timeout=TIMEOUT)
        assert d.action == "wait"


    def test_a_backend_error_searches_for_a_leftover_once_the_log_is_read_past_it(self) -> None:
        """Rule 9: an error from Vault's backend (not a refusal) may have left a lease the log does not name:
        once the journal is read past the answer, search the request's path from its request to its answer."""
        got = [entry("request", at=T0 + 0.1),
               entry("response", at=T0 + 0.3, vault_error=True, path="pki/issue/agents")]
        d = decide(INTENT, got, read_until=T0 + 0.3 + MARGIN, now=T0 + 9, vault_timeout=TIMEOUT)
        assert d.action == "wait"
        d = decide(INTENT, got, read_until=T0 + 1 + MARGIN, now=T0 + 9, vault_timeout=TIMEOUT)
        assert (d.action, d.ref, d.since, d.until) == ("search", "pki/issue/agents", T0 + 0.1, T0 + 0.3)

    def test_a_token_create_the_backend_failed_is_bound_to_its_task_not_searched(self) -> None:
        """Rule 9 for a child-token grant: what a cut-short token create may leave is a child of the task
        token, not a lease under a path the broker may list, so it is settled as task-bound at once (the
        crash test once saw such an intent wait forever for a listing Vault denies)."""
        got = [entry("request", at=T0 + 0.1),
               entry("response", at=T0 + 0.3, vault_error=True, path="auth/token/create/agent-child")]
        for read_until in (None, T0 + 1 + MARGIN):
            d = decide(INTENT, got, read_until=read_until, now=T0 + 1, vault_timeout=TIMEOUT)
            assert d.action == "task_bound"
            assert "r1" in d.reason and "dies with it" in d.reason
        roleless = [got[0], entry("response", at=T0 + 0.3, vault_error=True, path="auth/token/create")]
        assert decide(INTENT, roleless, read_until=None, now=T0 + 1, vault_timeout=TIMEOUT).action == "task_bound"


class TestFailedReadWindow:
    def test_from_the_intent_less_the_clocks_margin_to_the_answer(self) -> None:
        assert failed_read_window(T0, T0 + 0.4) == (T0 - MARGIN, T0 + 0.4)

    def test_an_intent_kept_long_does_not_widen_it_past_vaults_request_limit(self) -> None:
        assert failed_read_window(T0 - 86_400, T0) == (T0 - VAULT_MAX_REQUEST, T0)

    def test_a_broker_clock_ahead_of_vaults_still_covers_the_answer(self) -> None:
        since, until = failed_read_window(T0 + 3, T0)
        assert since == T0 - MARGIN and until == T0


class TestEntries:
    def test_only_a_task_tokens_entries_are_the_journal(self) -> None:
        agent_token = VaultAuth(display_name="t", policies=(), accessor="hmac-sha256:y", metadata={},
                                token_type="service")
        issuance = VaultAuth(display_name="t", policies=(), accessor="hmac-sha256:z",
                             metadata={"task": "tsk_1", "lease": "lse_bbbbbbbbbbbb"}, token_type="service")
        got = entries_of([audit("response", TASK_AUTH, lease_id="database/creds/ro/1"),
                          audit("response", agent_token, lease_id="database/creds/ro/2"),
                          audit("response", issuance, lease_id="database/creds/ro/3"),
                          audit("response", TASK_AUTH, intent=None, lease_id="database/creds/ro/4")])
        assert [e.lease_id for e in got] == ["database/creds/ro/1"]

    def test_a_refusal_is_not_a_backend_error(self) -> None:
        """Permission denied comes before the backend runs: ``failed``, nothing to search for. Any other
        error is the backend's: ``vault_error``, with the request's path (rule 9)."""
        refused, broken = entries_of([
            audit("response", TASK_AUTH, error=True, error_kind="permission denied"),
            audit("response", TASK_AUTH, error=True, error_kind="error")])
        assert (refused.failed, refused.vault_error, refused.path) == (True, False, None)
        assert (broken.failed, broken.vault_error, broken.path) == (False, True, "database/creds/ro")

    def test_an_issuance_tokens_answers_are_named_for_the_sweep_only(self) -> None:
        """Answers of a token whose metadata names task, lease and grant, that created a lease or a token the
        log names in plain text, become ``issued`` entries of that lease's intent; nothing else does, and
        ``decide`` never reads them (rule 7)."""
        issuance = VaultAuth(display_name="t", policies=(), accessor="hmac-sha256:z", token_type="service",
                             metadata={"task": "tsk_1", "lease": INTENT.id, "grant": "db"})
        no_grant = VaultAuth(display_name="t", policies=(), accessor="hmac-sha256:w", token_type="service",
                             metadata={"task": "tsk_1", "lease": INTENT.id})
        got = issued_entries_of([
            audit("response", issuance, intent=None, lease_id="database/creds/ro/1"),
            audit("response", issuance, intent=None, created_accessor="plainacc"),
            audit("response", issuance, intent=None, created_accessor="hmac-sha256:child"),  # not revocable
            audit("response", issuance, intent=None, error=True, lease_id="database/creds/ro/2"),
            audit("request", issuance, intent=None),
            audit("response", TASK_AUTH, intent=None, lease_id="database/creds/ro/3"),  # a task token's
            audit("response", no_grant, intent=None, lease_id="database/creds/ro/4"),
            audit("response", issuance, lease_id="database/creds/ro/5"),  # carries the header: the journal's
        ])
        assert [(e.intent_id, e.kind, e.task_id, e.lease_id, e.accessor) for e in got] == [
            (INTENT.id, ISSUED, "tsk_1", "database/creds/ro/1", None), (INTENT.id, ISSUED, "tsk_1", None, "plainacc")]
        wait = decide(INTENT, got, read_until=None, now=T0 + 1, vault_timeout=TIMEOUT)
        assert wait.action == "wait"

    def test_an_issuance_tokens_backend_error_is_kept_for_the_leftover_search(self) -> None:
        """Rule 9 for reads made with an issuance token: a backend error (not a refusal) is kept with its path,
        naming nothing; a token create's is not (what it may leave is the issuance token's child), nor a
        renewal's (``sys/``: the same token's second request, on no grant path)."""
        issuance = VaultAuth(display_name="t", policies=(), accessor="hmac-sha256:z", token_type="service",
                             metadata={"task": "tsk_1", "lease": INTENT.id, "grant": "db"})
        got = issued_entries_of([
            audit("response", issuance, intent=None, error=True, error_kind="error"),
            audit("response", issuance, intent=None, error=True, error_kind="permission denied"),
            VaultAuditEntry(type="response", time=T0 + 0.2, request_id="r2", path="auth/token/create/child",
                            operation="update", auth=issuance, intent=None, error=True, error_kind="error"),
            # The broker's renewal of the lease with the same token: not the read, and never listable.
            VaultAuditEntry(type="response", time=T0 + 0.3, request_id="r3", path="sys/leases/renew",
                            operation="update", auth=issuance, intent=None, error=True, error_kind="error"),
        ])
        assert [(e.kind, e.vault_error, e.path, e.lease_id, e.accessor, e.failed) for e in got] == [
            (ISSUED, True, "database/creds/ro", None, None, False)]

    def test_the_probe_shows_how_the_device_writes_accessors(self) -> None:
        broker = VaultAuth(display_name="agent-broker", policies=("agent-broker",), accessor="acc-plain",
                           metadata={}, token_type="service")
        [probe] = entries_of([audit("response", broker, intent="jpr_probeprobe1")])
        assert probe_result([probe], own_accessor="acc-plain") == (True, True)
        assert probe_result([probe], own_accessor="other") == (True, False)
        assert probe_result([], own_accessor="acc-plain") is None

    def test_request_lines_naming_an_intent_are_parsed_not_skipped(self) -> None:
        plain = b'{"time":"2026-12-01T00:00:00Z","type":"request","auth":{},"request":{"id":"1"}}'
        journaled = (b'{"time":"2026-12-01T00:00:00Z","type":"request","auth":{},'
                     b'"request":{"id":"1","headers":{"x-broker-intent":["lse_x"]}}}')
        assert is_request_line(plain) and not is_request_line(journaled)


class TestMode:
    def test_nothing_is_journaled_before_the_probe_and_tokens_need_plain_accessors(self) -> None:
        mode = JournalMode()
        assert not mode.covers("database/creds/ro")
        mode.ready = True
        assert mode.covers("database/creds/ro") and not mode.covers("auth/token/create/child")
        mode.plain_accessors = True
        assert mode.covers("auth/token/create/child")
