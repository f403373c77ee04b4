"""Every node's audit file merged into one chain (broker.audit.tailers): each Vault request once, gaps per file.

The lines are the captured OpenBao entries of ``tests/data/openbao_audit.jsonl`` (7 ``vault.unexplained``
records per copy, see test_tailer_files). A cluster's nodes write the same entry into several files.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

from broker.audit.tailer import VaultAuditTailer
from broker.audit.tailers import VaultAuditTailers
from broker.config import Settings, load_settings
from broker.store import Store, open_store
from tests.unit.test_tailer_files import PER_COPY, copy_with_ids


async def merged(store: Store) -> Counter[str]:
    return Counter(r.record.vault_request_id for r in await store.query_audit(limit=10_000)
                   if r.record.event == "vault.unexplained")


def tailers(store: Store, logs: list[Path]) -> VaultAuditTailers:
    return VaultAuditTailers([VaultAuditTailer(store=store, path=p, broker_paths=["pki/issue/agents"],
                                               start="beginning", chunk_bytes=4096, dedupe=True) for p in logs],
                             poll_interval=0.02)


class TestNodeFiles:
    async def test_the_same_entry_in_three_files_is_merged_once(self, tmp_path: Path) -> None:
        """Three files with overlapping entries (a leader change: each file has some the others lack): the
        chain holds each request exactly once, and every request of any file."""
        store = await open_store(f"sqlite:///{tmp_path / 'b.db'}")
        logs = [tmp_path / f"node{i}.log" for i in (1, 2, 3)]
        try:
            logs[0].write_bytes(copy_with_ids("a") + copy_with_ids("b"))
            logs[1].write_bytes(copy_with_ids("b") + copy_with_ids("c"))
            logs[2].write_bytes(copy_with_ids("a") + copy_with_ids("c") + copy_with_ids("d"))
            t = tailers(store, logs)
            await t.catch_up()
            got = await merged(store)
            assert len(got) == 4 * PER_COPY and set(got.values()) == {1}
            with logs[1].open("ab") as f:  # written later by another node, again overlapping
                f.write(copy_with_ids("d") + copy_with_ids("e"))
            await t.catch_up()
            got = await merged(store)
            assert len(got) == 5 * PER_COPY and set(got.values()) == {1}
        finally:
            await store.close()

    async def test_a_truncated_file_is_a_gap_of_that_file(self, tmp_path: Path) -> None:
        """A truncation is reported for the file it happened to, and the other files go on."""
        store = await open_store(f"sqlite:///{tmp_path / 'b.db'}")
        logs = [tmp_path / "node1.log", tmp_path / "node2.log"]
        try:
            logs[0].write_bytes(copy_with_ids("a"))
            logs[1].write_bytes(copy_with_ids("b"))
            t = tailers(store, logs)
            await t.catch_up()
            logs[0].write_bytes(copy_with_ids("c")[:200])
            with logs[1].open("ab") as f:
                f.write(copy_with_ids("d"))
            await t.catch_up()
            gaps = [r.record for r in await store.query_audit(limit=10_000) if r.record.event == "vault.audit_gap"]
            assert [g.resource for g in gaps] == [str(logs[0])]
            assert "d-" in "".join(await merged(store))
        finally:
            await store.close()

    async def test_run_forever_merges_and_stops_cleanly(self, tmp_path: Path) -> None:
        store = await open_store(f"sqlite:///{tmp_path / 'b.db'}")
        logs = [tmp_path / "node1.log", tmp_path / "node2.log"]
        try:
            for p in logs:
                p.write_bytes(copy_with_ids("a"))
            task = asyncio.create_task(tailers(store, logs).run_forever())
            for _ in range(200):
                if len(await merged(store)) == PER_COPY:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert set((await merged(store)).values()) == {1} and len(await merged(store)) == PER_COPY
        finally:
            await store.close()


class TestClusterSettings:
    def _load(self, tmp_path: Path, vault: str, env: dict[str, str] | None = None) -> Settings:
        (tmp_path / "b.toml").write_text(f'[server]\naudience = "a"\n[vault]\ntoken_file = "t"\n{vault}\n'
                                         '[store]\nkey_file = "k"\n')
        return load_settings(env or {}, tmp_path / "b.toml")

    def test_addr_and_audit_log_take_a_string_or_a_list(self, tmp_path: Path) -> None:
        one = self._load(tmp_path, 'addr = "http://127.0.0.1:8200"\naudit_log = "a.log"')
        assert one.vault.addrs == ("http://127.0.0.1:8200",)
        assert one.vault.audit_logs == (tmp_path / "a.log",)
        many = self._load(tmp_path, 'addr = ["http://127.0.0.1:8200", "http://127.0.0.1:8210"]\n'
                                    'audit_log = ["a.log", "/var/log/b.log"]')
        assert many.vault.addrs == ("http://127.0.0.1:8200", "http://127.0.0.1:8210")
        assert many.vault.audit_logs == (tmp_path / "a.log", Path("/var/log/b.log"))

    def test_the_environment_may_give_a_list(self, tmp_path: Path) -> None:
        s = self._load(tmp_path, "", {"BROKER_VAULT_ADDR": "http://127.0.0.1:1, http://127.0.0.1:2"})
        assert s.vault.addrs == ("http://127.0.0.1:1", "http://127.0.0.1:2")

    def test_duplicates_and_empty_lists_are_refused(self, tmp_path: Path) -> None:
        import pytest

        from broker.errors import ConfigError

        for bad in ('addr = []', 'addr = ["http://a:1", "http://a:1"]', 'audit_log = ["a.log", "a.log"]'):
            with pytest.raises(ConfigError):
                self._load(tmp_path, bad)
