"""The tailer's file handling without OpenBao: rotations while it is down, truncation, unfinished lines.

The lines are the captured OpenBao entries of ``tests/data/openbao_audit.jsonl``; the store knows none
of their tasks, so each response by a task's token (6) and the stranger's (1) becomes one
``vault.unexplained`` record: 7 per copy of the capture.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from broker.audit.tailer import VaultAuditTailer
from broker.store import Store, open_store

DATA = Path(__file__).parent.parent / "data" / "openbao_audit.jsonl"
PER_COPY = 7


def copy_with_ids(tag: str) -> bytes:
    """The capture with request ids made unique per copy."""
    out = []
    for line in DATA.read_text().splitlines():
        e = json.loads(line)
        e["request"]["id"] = f"{tag}-{e['request']['id']}"
        out.append(json.dumps(e))
    return ("\n".join(out) + "\n").encode()


async def merged(store: Store) -> Counter[str]:
    return Counter(r.record.vault_request_id for r in await store.query_audit(limit=10_000)
                   if r.record.event == "vault.unexplained")


def tailer(store: Store, log: Path, start: str = "beginning") -> VaultAuditTailer:
    return VaultAuditTailer(store=store, path=log, broker_paths=["pki/issue/agents"], start=start,  # type: ignore[arg-type]
                            chunk_bytes=4096)


class TestTailerFiles:
    async def test_two_rotations_while_down(self, tmp_path: Path) -> None:
        """Files rotated twice while no tailer ran are all read, each line once, across restarts."""
        store = await open_store(f"sqlite:///{tmp_path / 'b.db'}")
        log = tmp_path / "audit.log"
        try:
            log.write_bytes(copy_with_ids("a"))
            t = tailer(store, log)
            await t.catch_up()
            with log.open("ab") as f:
                f.write(copy_with_ids("b"))
            t.close()  # "killed" after the first copy
            os.rename(log, tmp_path / "audit.log.1")
            with (tmp_path / "audit.log.1").open("ab") as f:  # written after the rename, before the reopen
                f.write(copy_with_ids("c"))
            log.write_bytes(copy_with_ids("d"))
            os.rename(log, tmp_path / "audit.log.2")
            log.write_bytes(copy_with_ids("e")[:-100])  # the last line is unfinished
            t = tailer(store, log)
            await t.catch_up()
            got = await merged(store)
            # All of a-d, and e but its unfinished last line (the stranger's response).
            assert len(got) == 5 * PER_COPY - 1 and set(got.values()) == {1}
            with log.open("ab") as f:
                f.write(copy_with_ids("e")[-100:])
            await t.catch_up()
            got = await merged(store)
            assert len(got) == 5 * PER_COPY and set(got.values()) == {1}
            t.close()
        finally:
            await store.close()

    async def test_first_start_at_the_end_and_truncation(self, tmp_path: Path) -> None:
        """By default the first start skips what is there (keeping an unfinished line); a truncated file
        restarts at 0 with a vault.audit_gap record."""
        store = await open_store(f"sqlite:///{tmp_path / 'b.db'}")
        log = tmp_path / "audit.log"
        try:
            whole = copy_with_ids("a")
            log.write_bytes(whole[:-50])
            t = tailer(store, log, start="end")
            await t.catch_up()
            with log.open("ab") as f:
                f.write(whole[-50:] + copy_with_ids("b"))
            await t.catch_up()
            got = await merged(store)
            # The unfinished last line was a response by the stranger: it is merged once finished.
            assert len(got) == PER_COPY + 1
            log.write_bytes(copy_with_ids("c"))  # smaller than before: truncated
            await t.catch_up()
            events = [r.record.event for r in await store.query_audit(limit=10_000)]
            assert events.count("vault.audit_gap") == 1 and len(await merged(store)) == 2 * PER_COPY + 1
            t.close()
        finally:
            await store.close()
