"""Credential issuance through the broker versus directly from OpenBao, with the same task token.

What it measures
    For each grant kind -- PostgreSQL (``database/creds/tickets-ro``), PKI (``pki/issue/agents``) and
    child tokens (``auth/token/create/agent-child``) -- and each concurrency (default 1 and 32 agents in
    flight), it issues a fixed number of credentials

    * **direct**: straight from OpenBao with the task token, the same path, method and body the broker
      sends (``Grant.request_params``), through the broker's own ``VaultClient`` (aiohttp); and
    * **broker**: ``POST /v1/tasks/{id}/credentials`` to a broker running as a separate process
      (``python -m broker serve``, SQLite store), which verifies the agent's JWT-SVID, checks the
      task, reads the same path with the same task token, and commits the lease plus its audit record.

    and, to price the broker's second Vault call separately,

    * **direct2** (Vault-side cost of the issuance token): the two calls the broker makes per credential
      since issuance became crash-consistent -- ``POST auth/token/create`` (a child of the task token,
      same policies, TTL, metadata and display name as ``LeaseManager.issue``), then the read with that
      child token -- straight from OpenBao, without the broker. ``direct2 - direct`` is what the extra
      call costs OpenBao; ``broker - direct2`` is what the broker itself adds. Skip with ``--no-direct2``.

    and, with ``--floor``, what serving a credential costs with none of the broker's own work:

    * **floor**: the direct call made by ``scripts/_floor_server.py`` (a separate process: aiohttp on
      uvloop, no middleware, the broker's ``VaultClient``) for each request it gets. Its CPU per
      credential beside the broker's shows how much of the broker's is the HTTP stack and how much is
      its own work (identity, the store, the journal, the audit chain).

    Each simulated agent has its own task (started by a user through the broker) and one JWT-SVID
    minted once and reused for the whole run, as a real agent reuses its SVID for minutes. The direct
    calls use the task token the broker holds: read from the broker's SQLite store and opened with the
    store key (``TokenSealer``). Database leases come back with the role's default TTL (10m), equal to
    the grant's max TTL, so the broker never renews to shorten them in the timed part.

    Every (grant, concurrency) cell runs ``--reps`` repetitions (default 3). One repetition: start the
    tasks, warm up every path, time the direct, direct2 and broker passes back to back (the order rotates
    between repetitions, because the machine is shared and noisy), end the tasks through the broker, and wait
    until OpenBao has revoked every lease of that grant, so revocations never overlap a timed pass.
    Figures are medians over the repetitions.

How to read the table
    rps: completed issuances per second (closed loop: each agent sends its next request when the
    previous one answered). p50/p99: client-side latency in ms. ratio: broker rps / direct rps.
    added p50: broker p50 - direct p50. broker CPU/iss: user+system CPU time of the broker process
    during the broker pass divided by the issuances in it (from /proc via psutil), its worker processes
    included (the Vault audit ingest worker, when the tailer catches up during a pass). bao CPU/iss: the
    same for the OpenBao process, for both passes: it shows what the shared cores spend where.
    The load generator, OpenBao, PostgreSQL and the broker share the same cores: a broker that
    uses CPU takes it from OpenBao, so ratios under load include that contention, by design.
    Vault requests per credential: the ``response`` records of OpenBao's file audit device, during a
    pass, whose ``auth.metadata.task`` is one of the pass's tasks (requests made with a task token or an
    issuance token), divided by the issuances; the broker's own calls (its token, maintenance) are not
    in it. The lines after it list every request of the pass by operation and path.

Goals (issue 10): at 32 agents a ratio >= 0.9 for PostgreSQL, >= 0.45 for PKI, >= 0.35 for child
tokens; at one agent <= 2 ms added at p50; in every cell <= 1.0 ms of broker CPU per credential (all
threads) and <= 0.5 ms on the event loop's thread; <= 1.1 Vault requests per credential. A benchmark,
not a test: it reports what it reaches and exits 0 unless the run itself failed.

Example
    python scripts/bench_issue.py                      # full default run, a few minutes
    python scripts/bench_issue.py --grants pki --concurrency 32 --reps 1 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import (
    AuditTail,
    BenchStack,
    CpuMeter,
    LoadResult,
    Progress,
    agent_id,
    closed_loop,
    free_port,
    machine_info,
    median,
    wait_leases_drained,
)

from broker.config import load_settings
from broker.delegation import Catalog, Grant
from broker.sealing import TokenSealer
from broker.vault import VaultClient

ROLE = "bench"


@dataclass(frozen=True)
class GrantKind:
    """A grant of the bench role, the OpenBao lease prefix its credentials live under, a default count."""

    key: str
    grant: str
    lease_prefix: str
    default_n: int
    min_ratio: float


# min_ratio: issue 10's goal at 32 agents (broker rps / direct rps).
GRANT_KINDS: dict[str, GrantKind] = {
    "postgres": GrantKind("postgres", "tickets-db-ro", "database/creds/tickets-ro", 300, 0.9),
    "pki": GrantKind("pki", "agent-cert", "pki/issue/agents", 1000, 0.45),
    "token": GrantKind("token", "child-token", "auth/token/create/agent-child", 1000, 0.35),
}
GOAL_ADDED_P50_MS = 2.0  # at one agent
GOAL_CPU_MS = 1.0  # all the broker's threads, per credential, in every cell
GOAL_LOOP_CPU_MS = 0.5  # the event loop's thread
GOAL_VAULT_REQUESTS = 1.1  # Vault requests per credential on the broker's path (audit device)
END_TIMEOUT = aiohttp.ClientTimeout(total=300)  # ending a task confirms each of its leases in Vault


@dataclass
class PassResult:
    """One timed pass: ``mode`` is ``direct`` or ``broker``."""

    grant: str
    concurrency: int
    rep: int
    mode: str
    n: int
    ok: int
    elapsed_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    broker_cpu_ms_per_issue: float
    broker_sys_ms_per_issue: float
    broker_loop_thread_ms_per_issue: float
    bao_cpu_ms_per_issue: float
    loadgen_cpu_ms_per_issue: float
    errors: dict[str, int] = field(default_factory=dict)
    vault_calls: dict[str, int] = field(default_factory=dict)  # audit-log requests in the pass, by op and path
    # Requests made with the pass's task or issuance tokens (audit ``auth.metadata.task``), per credential.
    task_vault_requests_per_issue: float = math.nan
    # The broker's other threads (the store's first), busiest first: where the CPU off the loop goes.
    broker_other_threads_ms_per_issue: list[float] = field(default_factory=list)
    # The broker's worker processes (the Vault audit ingest worker while the tailer catches up), in broker CPU too.
    broker_workers_ms_per_issue: float = 0.0


@dataclass
class Cell:
    """Medians over the repetitions of one (grant, concurrency)."""

    grant: str
    concurrency: int
    direct_rps: float
    direct2_rps: float
    broker_rps: float
    ratio: float
    direct_p50: float
    direct_p99: float
    broker_p50: float
    broker_p99: float
    added_p50: float
    broker_cpu_ms: float
    bao_cpu_direct_ms: float
    bao_cpu_broker_ms: float
    bao_cpu_direct2_ms: float
    direct2_p50: float
    broker_loop_ms: float
    broker_sys_ms: float
    errors: int
    direct_vault_per_issue: float = math.nan
    broker_vault_per_issue: float = math.nan
    # --floor: the same Vault call behind a bare aiohttp server (scripts/_floor_server.py)
    floor_rps: float = math.nan
    floor_p50: float = math.nan
    floor_cpu_ms: float = math.nan
    floor_loop_ms: float = math.nan


# --------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (top of this file) for how to read the output.")
    p.add_argument("--grants", default="postgres,pki,token",
                   help="comma-separated subset of postgres,pki,token (default: all)")
    p.add_argument("--concurrency", default="1,32", help="comma-separated agents in flight (default: 1,32)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per cell; medians are reported (default: 3)")
    p.add_argument("--postgres-n", type=int, default=GRANT_KINDS["postgres"].default_n,
                   help="timed issuances per pass for PostgreSQL (default: %(default)s)")
    p.add_argument("--pki-n", type=int, default=GRANT_KINDS["pki"].default_n,
                   help="timed issuances per pass for PKI (default: %(default)s)")
    p.add_argument("--token-n", type=int, default=GRANT_KINDS["token"].default_n,
                   help="timed issuances per pass for child tokens (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=40, help="untimed issuances per path before each rep (default: 40)")
    p.add_argument("--no-direct2", action="store_true",
                   help="skip the two-call direct pass (issuance token + read) that prices the extra Vault call")
    p.add_argument("--floor", action="store_true",
                   help="also time the same Vault call behind a bare aiohttp server on uvloop "
                        "(scripts/_floor_server.py): the cost per credential with none of the broker's own work")
    p.add_argument("--time-limit", type=float, default=900, help="abort after this many seconds (default: 900)")
    p.add_argument("--json", type=Path, help="also write the machine info, every pass and the cells here")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="attach py-spy to the broker during the run, write its raw samples to FILE and print the "
                        "top functions (sampling slows the broker: do not quote these figures as throughput)")
    args = p.parse_args(argv)
    args.grant_list = [g.strip() for g in args.grants.split(",") if g.strip()]
    unknown = [g for g in args.grant_list if g not in GRANT_KINDS]
    if unknown:
        p.error(f"unknown grant(s): {', '.join(unknown)}")
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if any(c < 1 for c in args.concurrency_list) or args.reps < 1:
        p.error("concurrency and reps must be >= 1")
    return args


def count_for(args: argparse.Namespace, kind: GrantKind) -> int:
    return int(getattr(args, f"{kind.key}_n"))


# --------------------------------------------------------------------------------------------------
# Talking to the broker and to OpenBao


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class FloorServer:
    """``scripts/_floor_server.py`` on a free loopback port (``--floor``)."""

    proc: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, vault_addr: str) -> FloorServer:
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_floor_server.py")),
                                 "--vault", vault_addr, "--port", str(port)], stdout=subprocess.PIPE,
                                start_new_session=True)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=30)
        if line.strip() != b"ready":
            proc.kill()
            proc.wait()
            msg = f"the floor server did not start: {line[:200]!r}"
            raise RuntimeError(msg)
        return cls(proc, f"http://127.0.0.1:{port}/floor")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Bench:
    """One benchmark run over a started ``BenchStack``."""

    def __init__(self, stack: BenchStack, session: aiohttp.ClientSession, args: argparse.Namespace,
                 progress: Progress) -> None:
        self.stack = stack
        self.session = session
        self.args = args
        self.progress = progress
        assert stack.config_path is not None and stack.bao is not None
        settings = load_settings({}, stack.config_path)
        self.catalog = Catalog.from_settings(settings)
        self.sealer = TokenSealer.from_file(stack.store_key)
        # As long-lived as the broker accepts (agents.max_token_lifetime), renewed between repetitions.
        self.svid_ttl = float(settings.agents.max_token_lifetime) - 30
        self.svids: list[str] = []
        self.svids_minted = -math.inf
        self.passes: list[PassResult] = []
        self.floor: FloorServer | None = None

    def refresh_svids(self) -> None:
        """One SVID per simulated agent, reused for every request until half its lifetime has passed."""
        if time.monotonic() - self.svids_minted > self.svid_ttl / 2:
            self.svids = [self.stack.agent_svid(i, self.svid_ttl) for i in range(max(self.args.concurrency_list))]
            self.svids_minted = time.monotonic()

    def grant(self, kind: GrantKind) -> Grant:
        return self.catalog.roles[ROLE].grants[kind.grant]

    async def start_task(self, i: int) -> str:
        body = {"agent": agent_id(i), "role": ROLE, "ttl": "1h", "reason": "bench_issue.py"}
        async with self.session.post(self.stack.broker_url + "/v1/tasks", json=body,
                                     headers=bearer(self.stack.user_token())) as resp:
            if resp.status != 201:
                msg = f"starting a task answered {resp.status}: {(await resp.text())[:300]}"
                raise RuntimeError(msg)
            return str((await resp.json())["id"])

    async def end_task(self, task_id: str, i: int) -> None:
        """End through the broker; retry while it reports that Vault has not confirmed yet (503)."""
        for _ in range(10):
            async with self.session.post(f"{self.stack.broker_url}/v1/tasks/{task_id}/end",
                                         headers=bearer(self.svids[i]), timeout=END_TIMEOUT) as resp:
                if resp.status == 200:
                    return
                if resp.status != 503:
                    msg = f"ending task {task_id} answered {resp.status}: {(await resp.text())[:300]}"
                    raise RuntimeError(msg)
            await asyncio.sleep(1)
        msg = f"task {task_id}: the broker could not confirm its revocation"
        raise RuntimeError(msg)

    def task_token(self, task_id: str) -> str:
        """The task token, as the broker holds it: sealed in its SQLite store, opened with the store key."""
        with sqlite3.connect(f"file:{self.stack.store_db}?mode=ro", uri=True, timeout=30) as db:
            row = db.execute("SELECT sealed_token FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            msg = f"task {task_id} not in the store"
            raise RuntimeError(msg)
        return self.sealer.open(bytes(row[0]), task_id=task_id).reveal()

    def direct2_op(self, kind: GrantKind, task_id: str, i: int, token: str) -> Callable[[], Awaitable[None]]:
        """What the broker sends OpenBao per credential: a child of the task token, then the read with it."""
        grant = self.grant(kind)
        assert self.stack.bao is not None
        client = VaultClient(self.session, self.stack.bao.addr, token=token, timeout=30)
        ttl = grant.max_ttl
        data = grant.request_params(task=task_id, agent=agent_id(i), user="alice@example.com", tenant="acme",
                                    role=ROLE, ttl=ttl) if grant.method == "POST" else None
        remaining = 3000  # the task's remaining life (1h task, a few minutes in); the value does not matter

        async def op() -> None:
            child = await client.create_child_token(
                token=token, policies=[f"broker-task-{ROLE}"], ttl=remaining, explicit_max_ttl=remaining,
                meta={"task": task_id, "lease": "lse_bench", "grant": grant.name},
                display_name=f"issue-{grant.name}")
            await client.read_credential(grant.path, token=child.client_token, method=grant.method, data=data)

        return op

    def floor_op(self, kind: GrantKind, task_id: str, i: int, token: str) -> Callable[[], Awaitable[None]]:
        """The direct call, made by the floor server: what serving it costs without the broker's own work."""
        assert self.floor is not None
        grant = self.grant(kind)
        data = grant.request_params(task=task_id, agent=agent_id(i), user="alice@example.com", tenant="acme",
                                    role=ROLE, ttl=grant.max_ttl) if grant.method == "POST" else None
        return self._post_op("floor server", self.floor.url, {"path": grant.path, "method": grant.method, "data": data},
                             {"X-Task-Token": token})

    def broker_op(self, kind: GrantKind, task_id: str, i: int) -> Callable[[], Awaitable[None]]:
        return self._post_op("broker", f"{self.stack.broker_url}/v1/tasks/{task_id}/credentials",
                             {"grant": kind.grant}, bearer(self.svids[i]))

    def _post_op(self, who: str, url: str, body: dict[str, Any], headers: dict[str, str]) -> Callable[[], Awaitable[None]]:
        """One credential over HTTP: a 200 whose body is JSON, else an error counted by closed_loop."""
        async def op() -> None:
            async with self.session.post(url, json=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    msg = f"{who} answered {resp.status}: {raw[:200]!r}"
                    raise RuntimeError(msg)
            json.loads(raw)

        return op

    def direct_op(self, kind: GrantKind, task_id: str, i: int, token: str,
                  shortened: list[int]) -> Callable[[], Awaitable[None]]:
        """The same Vault call ``LeaseManager.issue`` makes (path, method, body, TTL) with the task token."""
        grant = self.grant(kind)
        assert self.stack.bao is not None
        client = VaultClient(self.session, self.stack.bao.addr, token=token, timeout=30)
        ttl = grant.max_ttl  # what cap_ttl gives with no requested TTL and a 1h task
        data = grant.request_params(task=task_id, agent=agent_id(i), user="alice@example.com", tenant="acme",
                                    role=ROLE, ttl=ttl) if grant.method == "POST" else None

        async def op() -> None:
            secret = await client.read_credential(grant.path, token=token, method=grant.method, data=data)
            if secret.auth is None and secret.renewable and secret.lease_duration > ttl:
                shortened[0] += 1  # the broker would also renew this one to shorten it

        return op

    # -- one repetition -------------------------------------------------------------------------------

    async def timed_pass(self, kind: GrantKind, conc: int, rep: int, mode: str,
                         ops: Sequence[Callable[[], Awaitable[None]]], tasks: Sequence[str]) -> PassResult:
        n = count_for(self.args, kind)
        self.progress.phase(f"{kind.key} c={conc} rep {rep + 1}/{self.args.reps} {mode}")
        server_pid = self.floor.pid if mode == "floor" and self.floor is not None else self.stack.broker_pid
        meters = [CpuMeter(server_pid), CpuMeter(self.stack.bao_pid), CpuMeter(os.getpid())]
        audit = AuditTail(self.stack.bao.audit_log) if self.stack.bao is not None else None
        if audit is not None:
            audit.mark()
        # Each pass starts with the broker's Vault audit tailer caught up (a burst before it, a pass or the
        # piling of bench_live.py, leaves it megabytes behind), and a broker pass is charged the tailer's
        # merge of its own credentials' audit lines: the CPU stops after the tailer has caught up again.
        await self.stack.wait_tailer_caught_up()
        for m in meters:
            m.start()
        res: LoadResult = await closed_loop(n, ops, self.progress)
        if mode.startswith("broker"):
            await self.stack.wait_tailer_caught_up()
        broker_cpu, bao_cpu, own_cpu = (m.stop() for m in meters)
        calls = audit.counts() if audit is not None else {}
        per_task = audit.task_requests(tasks) if audit is not None else math.nan
        self.progress.done()
        ok = len(res.latencies) or 1
        return PassResult(
            grant=kind.key, concurrency=conc, rep=rep, mode=mode, n=n, ok=len(res.latencies),
            elapsed_s=res.elapsed, rps=res.rps, p50_ms=res.p(50), p99_ms=res.p(99),
            broker_cpu_ms_per_issue=broker_cpu * 1000 / ok, broker_sys_ms_per_issue=meters[0].system * 1000 / ok,
            broker_loop_thread_ms_per_issue=meters[0].main_thread * 1000 / ok,
            broker_workers_ms_per_issue=meters[0].workers * 1000 / ok,
            bao_cpu_ms_per_issue=bao_cpu * 1000 / ok,
            loadgen_cpu_ms_per_issue=own_cpu * 1000 / ok, errors=res.errors, vault_calls=calls,
            task_vault_requests_per_issue=per_task / ok,
            broker_other_threads_ms_per_issue=[round(v * 1000 / ok, 3) for tid, v in meters[0].threads.items()
                                               if tid != server_pid][:4],
        )

    async def warmup(self, ops: Sequence[Callable[[], Awaitable[None]]]) -> None:
        if self.args.warmup > 0:
            res = await closed_loop(self.args.warmup, ops)
            if res.errors:
                msg = f"warm-up failed: {res.errors}"
                raise RuntimeError(msg)

    async def repetition(self, kind: GrantKind, conc: int, rep: int) -> None:
        self.refresh_svids()
        task_ids = [await self.start_task(i) for i in range(conc)]
        shortened = [0]
        try:
            direct = [self.direct_op(kind, t, i, self.task_token(t), shortened) for i, t in enumerate(task_ids)]
            broker = [self.broker_op(kind, t, i) for i, t in enumerate(task_ids)]
            order = [("direct", direct), ("broker", broker)]
            if not self.args.no_direct2:
                direct2 = [self.direct2_op(kind, t, i, self.task_token(t)) for i, t in enumerate(task_ids)]
                order.insert(1, ("direct2", direct2))
            if self.floor is not None:
                floor = [self.floor_op(kind, t, i, self.task_token(t)) for i, t in enumerate(task_ids)]
                order.insert(1, ("floor", floor))
            for _, ops in order:
                await self.warmup(ops)
            order = order[rep % len(order):] + order[:rep % len(order)]
            for mode, ops in order:
                self.passes.append(await self.timed_pass(kind, conc, rep, mode, ops, task_ids))
        finally:
            self.progress.phase(f"{kind.key} c={conc} rep {rep + 1}: ending tasks, waiting for revocations")
            for i, t in enumerate(task_ids):
                await self.end_task(t, i)
            assert self.stack.bao is not None
            left = await wait_leases_drained(self.session, self.stack.bao, kind.lease_prefix)
            if left:
                print(f"warning: {left} leases under {kind.lease_prefix} still present after waiting",
                      file=sys.stderr)
        if shortened[0]:
            print(f"note: {shortened[0]} direct {kind.key} leases had a TTL above the grant's cap "
                  "(the broker renews those to shorten them)", file=sys.stderr)

    async def run(self) -> None:
        for key in self.args.grant_list:
            kind = GRANT_KINDS[key]
            for conc in self.args.concurrency_list:
                for rep in range(self.args.reps):
                    await self.repetition(kind, conc, rep)


# --------------------------------------------------------------------------------------------------
# Results


def summarise(passes: Sequence[PassResult]) -> list[Cell]:
    cells: list[Cell] = []
    keys = sorted({(p.grant, p.concurrency) for p in passes},
                  key=lambda k: (list(GRANT_KINDS).index(k[0]), k[1]))
    for grant, conc in keys:
        d = [p for p in passes if (p.grant, p.concurrency, p.mode) == (grant, conc, "direct")]
        d2 = [p for p in passes if (p.grant, p.concurrency, p.mode) == (grant, conc, "direct2")]
        b = [p for p in passes if (p.grant, p.concurrency, p.mode) == (grant, conc, "broker")]
        f = [p for p in passes if (p.grant, p.concurrency, p.mode) == (grant, conc, "floor")]
        if not d or not b:
            continue

        def med(ps: Sequence[PassResult], attr: str) -> float:
            return median([float(getattr(p, attr)) for p in ps]) if ps else math.nan

        d_rps, b_rps = med(d, "rps"), med(b, "rps")
        cells.append(Cell(
            grant=grant, concurrency=conc, direct_rps=d_rps, direct2_rps=med(d2, "rps"), broker_rps=b_rps,
            ratio=b_rps / d_rps if d_rps else math.nan,
            direct_p50=med(d, "p50_ms"), direct_p99=med(d, "p99_ms"),
            broker_p50=med(b, "p50_ms"), broker_p99=med(b, "p99_ms"),
            added_p50=med(b, "p50_ms") - med(d, "p50_ms"),
            broker_cpu_ms=med(b, "broker_cpu_ms_per_issue"),
            bao_cpu_direct_ms=med(d, "bao_cpu_ms_per_issue"), bao_cpu_broker_ms=med(b, "bao_cpu_ms_per_issue"),
            bao_cpu_direct2_ms=med(d2, "bao_cpu_ms_per_issue"), direct2_p50=med(d2, "p50_ms"),
            broker_loop_ms=med(b, "broker_loop_thread_ms_per_issue"), broker_sys_ms=med(b, "broker_sys_ms_per_issue"),
            errors=sum(sum(p.errors.values()) for p in (*d, *d2, *b)),
            direct_vault_per_issue=med(d, "task_vault_requests_per_issue"),
            broker_vault_per_issue=med(b, "task_vault_requests_per_issue"),
            floor_rps=med(f, "rps"), floor_p50=med(f, "p50_ms"), floor_cpu_ms=med(f, "broker_cpu_ms_per_issue"),
            floor_loop_ms=med(f, "broker_loop_thread_ms_per_issue"),
        ))
    return cells


def render_table(cells: Sequence[Cell]) -> str:
    head = ("| grant | agents | direct rps | broker rps | ratio | direct p50/p99 ms | broker p50/p99 ms "
            "| added p50 ms | broker CPU ms/iss | bao CPU ms/iss direct/broker | errors |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(
            f"| {c.grant} | {c.concurrency} | {c.direct_rps:.0f} | {c.broker_rps:.0f} | {c.ratio:.2f} "
            f"| {c.direct_p50:.1f} / {c.direct_p99:.1f} | {c.broker_p50:.1f} / {c.broker_p99:.1f} "
            f"| {c.added_p50:+.2f} | {c.broker_cpu_ms:.2f} | {c.bao_cpu_direct_ms:.2f} / {c.bao_cpu_broker_ms:.2f} "
            f"| {c.errors} |"
        )
    return "\n".join(lines)


def render_two_call_table(cells: Sequence[Cell]) -> str:
    """The Vault-side price of the issuance token: one call (direct) vs the broker's two calls (direct2)."""
    lines = [("| grant | agents | direct rps (1 call) | direct2 rps (2 calls) | broker rps | direct2/direct "
              "| broker/direct2 | bao CPU ms/iss 1 call / 2 calls / broker | direct p50 / direct2 p50 / broker p50 ms "
              "| broker CPU ms/iss (loop thread, sys) |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        if math.isnan(c.direct2_rps):
            continue
        lines.append(
            f"| {c.grant} | {c.concurrency} | {c.direct_rps:.0f} | {c.direct2_rps:.0f} | {c.broker_rps:.0f} "
            f"| {c.direct2_rps / c.direct_rps:.2f} | {c.broker_rps / c.direct2_rps:.2f} "
            f"| {c.bao_cpu_direct_ms:.2f} / {c.bao_cpu_direct2_ms:.2f} / {c.bao_cpu_broker_ms:.2f} "
            f"| {c.direct_p50:.1f} / {c.direct2_p50:.1f} / {c.broker_p50:.1f} "
            f"| {c.broker_cpu_ms:.2f} ({c.broker_loop_ms:.2f}, {c.broker_sys_ms:.2f}) |")
    return "\n".join(lines)


def render_floor_table(cells: Sequence[Cell]) -> str:
    """The broker against the floor: the same Vault call behind a bare aiohttp server (``--floor``)."""
    lines = [("| grant | agents | direct rps | floor rps | broker rps | p50 ms direct / floor / broker "
              "| floor CPU ms/iss (loop) | broker CPU ms/iss (loop) | broker - floor CPU ms |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        if math.isnan(c.floor_rps):
            continue
        lines.append(
            f"| {c.grant} | {c.concurrency} | {c.direct_rps:.0f} | {c.floor_rps:.0f} | {c.broker_rps:.0f} "
            f"| {c.direct_p50:.2f} / {c.floor_p50:.2f} / {c.broker_p50:.2f} "
            f"| {c.floor_cpu_ms:.2f} ({c.floor_loop_ms:.2f}) | {c.broker_cpu_ms:.2f} ({c.broker_loop_ms:.2f}) "
            f"| {c.broker_cpu_ms - c.floor_cpu_ms:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def goals(cells: Sequence[Cell]) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for each cell, as issue 10 states them: the ratio at 32 agents, added p50 at
    one, the broker's CPU per credential (all threads, and the loop's), and Vault requests per credential."""
    out: list[tuple[str, str, bool]] = []
    for c in cells:
        kind = GRANT_KINDS[c.grant]
        if c.concurrency == 32:
            out.append((f"{c.grant} c=32: broker/direct >= {kind.min_ratio}", f"{c.ratio:.2f}",
                        c.ratio >= kind.min_ratio))
        if c.concurrency == 1:
            out.append((f"{c.grant} c=1: added p50 <= {GOAL_ADDED_P50_MS} ms", f"{c.added_p50:.2f} ms",
                        c.added_p50 <= GOAL_ADDED_P50_MS))
        out.append((f"{c.grant} c={c.concurrency}: broker CPU <= {GOAL_CPU_MS} ms/credential",
                    f"{c.broker_cpu_ms:.2f} ms", c.broker_cpu_ms <= GOAL_CPU_MS))
        out.append((f"{c.grant} c={c.concurrency}: event-loop CPU <= {GOAL_LOOP_CPU_MS} ms/credential",
                    f"{c.broker_loop_ms:.2f} ms", c.broker_loop_ms <= GOAL_LOOP_CPU_MS))
        if not math.isnan(c.broker_vault_per_issue):
            out.append((f"{c.grant} c={c.concurrency}: Vault requests/credential <= {GOAL_VAULT_REQUESTS}",
                        f"{c.broker_vault_per_issue:.2f}", c.broker_vault_per_issue <= GOAL_VAULT_REQUESTS))
    return out


def render_goals(rows: Sequence[tuple[str, str, bool]]) -> str:
    lines = ["| goal | measured | |", "|---|---:|---|"]
    lines += [f"| {g} | {m} | {'pass' if ok else 'MISS'} |" for g, m, ok in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Profiling (optional)


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the broker (GIL-holding and active samples only), raw collapsed stacks to ``out``."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--threads", "--gil",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _frame_name(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``: same-named modules stay apart."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    path = where.rsplit(":", 1)[0]
    return f"{func} ({'/'.join(path.split('/')[-2:])})"


def profile_summary(raw: Path, top: int = 25) -> str:
    """Top functions by own samples and by inclusive samples, from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    if not total:
        return "py-spy recorded no samples"
    tailer = tailer_samples(raw)

    def block(title: str, d: dict[str, int]) -> list[str]:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [title] + [f"  {100 * v / total:5.1f}%  {k}" for k, v in rows]

    share = (f"the Vault audit tailer (its loop task, its parsing threads, its two store transactions): "
             f"{100 * tailer / total:.1f}% of the samples")
    return "\n".join([f"{total} samples", share, *block("own time:", own), *block("inclusive:", incl)])


# Where the Vault audit tailer's work is, on any thread: what "the tailer's share" of the broker's CPU counts.
TAILER_FRAMES = frozenset({
    "VaultAuditTailers.run_forever", "_parse_chunk", "classify_batch",
    "VaultAuditStore.merge_vault_audit.<locals>.run", "VaultAuditStore.vault_audit_context.<locals>.run",
})


def tailer_samples(raw: Path) -> int:
    """Samples (GIL-holding, all threads) with a frame of the tailer's in their stack."""
    count = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if stack and count_s.isdigit() and any(f.partition(" (")[0] in TAILER_FRAMES for f in stack.split(";")):
            count += int(count_s)
    return count


# --------------------------------------------------------------------------------------------------
# Main


async def run_bench(stack: BenchStack, args: argparse.Namespace, passes_out: list[PassResult]) -> bool:
    """Run every cell; False when ``--time-limit`` stopped the run (the passes so far are kept)."""
    progress = Progress()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    limit = asyncio.timeout(args.time_limit)
    try:
        async with limit, aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            bench = Bench(stack, session, args, progress)
            try:
                if args.floor:
                    assert stack.bao is not None
                    bench.floor = await FloorServer.start(stack.bao.addr)
                await bench.run()
            finally:
                passes_out.extend(bench.passes)
                if bench.floor is not None:
                    bench.floor.stop()
    except TimeoutError:
        if not limit.expired():
            raise  # a request timed out: a failure, not the global limit
        print(f"time limit of {args.time_limit:.0f}s reached: aborting", file=sys.stderr)
        return False
    return True


def report(info: dict[str, Any], args: argparse.Namespace, passes: Sequence[PassResult], complete: bool) -> str:
    cells = summarise(passes)
    lines = [
        (f"machine: {info['nproc']} x {info['cpu_model']}, Python {info['python']}, {info['openbao']}, "
         f"{info['postgresql']}, {info['date']}, load {tuple(round(x, 2) for x in info['loadavg_before'])}, "
         f"git {info['git_head']} (+{info['git_dirty_broker_files']} changed files under broker/)"),
        f"command: {' '.join(sys.argv)}",
        "" if complete else "INCOMPLETE RUN: only the cells below finished",
        render_table(cells),
        "",
        render_two_call_table(cells),
        "",
        render_floor_table(cells),
        "",
        render_goals(goals(cells)),
    ]
    for c in cells:
        lines.append(f"Vault requests per credential made with the tasks' tokens, {c.grant} c={c.concurrency}: "
                     f"broker {c.broker_vault_per_issue:.2f}, direct {c.direct_vault_per_issue:.2f}")
    for p in passes:
        if p.rep == 0 and p.vault_calls:
            per = ", ".join(f"{k} {v / max(p.ok, 1):.2f}" for k, v in sorted(p.vault_calls.items(), key=lambda kv: -kv[1]))
            lines.append(f"Vault requests per issuance, {p.grant} c={p.concurrency} {p.mode}: {per}")
    for p in passes:
        if p.errors:
            lines.append(f"errors in {p.grant} c={p.concurrency} rep {p.rep} {p.mode}: {p.errors}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv, "complete": complete,
                                         "passes": [asdict(p) for p in passes],
                                         "cells": [asdict(c) for c in cells]}, indent=2))
        lines.append(f"raw numbers written to {args.json}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    print("starting OpenBao, PostgreSQL and the broker on loopback...", file=sys.stderr)
    passes: list[PassResult] = []
    complete = False
    profiler: subprocess.Popen[bytes] | None = None
    t0 = time.monotonic()
    with BenchStack.start() as stack:
        try:
            if args.profile:
                profiler = start_profiler(stack.broker_pid, args.profile)
            complete = asyncio.run(run_bench(stack, args, passes))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
        except Exception:
            print("broker log tail:\n" + stack.broker_log_tail(), file=sys.stderr)
            raise
        finally:
            if profiler is not None:
                stop_profiler(profiler)
    print(f"run took {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print(report(info, args, passes, complete))
    if args.profile and args.profile.exists():
        print("\nbroker profile (py-spy, whole run):\n" + profile_summary(args.profile))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
