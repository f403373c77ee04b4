"""Audit throughput: Vault audit lines ingested per second, and chain records verified per second.

What it measures (issue 4, raised by issue 10; goals: >= 50,000 lines/s ingested, 1,000,000 records verified
in < 5 s)

    **ingest**: the broker's real merge path, ``broker.audit.tailer.VaultAuditTailer.catch_up()`` over an OpenBao
    file-audit log on disk: read the file in 4 MiB chunks (``tailer.CATCH_UP_CHUNK``) and hand them to the ingest worker process
    (``broker.audit.ingest``, two chunks ahead of the commit), which parses them
    (``broker.audit.vaultlog.parse_responses``: request entries skipped by their opening, the rest
    ``parse_line``), looks up tasks and learned tokens on its own read-only connection, ``classify_batch``,
    redacts and renders each record's canonical JSON around its seq; the broker's process appends the records
    to the hash chain plus the tailer's position in one SQLite transaction per chunk (``Store.merge_vault_audit``:
    seq, SHA-256, ``synchronous=FULL``). The lines are REAL OpenBao lines: the
    script starts a dev OpenBao with its file audit device, plays one delegation session against it
    (a task token with the broker's metadata, an issuance token, a KV v2 read on a grant path, a child
    token without metadata, its requests, root on the grant path), captures every line the device
    wrote, and replays that session ``--lines`` / (lines per session) times with fresh request ids,
    times, child-token accessors and a task id drawn from ``--tasks`` tasks that exist in the store.
    Only ``response`` entries become records (about half the lines). lines/s = all lines / wall time;
    cpu_us_per_line = the broker process's CPU time (every thread: loop, workers, store) / lines;
    worker_cpu_us_per_line = the ingest worker process's.

    **verify**: ``broker.checkpoints.StoreVerifier.verify()``, as ``broker audit verify`` and
    ``GET /v1/audit/verify`` run it, over ``--records`` chained records in a SQLite store: the records
    are generated with the real ``broker.audit.canonical_bytes`` / ``chain_hash`` (a realistic mix:
    task starts, issuances, Vault requests, ends), bulk-inserted, and signed checkpoints
    (``broker.audit.signing``, Ed25519) added every ``--checkpoint-every`` records; the verifier then reads the
    store and recomputes everything: page by page in this process below 200,000 records, from there on in
    one worker process per core, each reading and checking stretches of the log on its own connection
    (``broker.audit.parallel``; worker start-up is inside the timing). records/s = records / wall time
    (read + verify). On a shared machine the parallel figure depends on a second core being free.

    **where ingest time goes**: the same stages timed separately on a sample (parse alone, classify
    alone, chain append alone), so a shortfall can be attributed.

Example
    python scripts/bench_audit.py                          # 1,000,000 lines and 1,000,000 records
    python scripts/bench_audit.py --lines 200000 --records 200000 --json /tmp/audit.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _benchlib import machine_info

from broker.audit import GENESIS, AuditRecord, canonical_bytes, chain_hash
from broker.audit.checkpoints import StoreVerifier
from broker.audit.signing import Checkpoint, key_id, sign_checkpoint
from broker.audit.tailer import CATCH_UP_CHUNK, VaultAuditTailer
from broker.audit.vaultlog import classify_batch, parse_responses
from broker.dev.stack import start_dev_openbao
from broker.store import open_store
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin

# Issue 10 raised issue 4's bars (20,000 lines/s, 30 s) to these.
GOAL_LINES = 50_000.0
GOAL_VERIFY_S = 5.0
KV = "bench-kv"
GRANT_PATH = f"{KV}/data/app"
AGENT = "spiffe://example.org/agent/support-bench-{i}"
USER = "user{i}@example.com"
ORIGIN = "bench-broker"


# -- capture: one real delegation session against a dev OpenBao ------------------------------------------


async def capture_session(workdir: Path) -> list[str]:
    """Every line the file audit device wrote for one scripted session (request and response entries)."""
    bao = start_dev_openbao(workdir / "openbao", startup_timeout=30)
    try:
        async with aiohttp.ClientSession() as http:
            root = VaultClient(http, bao.addr, token=bao.root_token)
            setup = VaultAdmin(bao.addr, token=bao.root_token)  # hvac, synchronous: in a thread
            await asyncio.to_thread(setup.enable_secrets_engine, KV, "kv", options={"version": "2"})
            await asyncio.to_thread(setup.write, f"{KV}/data/app", {"data": {"api_key": "bench-value"}})
            await asyncio.to_thread(setup.put_policy, "bench-task", f"""
