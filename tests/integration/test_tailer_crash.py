"""The Vault audit tailer under SIGKILL and log rotation: no entry lost, none duplicated.

A throwaway OpenBao takes a steady load of requests made with tokens that carry broker task metadata
(tasks the store never recorded, so each response becomes one ``vault.unexplained`` record). Meanwhile
the tailer runs in a subprocess against a SQLite store and is SIGKILLed at random moments, again and
again, and OpenBao's audit file is rotated (rename, then SIGHUP: OpenBao reopens the path) mid-stream.
The oracle is Vault's own files: every response entry with task metadata, in every rotated file, must
be in the chain exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from broker.audit import AuditRecord, ChainLink, verify_chain
from broker.dev.stack import DevOpenBao
from broker.store import open_store
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin

TAILER = """
import asyncio, sys
from broker.store import open_store
from broker.audit.tailer import VaultAuditTailer

async def main() -> None:
    store = await open_store(sys.argv[1], migrate=False)
    tailer = VaultAuditTailer(store=store, path=sys.argv[2], broker_paths=["database/creds/none"],
                              start="beginning", poll_interval=0.02, chunk_bytes=int(sys.argv[3]))
    await tailer.run_forever()

asyncio.run(main())
"""

KILLS = 12
ROTATIONS = 3
TOKENS = 8
CONCURRENCY = 6


# Marks the tailers this module starts, and so their ingest workers (which inherit the environment): the
# stray check counts only those, not the workers of brokers that another pytest worker runs beside it.
MARK_NAME, MARK_VALUE = "BROKER_TEST_TAILER_RUN", secrets.token_hex(8)
MARK = f"{MARK_NAME}={MARK_VALUE}".encode()  # as it reads in /proc/<pid>/environ


def start_tailer(db_url: str, audit_log: Path, chunk: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", TAILER, db_url, str(audit_log), str(chunk)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, MARK_NAME: MARK_VALUE},
                            cwd=Path(__file__).resolve().parents[2])


def stray_ingest_workers() -> list[int]:
    """Ingest worker processes (``broker.audit.ingest``) of this module's tailers that are not this test
    process's own children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            ours = b"broker.audit.ingest" in cmdline and MARK in (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ours and ppid != os.getpid():
            found.append(int(entry.name))
    return found


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def vault_request_ids(workdir: Path) -> list[str]:
    """Request ids of every response entry with task metadata, in every audit file (rotated ones too)."""
    ids: list[str] = []
    for f in sorted(workdir.glob("audit.log*")):
        for line in f.read_bytes().splitlines():
            if not line.strip():
                continue
            e = json.loads(line)
            if e.get("type") == "response" and ((e.get("auth") or {}).get("metadata") or {}).get("task"):
                ids.append(e["request"]["id"])
    return ids


def verify(db: Path) -> int:
    """Recompute the hash chain the SIGKILLed tailers wrote. Raises: AuditChainBroken."""
    names = tuple(AuditRecord.__dataclass_fields__)
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM audit_events ORDER BY seq").fetchall()
    links = [ChainLink(r["seq"], AuditRecord(**{k: r[k] for k in names}), r["prev_hash"], r["hash"]) for r in rows]
    return verify_chain(links)[0]


def merged_ids(db: Path) -> Counter[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT vault_request_id FROM audit_events WHERE event LIKE 'vault.%' "
                            "AND vault_request_id IS NOT NULL").fetchall()
    return Counter(r[0] for r in rows)


@pytest.mark.slow
class TestTailerCrash:
    async def test_kills_and_rotations_lose_and_duplicate_nothing(self, throwaway_openbao: DevOpenBao,
                                                                 tmp_path: Path) -> None:
        """SIGKILL at random points and rotations mid-stream: every Vault entry merged exactly once."""
        bao = throwaway_openbao
        db = tmp_path / "tailer.db"
        db_url = f"sqlite:///{db}"
        store = await open_store(db_url)  # migrate once, before any tailer process
        await store.close()
        rng = random.Random(20261128)
        done = asyncio.Event()
        sent = 0

        async with aiohttp.ClientSession() as session:
            with VaultAdmin(bao.addr, token=bao.root_token) as root:
                tokens = [await asyncio.to_thread(root.create_token, policies=["default"], ttl="10m",
                                                  display_name=f"load-{i}",
                                                  meta={"task": f"tsk_load{i}", "user": "u", "agent": "a"})
                          for i in range(TOKENS)]
            clients = [VaultClient(session, bao.addr, token=t.client_token) for t in tokens]

            async def load(worker: int) -> None:
                nonlocal sent
                for i in range(100_000):  # bounded; stops when the chaos is over
                    if done.is_set():
                        return
                    await clients[(worker + i) % TOKENS].lookup_self()
                    sent += 1
                    await asyncio.sleep(0.005)

            loaders = [asyncio.create_task(load(w)) for w in range(CONCURRENCY)]
            kills = rotations = 0
            try:
                rotate_at = set(rng.sample(range(1, KILLS), ROTATIONS))
                for n in range(KILLS):
                    proc = start_tailer(db_url, bao.audit_log, rng.choice((4096, 8192, 65536)))
                    try:
                        await asyncio.sleep(rng.uniform(0.8, 2.0))
                        if n in rotate_at:
                            # Rename first: OpenBao keeps writing to the renamed file until the SIGHUP.
                            os.rename(bao.audit_log, bao.workdir / f"audit.log.{n}")
                            await asyncio.sleep(rng.uniform(0.05, 0.3))
                            bao.process.send_signal(signal.SIGHUP)
                            rotations += 1
                            await asyncio.sleep(rng.uniform(0.0, 0.3))
                    finally:
                        kill(proc)
                        kills += 1
            finally:
                done.set()
                await asyncio.gather(*loaders)

            # A last tailer, left to catch up with Vault's files.
            expected = vault_request_ids(bao.workdir)
            proc = start_tailer(db_url, bao.audit_log, 65536)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    got = merged_ids(db)
                    if set(expected) <= set(got):
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.5)  # anything merged twice would show up now
                got = merged_ids(db)
            finally:
                kill(proc)

        lost = set(expected) - set(got)
        duplicated = sum(n - 1 for n in got.values() if n > 1)
        stray = set(got) - set(expected)
        print(f"kills={kills} rotations={rotations} requests={sent} vault_entries={len(expected)} "
              f"merged={sum(got.values())} lost={len(lost)} duplicated={duplicated}")
        assert len(expected) == len(set(expected)) and len(expected) >= sent
        assert kills == KILLS and rotations == ROTATIONS
        assert not lost and duplicated == 0 and not stray
        assert len(list(bao.workdir.glob("audit.log.*"))) == ROTATIONS
        assert verify(db) == sum(got.values())
        # A tailer killed while its ingest worker prepared chunks leaves no worker behind: the worker's
        # stdin closes with its parent and it exits.
        deadline = time.monotonic() + 10
        while stray_ingest_workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert stray_ingest_workers() == []