path "auth/token/create" {{ capabilities = ["create", "update"] }}
path "{KV}/data/*" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
""")
            start = bao.audit_log.stat().st_size
            task = await asyncio.to_thread(setup.create_token, policies=["bench-task"], ttl="1h",
                                           display_name="task-bench",
                                           meta={"task": "TASKID", "user": "USERID", "agent": "AGENTID",
                                                 "tenant": "acme", "role": "support-triage"})
            t = VaultClient(http, bao.addr, token=task.client_token)
            await t.lookup_self()
            await t.renew_self(token=task.client_token, increment=3600)
            issuance = await t.create_child_token(token=task.client_token, policies=["bench-task"], ttl=600,
                                                  explicit_max_ttl=3600, renewable=True,
                                                  meta={"task": "TASKID", "lease": "LEASEID", "grant": "kv"},
                                                  display_name="issue-kv")
            i = VaultClient(http, bao.addr, token=issuance.client_token)
            await i.read_credential(GRANT_PATH, token=issuance.client_token)
            child = await i.create_child_token(token=issuance.client_token, policies=["bench-task"], ttl=600,
                                               explicit_max_ttl=600, renewable=False, meta={},
                                               display_name="agent-child")
            c = VaultClient(http, bao.addr, token=child.client_token)
            await c.lookup_self()
            await c.lookup_self()
            await c.read_credential(GRANT_PATH, token=child.client_token)
            await root.read_credential(GRANT_PATH, token=bao.root_token)  # vault.unexplained
            await asyncio.to_thread(setup.read, "sys/mounts")  # the broker ignores this one
            setup.close()
            await asyncio.sleep(0.5)
        with bao.audit_log.open("rb") as f:
            f.seek(start)
            data = f.read()
        return [x.decode() for x in data.splitlines() if x.strip()]
    finally:
        bao.stop()


def templates(lines: list[str]) -> list[str]:
    """The captured lines with markers where each replay varies them: request ids, times, the task and lease
    ids, the child token's (HMAC'd) accessor, which a later line shows as its ``auth.accessor``."""
    objs = [json.loads(x) for x in lines]
    rids: dict[str, str] = {}
    created: set[str] = set()
    for o in objs:
        acc = ((o.get("response") or {}).get("auth") or {}).get("accessor")
        meta = (o.get("auth") or {}).get("metadata") or {}
        if acc and o["type"] == "response" and (meta.get("lease") or not meta):
            created.add(acc)
    out: list[str] = []
    for o in objs:
        rid = o["request"]["id"]
        o["request"]["id"] = rids.setdefault(rid, f"@@RID{len(rids)}@@")
        o["time"] = "@@TIME@@"
        text = json.dumps(o, separators=(",", ":"))
        for n, acc in enumerate(sorted(created)):
            text = text.replace(acc, f"@@ACC{n}@@")
        text = (text.replace("TASKID", "@@TASK@@").replace("LEASEID", "@@LEASE@@")
                .replace("USERID", "@@USER@@").replace("AGENTID", "@@AGENT@@"))
        out.append(text)
    return out


def replay(tpl: list[str], n_lines: int, tasks: int, base_time: float, path: Path) -> int:
    """Write about ``n_lines`` lines: the session again and again with fresh ids. Returns the lines written."""
    written = 0
    rounds = (n_lines + len(tpl) - 1) // len(tpl)
    n_rids = len({m for t in tpl for m in re.findall(r"@@RID(\d+)@@", t)})
    with path.open("w") as f:
        for r in range(rounds):
            k = r % tasks
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(base_time + r * 0.01)) + f".{r % 1000:03d}000Z"
            subs = {"@@TASK@@": f"tsk_bench_{k:06d}", "@@LEASE@@": f"lse_bench_{r:08d}",
                    "@@USER@@": USER.format(i=k), "@@AGENT@@": AGENT.format(i=k), "@@TIME@@": ts}
            for n in range(n_rids):
                subs[f"@@RID{n}@@"] = f"{r:08x}-{n:04x}-4000-8000-{random.getrandbits(48):012x}"
            for n in range(4):
                subs[f"@@ACC{n}@@"] = f"hmac-sha256:{random.getrandbits(256):064x}"
            chunk = []
            for template in tpl:
                line = template
                for key, value in subs.items():
                    if key in line:
                        line = line.replace(key, value)
                chunk.append(line)
            f.write("\n".join(chunk) + "\n")
            written += len(chunk)
    return written


def insert_tasks(db: Path, tasks: int, now: float) -> None:
    con = sqlite3.connect(db)
    with con:
        con.executemany(
            "INSERT INTO tasks (id, user, agent, role, tenant, reason, created_at, expires_at, state, ended_at,"
            " token_accessor, sealed_token, token_state, revoke_attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(f"tsk_bench_{k:06d}", USER.format(i=k), AGENT.format(i=k), "support-triage", "acme", "bench",
              now - 3600, now + 86400 * 3650, "active", None, f"acc{k}", b"\0" * 60, "live", 0)
             for k in range(tasks)])
    con.close()


async def bench_ingest(workdir: Path, n_lines: int, tasks: int) -> dict[str, Any]:
    captured = await capture_session(workdir)
    tpl = templates(captured)
    log = workdir / "vault-audit.log"
    base = time.time() - 3600
    t0 = time.perf_counter()
    lines = replay(tpl, n_lines, tasks, base, log)
    gen_s = time.perf_counter() - t0
    db = workdir / "ingest.db"
    store = await open_store(f"sqlite:///{db}")
    await store.close()
    insert_tasks(db, tasks, time.time())
    store = await open_store(f"sqlite:///{db}", migrate=False)
    try:
        tailer = VaultAuditTailer(store=store, path=log, broker_paths=[GRANT_PATH], start="beginning")
        await tailer.step()  # the first start: the position at the beginning
        children0 = _children_cpu()
        t0, c0 = time.perf_counter(), time.process_time()
        merged = await tailer.catch_up(max_polls=10_000_000)
        ingest_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        head, _ = await store.chain_head()
        events: dict[str, int] = {}
        for row in await store.query_audit(limit=2000):
            events[row.record.event] = events.get(row.record.event, 0) + 1
        used_worker = tailer.ingest_worker is not None
        await tailer.aclose()  # the ingest worker exits and is waited for: its CPU time is then counted
        worker_s = _children_cpu() - children0
    finally:
        await store.close()
    stages = await stage_breakdown(log, min(lines, 100_000), workdir, tasks)
    return {"lines_per_session": len(captured), "lines": lines, "merged_lines": merged, "records": head,
            "generate_s": round(gen_s, 2), "ingest_s": round(ingest_s, 2),
            "lines_per_s": round(merged / ingest_s), "records_per_s": round(head / ingest_s),
            "cpu_s": round(cpu_s, 2), "cpu_us_per_line": round(cpu_s / max(1, merged) * 1e6, 1),
            "ingest_worker": used_worker, "worker_cpu_s": round(worker_s, 2),
            "worker_cpu_us_per_line": round(worker_s / max(1, merged) * 1e6, 1),
            "file_mb": round(log.stat().st_size / 1e6, 1), "event_mix_first_2000": events, "stages": stages}


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that have exited and been waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


async def stage_breakdown(log: Path, n: int, workdir: Path, tasks: int) -> dict[str, float]:
    """Seconds per 100k lines in each stage, measured alone on the first ``n`` lines."""
    with log.open("rb") as f:
        raw = [f.readline() for _ in range(n)]
    t0 = time.perf_counter()
    responses, _ = parse_responses(raw)
    parse_s = time.perf_counter() - t0
    db = workdir / "stages.db"
    store = await open_store(f"sqlite:///{db}")
    await store.close()
    insert_tasks(db, tasks, time.time())
    store = await open_store(f"sqlite:///{db}", migrate=False)
    try:
        task_ids = sorted({t for e in responses if e.auth is not None and (t := e.auth.metadata.get("task"))})
        found, _ = await store.vault_audit_context(task_ids, [])
        t0 = time.perf_counter()
        records, learned = classify_batch(responses, known_tasks=found.get, broker_paths=[GRANT_PATH],
                                          tokens={})
        classify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # The records of one catch-up chunk, as the tailer commits them: lines per chunk x records per line.
        step = max(1, round(CATCH_UP_CHUNK / (sum(map(len, raw)) / n) * len(records) / n))
        tokens = {a: (o.task, o.lease) for a, o in learned.items()}
        for i in range(0, len(records), step):
            await store.merge_vault_audit(moves=[], records=records[i:i + step], now=time.time(),
                                          tokens=tokens if i == 0 else {})
        append_s = time.perf_counter() - t0
    finally:
        await store.close()
    scale = 100_000 / n
    return {"sample_lines": n, "records": len(records), "parse_s_per_100k_lines": round(parse_s * scale, 2),
            "classify_s_per_100k_lines": round(classify_s * scale, 2),
            "append_s_per_100k_lines": round(append_s * scale, 2),
            "append_us_per_record": round(append_s / max(1, len(records)) * 1e6, 1)}


# -- verify: a million chained records in SQLite, verified as an auditor does ----------------------------


def record_mix(i: int, now: float) -> AuditRecord:
    k = i // 12
    task, user, agent = f"tsk_{k:010d}aaaaaaaaaaaaaa", USER.format(i=k % 5000), AGENT.format(i=k % 5000)
    t = now + i * 0.001
    kind = i % 12
    if kind == 0:
        return AuditRecord(t, "task.started", "success", user=user, agent=agent, task=task, tenant="acme",
                           resource="role:support-triage", action="task.start", reason="ticket 4711")
    if kind in (1, 2, 3):
        return AuditRecord(t, "lease.issued", "success", user=user, agent=agent, task=task, tenant="acme",
                           resource="database/creds/tickets-ro", action="issue", lease=f"lse_{i:020d}",
                           vault_request_id=f"{i:08x}-0000-4000-8000-000000000000",
                           reason="grant tickets-db-ro, ttl 600s")
    if kind == 11:
        return AuditRecord(t, "task.ended", "success", user=user, agent=agent, task=task, tenant="acme",
                           resource="role:support-triage", action="end", reason=f"by {agent}")
    return AuditRecord(t, "vault.request", "success", user=user, agent=agent, task=task, tenant="acme",
                       resource="database/creds/tickets-ro", action="read", lease=f"lse_{i - 4:020d}",
                       vault_request_id=f"{i:08x}-1111-4000-8000-000000000000",
                       reason="by the issuance token of lease lse_x from 127.0.0.1")


async def bench_verify(workdir: Path, n: int, every: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    db = workdir / "verify.db"
    store = await open_store(f"sqlite:///{db}")
    await store.close()
    key = Ed25519PrivateKey.generate()
    kid = key_id(key.public_key()).hex()
    now = time.time() - n * 0.001
    t0 = time.perf_counter()
    con = sqlite3.connect(db)
    prev = GENESIS
    rows: list[tuple[Any, ...]] = []
    cps: list[tuple[Any, ...]] = []
    with con:
        for seq in range(1, n + 1):
            r = record_mix(seq, now)
            digest = chain_hash(prev, canonical_bytes(r, seq))
            rows.append((seq, r.time, r.event, r.user, r.agent, r.task, r.tenant, r.resource, r.action, r.outcome,
                         r.reason, r.lease, r.vault_request_id, prev.hex(), digest.hex()))
            prev = digest
            if seq % every == 0:
                cp = sign_checkpoint(Checkpoint(ORIGIN, seq, digest, int(r.time)), key)
                cps.append((seq, digest.hex(), float(int(r.time)), cp.note, kid))
            if len(rows) >= 50_000:
                con.executemany("INSERT INTO audit_events (seq, time, event, user, agent, task, tenant, resource,"
                                " action, outcome, reason, lease, vault_request_id, prev_hash, hash)"
                                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
                rows.clear()
        if rows:
            con.executemany("INSERT INTO audit_events (seq, time, event, user, agent, task, tenant, resource,"
                            " action, outcome, reason, lease, vault_request_id, prev_hash, hash)"
                            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        con.executemany("INSERT INTO audit_checkpoints (seq, head_hash, time, note, key_id) VALUES (?,?,?,?,?)", cps)
        con.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (n, prev.hex()))
    con.close()
    gen_s = time.perf_counter() - t0
    store = await open_store(f"sqlite:///{db}", migrate=False)
    try:
        t0 = time.perf_counter()
        report = await StoreVerifier(store, key.public_key(), ORIGIN).verify()
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        chain_only = await StoreVerifier(store, None, ORIGIN).verify()
        chain_s = time.perf_counter() - t0
    finally:
        await store.close()
    assert report.ok and report.records == n and report.checkpoints == len(cps), report
    assert chain_only.records == n
    return {"records": n, "checkpoints": len(cps), "db_mb": round(db.stat().st_size / 1e6, 1),
            "generate_s": round(gen_s, 1), "verify_s": round(verify_s, 2),
            "records_per_s": round(n / verify_s), "chain_only_s": round(chain_s, 2),
            "report": {"ok": report.ok, "records": report.records, "checkpoints": report.checkpoints}}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000, help="Vault audit lines to ingest")
    ap.add_argument("--records", type=int, default=1_000_000, help="chain records to verify")
    ap.add_argument("--tasks", type=int, default=1000, help="tasks the replayed sessions belong to")
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    # The replayed sessions hold one vault.unexplained each (root on the grant path): don't log every chunk's.
    logging.getLogger("broker.audit.tailer").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    out: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        if not args.skip_ingest:
            ing = await bench_ingest(workdir, args.lines, args.tasks)
            out["ingest"] = ing
            print(f"ingest: {ing['merged_lines']:,} lines ({ing['file_mb']} MB, {ing['lines_per_session']} real "
                  f"OpenBao lines per replayed session) -> {ing['records']:,} records in {ing['ingest_s']} s: "
                  f"{ing['lines_per_s']:,} lines/s ({ing['records_per_s']:,} records/s, {ing['cpu_us_per_line']} µs CPU "
                  f"per line in the broker, {ing['worker_cpu_us_per_line']} in the ingest worker); goal >= {GOAL_LINES:,.0f} "
                  f"lines/s: {'MET' if ing['lines_per_s'] >= GOAL_LINES else 'NOT MET'}")
            print(f"  stages (s per 100k lines): {ing['stages']}")
        if not args.skip_verify:
            ver = await bench_verify(workdir, args.records, args.checkpoint_every)
            out["verify"] = ver
            print(f"verify: {ver['records']:,} records, {ver['checkpoints']:,} signed checkpoints "
                  f"({ver['db_mb']} MB SQLite) in {ver['verify_s']} s: {ver['records_per_s']:,} records/s "
                  f"(chain only {ver['chain_only_s']} s); goal < {GOAL_VERIFY_S:.0f} s for 1M: "
                  f"{'MET' if ver['verify_s'] * 1_000_000 / ver['records'] < GOAL_VERIFY_S else 'NOT MET'}")
        print("machine:", json.dumps(out["machine"]))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(asyncio.run(main()))
