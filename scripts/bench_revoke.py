"""Revocation by user through the broker versus OpenBao's own ``sys/leases/revoke-prefix``, same count, same run.

What it measures
    For each lease kind (default: PKI certificates and child tokens; PostgreSQL credentials at 1,000) and
    each count N (default 1,000 and 10,000):

    * **broker**: a fresh user starts ``--tasks`` tasks (one agent each) through the broker and the agents
      obtain N leases in total through the broker (32 in flight, round-robin over the tasks; untimed for
      the comparison, reported as issuance time). Then, timed: an operator's
      ``POST /v1/revocations {"user": ..., "reason": ..., "wait": 60}`` and, if it answers 202, polling
      ``GET /v1/revocations/{id}`` every 0.1 s until ``state == "done"``. "done" is the broker's claim
      that Vault confirmed every lease gone (it revokes each task token by accessor, then looks up the
      token and every lease until they are gone).
    * **revoke-prefix**: N leases of the same kind, same path, same request body, issued directly with
      one task-like token (root-created, policy ``broker-task-bench``), then, timed, one synchronous
      ``PUT sys/leases/revoke-prefix/<lease path>`` with the root token.

    Both are checked against Vault afterwards: ``LIST sys/leases/lookup/<lease path>/`` must be empty
    (404). For the broker, the issuance tokens (one child of the task token per credential, lease path
    ``auth/token/create/<hash>``) are counted too.

    During each timed revocation the script also reads the OpenBao file audit device (every Vault call
    made in the window, by operation and path) and the CPU time of the broker and OpenBao processes.

How to read the table
    ratio = broker revoke s / revoke-prefix s (goal, issue 10: <= 1.5). leases/s = N / revoke s. POST = the status
    of the POST (200: done within ``wait``; 202: the maintenance loop finished it). vault calls = audit
    records of type ``request`` in the window. Each user is fresh and gets locked by its own revocation.

Example
    python scripts/bench_revoke.py                                  # default: pki,token x 1000,10000 + postgres x 1000
    python scripts/bench_revoke.py --kinds token --counts 1000 --reps 3 --json /tmp/revoke.json
    python scripts/bench_revoke.py --kinds token --counts 1000 --profile /tmp/revoke.pyspy   # pip install py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
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
    Progress,
    admin_lease_keys,
    agent_id,
    closed_loop,
    machine_info,
    median,
)
from bench_issue import profile_summary, start_profiler, stop_profiler

from broker.config import load_settings
from broker.delegation import Catalog, Grant
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin

ROLE = "bench"
GOAL_RATIO = 1.5  # issue 10: revocation by user within 1.5x revoke-prefix
ISSUANCE_PREFIX = "auth/token/create"  # where the broker's per-credential issuance tokens live


@dataclass(frozen=True)
class Kind:
    key: str
    grant: str
    lease_prefix: str


KINDS: dict[str, Kind] = {
    "pki": Kind("pki", "agent-cert", "pki/issue/agents"),
    "token": Kind("token", "child-token", "auth/token/create/agent-child"),
    "postgres": Kind("postgres", "tickets-db-ro", "database/creds/tickets-ro"),
}


@dataclass
class Result:
    kind: str
    n: int
    rep: int
    mode: str  # broker | prefix
    issued: int
    issue_s: float
    revoke_s: float
    post_status: int = 0
    post_s: float = math.nan  # time until the POST answered
    tasks: int = 0
    broker_cpu_s: float = math.nan
    bao_cpu_s: float = math.nan
    vault_calls: dict[str, int] = field(default_factory=dict)
    left_in_vault: int = -1
    issuance_tokens_left: int = -1
    issue_errors: dict[str, int] = field(default_factory=dict)

    @property
    def leases_per_s(self) -> float:
        return self.issued / self.revoke_s if self.revoke_s > 0 else math.nan


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (top of this file) for how to read the output.")
    p.add_argument("--kinds", default="pki,token,postgres", help="comma-separated subset of pki,token,postgres")
    p.add_argument("--counts", default="1000,10000", help="comma-separated lease counts (default: 1000,10000)")
    p.add_argument("--postgres-max", type=int, default=1000,
                   help="PostgreSQL leases are slow to issue (~100-200/s): counts above this are skipped for them")
    p.add_argument("--tasks", type=int, default=20, help="tasks (one agent each) the user starts (default: 20)")
    p.add_argument("--concurrency", type=int, default=32, help="issuances in flight (default: 32)")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions per (kind, count) for counts <= 1000; medians (default: 3)")
    p.add_argument("--reps-large", type=int, default=1, help="repetitions for counts > 1000 (default: 1)")
    p.add_argument("--wait", type=float, default=60, help="the revocation's wait, seconds (max 60)")
    p.add_argument("--modes", default="broker,prefix,cascade",
                   help="comma-separated subset of broker,prefix,cascade (default: all). cascade = the broker's "
                        "Vault-side design (a child token per credential, revoke the parents by accessor) without "
                        "the broker, timed until Vault lists nothing; explicit (not in the default) = the same, "
                        "but every lease is first revoked with a synchronous sys/leases/revoke, 32 in flight")
    p.add_argument("--time-limit", type=float, default=1800, help="abort after this many seconds (default: 1800)")
    p.add_argument("--json", type=Path, help="also write the machine info and every result here")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="py-spy the broker during its timed revocations only (raw samples to FILE); slows it")
    args = p.parse_args(argv)
    args.kind_list = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if bad := [k for k in args.kind_list if k not in KINDS]:
        p.error(f"unknown kind(s): {', '.join(bad)}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in args.mode_list if m not in ("broker", "prefix", "cascade", "explicit")]:
        p.error(f"unknown mode(s): {', '.join(bad)}")
    args.count_list = [int(c) for c in args.counts.split(",") if c.strip()]
    return args


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class RevokeBench:
    def __init__(self, stack: BenchStack, session: aiohttp.ClientSession, args: argparse.Namespace) -> None:
        assert stack.config_path is not None and stack.bao is not None
        self.stack = stack
        self.bao = stack.bao
        self.session = session
        self.args = args
        self.progress = Progress()
        settings = load_settings({}, stack.config_path)
        self.catalog = Catalog.from_settings(settings)
        self.svid_ttl = float(settings.agents.max_token_lifetime) - 30
        self.root = VaultClient(session, self.bao.addr, token=self.bao.root_token, timeout=300)
        # Set-up calls (root tokens for the direct runs) go through hvac, in a thread, outside the timed parts.
        self.setup = VaultAdmin(self.bao.addr, token=self.bao.root_token, timeout=300)
        self.audit = AuditTail(self.bao.audit_log)
        self.results: list[Result] = []
        self.phase_no = 0
        self.profiler: Any = None

    async def _revoke_lease_sync(self, lease_id: str) -> None:
        """PUT sys/leases/revoke {lease_id, sync: true} as root, on the shared aiohttp session: timed with
        ``--concurrency`` in flight, so not through hvac's threads (VaultClient has no such admin call)."""
        async with self.session.put(f"{self.bao.addr}/v1/sys/leases/revoke",
                                    json={"lease_id": lease_id, "sync": True},
                                    headers={"X-Vault-Token": self.bao.root_token.reveal()}) as resp:
            if resp.status not in (200, 204):
                msg = f"revoking {lease_id} failed: HTTP {resp.status} {(await resp.text())[:200]}"
                raise RuntimeError(msg)

    def grant(self, kind: Kind) -> Grant:
        return self.catalog.roles[ROLE].grants[kind.grant]

    # -- broker -----------------------------------------------------------------------------------------

    async def start_task(self, user: str, agent: str) -> str:
        body = {"agent": agent, "role": ROLE, "ttl": "1h", "reason": "bench_revoke.py"}
        async with self.session.post(self.stack.broker_url + "/v1/tasks", json=body,
                                     headers=bearer(self.stack.user_token(user))) as resp:
            if resp.status != 201:
                msg = f"starting a task answered {resp.status}: {(await resp.text())[:300]}"
                raise RuntimeError(msg)
            return str((await resp.json())["id"])

    async def broker_run(self, kind: Kind, n: int, rep: int) -> Result:
        self.phase_no += 1
        user = f"bench-revoke-{self.phase_no}@example.com"
        agents = [agent_id(1000 * self.phase_no + t) for t in range(self.args.tasks)]
        itok_before = await self.issuance_token_count()
        tasks = [await self.start_task(user, a) for a in agents]
        svids = [self.stack.spiffe.mint_svid(a, audience="agent-broker", ttl=self.svid_ttl) for a in agents]

        def op_for(w: int) -> Callable[[], Awaitable[None]]:
            t = w % len(tasks)
            url = f"{self.stack.broker_url}/v1/tasks/{tasks[t]}/credentials"
            headers, body = bearer(svids[t]), {"grant": kind.grant}

            async def op() -> None:
                async with self.session.post(url, json=body, headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        msg = f"broker answered {resp.status}: {raw[:200]!r}"
                        raise RuntimeError(msg)
            return op

        self.progress.phase(f"{kind.key} N={n} rep {rep + 1}: broker issuance ({len(tasks)} tasks)")
        issued = await closed_loop(n, [op_for(w) for w in range(self.args.concurrency)], self.progress)
        self.progress.done()
        ok = len(issued.latencies)
        await asyncio.sleep(1)  # let OpenBao and the broker settle

        self.progress.phase(f"{kind.key} N={n} rep {rep + 1}: broker revocation by user")
        meters = [CpuMeter(self.stack.broker_pid), CpuMeter(self.stack.bao_pid)]
        self.audit.mark()
        if self.args.profile:
            self.start_profile()
        for m in meters:
            m.start()
        ops = bearer(self.stack.operator_token())
        t0 = time.perf_counter()
        async with self.session.post(self.stack.broker_url + "/v1/revocations", headers=ops,
                                     json={"user": user, "reason": "bench_revoke.py", "wait": self.args.wait},
                                     timeout=aiohttp.ClientTimeout(total=self.args.wait + 120)) as resp:
            body = await resp.json()
            status = resp.status
        post_s = time.perf_counter() - t0
        if status not in (200, 202):
            msg = f"POST /v1/revocations answered {status}: {body}"
            raise RuntimeError(msg)
        while body.get("state") != "done":
            await asyncio.sleep(0.1)
            async with self.session.get(f"{self.stack.broker_url}/v1/revocations/{body['id']}",
                                        headers=ops) as r:
                body = await r.json()
        revoke_s = time.perf_counter() - t0
        broker_cpu, bao_cpu = (m.stop() for m in meters)
        if self.args.profile:
            self.stop_profile()
        calls = self.audit.counts()
        self.progress.done()
        if body.get("revoked") != ok:
            print(f"warning: revocation reports {body.get('revoked')} revoked, {ok} were issued", file=sys.stderr)
        left = len([k for k in await admin_lease_keys(self.session, self.bao, kind.lease_prefix)
                    if not k.endswith("/")])
        itok = await self.issuance_token_count() - itok_before
        return Result(kind.key, n, rep, "broker", ok, issued.elapsed, revoke_s, post_status=status, post_s=post_s,
                      tasks=len(tasks), broker_cpu_s=broker_cpu, bao_cpu_s=bao_cpu, vault_calls=calls,
                      left_in_vault=left, issuance_tokens_left=itok, issue_errors=issued.errors)

    async def issuance_token_count(self) -> int:
        """Token leases directly under ``auth/token/create/`` (the broker's issuance tokens, plus its own)."""
        return len([k for k in await admin_lease_keys(self.session, self.bao, ISSUANCE_PREFIX) if not k.endswith("/")])

    # -- OpenBao's own revoke-prefix ----------------------------------------------------------------------

    async def prefix_run(self, kind: Kind, n: int, rep: int) -> Result:
        g = self.grant(kind)
        # A task-like token: the task role's policy, created by root (the broker creates its task tokens
        # from its own token role; the policy is what matters for the calls below).
        auth = await asyncio.to_thread(self.setup.create_token, policies=[f"broker-task-{ROLE}"], ttl="1h",
                                       display_name="bench-direct")
        token = auth.client_token
        client = VaultClient(self.session, self.bao.addr, token=token, timeout=60)
        data = g.request_params(task="tsk_direct", agent=agent_id(0), user="direct@example.com", tenant="acme",
                                role=ROLE, ttl=g.max_ttl) if g.method == "POST" else None

        async def op() -> None:
            await client.read_credential(g.path, token=token, method=g.method, data=data)

        self.progress.phase(f"{kind.key} N={n} rep {rep + 1}: direct issuance")
        issued = await closed_loop(n, [op] * self.args.concurrency, self.progress)
        self.progress.done()
        await asyncio.sleep(1)
        self.progress.phase(f"{kind.key} N={n} rep {rep + 1}: sys/leases/revoke-prefix/{kind.lease_prefix}")
        meters = [CpuMeter(self.stack.broker_pid), CpuMeter(self.bao_pid)]
        self.audit.mark()
        for m in meters:
            m.start()
        t0 = time.perf_counter()
        async with self.session.put(f"{self.bao.addr}/v1/sys/leases/revoke-prefix/{kind.lease_prefix}",
                                    headers={"X-Vault-Token": self.bao.root_token.reveal()},
                                    timeout=aiohttp.ClientTimeout(total=900)) as resp:
            text = await resp.text()
            if resp.status not in (200, 204):
                msg = f"revoke-prefix answered {resp.status}: {text[:300]}"
                raise RuntimeError(msg)
        revoke_s = time.perf_counter() - t0
        broker_cpu, bao_cpu = (m.stop() for m in meters)
        calls = self.audit.counts()
        left = len([k for k in await admin_lease_keys(self.session, self.bao, kind.lease_prefix)
                    if not k.endswith("/")])
        await self.root.revoke_accessor(auth.accessor)
        return Result(kind.key, n, rep, "prefix", len(issued.latencies), issued.elapsed, revoke_s,
                      broker_cpu_s=broker_cpu, bao_cpu_s=bao_cpu, vault_calls=calls, left_in_vault=left,
                      issue_errors=issued.errors)

    async def explicit_run(self, kind: Kind, n: int, rep: int) -> Result:
        return await self.cascade_run(kind, n, rep, explicit=True)

    async def cascade_run(self, kind: Kind, n: int, rep: int, *, explicit: bool = False) -> Result:
        """The broker's Vault-side design without the broker: ``--tasks`` task-like tokens, one child token per
        credential (as ``LeaseManager.issue``), then revoke-accessor on each parent, timed until Vault lists
        neither the leases nor the child tokens any more (polling ``LIST sys/leases/lookup`` every 0.1 s).

        ``explicit``: first revoke every lease itself, ``PUT sys/leases/revoke {lease_id, sync: true}`` (or
        ``revoke-accessor`` for token leases), ``--concurrency`` in flight, then the parents as above."""
        g = self.grant(kind)
        itok_before = await self.issuance_token_count()
        parents = [await asyncio.to_thread(self.setup.create_token, policies=[f"broker-task-{ROLE}"], ttl="1h",
                                           display_name="bench-cascade") for _ in range(self.args.tasks)]
        data = g.request_params(task="tsk_cascade", agent=agent_id(0), user="cascade@example.com", tenant="acme",
                                role=ROLE, ttl=g.max_ttl) if g.method == "POST" else None
        client = VaultClient(self.session, self.bao.addr, timeout=60)

        def op_for(w: int) -> Callable[[], Awaitable[None]]:
            parent = parents[w % len(parents)].client_token

            async def op() -> None:
                child = await client.create_child_token(
                    token=parent, policies=[f"broker-task-{ROLE}"], ttl=3000, explicit_max_ttl=3000,
                    meta={"task": "tsk_cascade", "lease": "lse_cascade", "grant": g.name},
                    display_name=f"issue-{g.name}")
                secret = await client.read_credential(g.path, token=child.client_token, method=g.method, data=data)
                ids.append(secret.auth.accessor if secret.auth is not None else secret.lease_id)
            return op

        ids: list[str] = []
        self.progress.phase(f"{kind.key} N={n} rep {rep + 1}: direct issuance, child token per credential")
        issued = await closed_loop(n, [op_for(w) for w in range(self.args.concurrency)], self.progress)
        self.progress.done()
        await asyncio.sleep(1)
        self.progress.phase(f"{kind.key} N={n} rep {rep + 1}: revoke-accessor on {len(parents)} parents, "
                            "until Vault lists nothing")
        meters = [CpuMeter(self.stack.broker_pid), CpuMeter(self.bao_pid)]
        self.audit.mark()
        for m in meters:
            m.start()
        t0 = time.perf_counter()
        if explicit:
            queue = list(ids)

            async def revoker() -> None:
                while queue:
                    vid = queue.pop()
                    if kind.key == "token":
                        await self.root.revoke_accessor(vid)
                    else:
                        await self._revoke_lease_sync(vid)
            await asyncio.gather(*(revoker() for _ in range(self.args.concurrency)))
        await asyncio.gather(*(self.root.revoke_accessor(a.accessor) for a in parents))
        while True:
            left = len([k for k in await admin_lease_keys(self.session, self.bao, kind.lease_prefix)
                        if not k.endswith("/")])
            itok = await self.issuance_token_count() - itok_before
            if left == 0 and itok <= 0:
                break
            await asyncio.sleep(0.1)
        revoke_s = time.perf_counter() - t0
        broker_cpu, bao_cpu = (m.stop() for m in meters)
        calls = self.audit.counts()
        return Result(kind.key, n, rep, "explicit" if explicit else "cascade", len(issued.latencies), issued.elapsed, revoke_s,
                      tasks=len(parents), broker_cpu_s=broker_cpu, bao_cpu_s=bao_cpu, vault_calls=calls,
                      left_in_vault=left, issuance_tokens_left=itok, issue_errors=issued.errors)

    @property
    def bao_pid(self) -> int:
        return self.stack.bao_pid

    # -- profiling ------------------------------------------------------------------------------------------

    def start_profile(self) -> None:
        out = self.args.profile.with_name(f"{self.args.profile.name}.{self.phase_no}")
        self.profiler = (start_profiler(self.stack.broker_pid, out), out)
        time.sleep(0.5)  # py-spy attaches

    def stop_profile(self) -> None:
        proc, out = self.profiler
        stop_profiler(proc)
        if out.exists():
            with self.args.profile.open("a") as dst:
                dst.write(out.read_text())
            out.unlink()

    async def run(self) -> None:
        for key in self.args.kind_list:
            kind = KINDS[key]
            for n in self.args.count_list:
                if key == "postgres" and n > self.args.postgres_max:
                    continue
                for rep in range(self.args.reps if n <= 1000 else self.args.reps_large):
                    modes = {"broker": self.broker_run, "prefix": self.prefix_run, "cascade": self.cascade_run,
                             "explicit": self.explicit_run}
                    order = [modes[m] for m in self.args.mode_list]
                    order = order[rep % len(order):] + order[:rep % len(order)]
                    for fn in order:
                        res = await fn(kind, n, rep)
                        self.results.append(res)
                        print(f"  {res.kind} N={res.n} {res.mode}: issued {res.issued} in {res.issue_s:.1f}s, "
                              f"revoked in {res.revoke_s:.2f}s, left in Vault {res.left_in_vault}",
                              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------


def summarise(results: Sequence[Result]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r.kind, r.n) for r in results}, key=lambda k: (list(KINDS).index(k[0]), k[1]))
    for kind, n in keys:
        b = [r for r in results if (r.kind, r.n, r.mode) == (kind, n, "broker")]
        d = [r for r in results if (r.kind, r.n, r.mode) == (kind, n, "prefix")]
        c = [r for r in results if (r.kind, r.n, r.mode) == (kind, n, "cascade")]
        e = [r for r in results if (r.kind, r.n, r.mode) == (kind, n, "explicit")]
        if not (b or c or d or e):
            continue

        def med(rs: Sequence[Result], f: Callable[[Result], float]) -> float:
            return median([f(r) for r in rs]) if rs else math.nan

        calls: dict[str, int] = dict(b[0].vault_calls) if b else {}
        rows.append({
            "kind": kind, "n": n, "reps": len(b or c or d or e), "tasks": (b or c or e or [Result(kind, n, 0, "", 0, 0, 0)])[0].tasks,
            "broker_s": med(b, lambda r: r.revoke_s), "prefix_s": med(d, lambda r: r.revoke_s),
            "broker_post_s": med(b, lambda r: r.post_s), "post_status": [r.post_status for r in b],
            "broker_lps": med(b, lambda r: r.leases_per_s), "prefix_lps": med(d, lambda r: r.leases_per_s),
            "broker_issue_s": med(b, lambda r: r.issue_s), "prefix_issue_s": med(d, lambda r: r.issue_s),
            "broker_cpu_s": med(b, lambda r: r.broker_cpu_s), "bao_cpu_broker_s": med(b, lambda r: r.bao_cpu_s),
            "bao_cpu_prefix_s": med(d, lambda r: r.bao_cpu_s),
            "vault_calls_first_rep": calls, "vault_calls_total": med(b, lambda r: sum(r.vault_calls.values())),
            "left": [r.left_in_vault for r in (*b, *d, *c)],
            "issuance_tokens_left": [r.issuance_tokens_left for r in (*b, *c)] or [0],
            "issue_errors": sum(sum(r.issue_errors.values()) for r in (*b, *d, *c)),
            "all_broker_s": [round(r.revoke_s, 3) for r in b], "all_prefix_s": [round(r.revoke_s, 3) for r in d],
            "cascade_s": med(c, lambda r: r.revoke_s), "all_cascade_s": [round(r.revoke_s, 3) for r in c],
            "bao_cpu_cascade_s": med(c, lambda r: r.bao_cpu_s), "cascade_issue_s": med(c, lambda r: r.issue_s),
            "cascade_calls_first_rep": c[0].vault_calls if c else {},
            "explicit_s": med(e, lambda r: r.revoke_s), "all_explicit_s": [round(r.revoke_s, 3) for r in e],
            "bao_cpu_explicit_s": med(e, lambda r: r.bao_cpu_s),
        })
    for r in rows:
        r["ratio"] = r["broker_s"] / r["prefix_s"] if r["prefix_s"] > 0 else math.nan
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = [("| N | lease kind | broker revoke s | revoke-prefix s | ratio | broker leases/s | prefix leases/s "
              "| POST | Vault calls (broker) | CPU s: broker / bao (broker) / bao (prefix) | issuance s broker / direct "
              f"| left in Vault | goal <= {GOAL_RATIO} |"),
             "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        if math.isnan(r["broker_s"]):
            continue
        lines.append(
            f"| {r['n']} | {r['kind']} | {r['broker_s']:.2f} | {r['prefix_s']:.2f} | {r['ratio']:.2f} "
            f"| {r['broker_lps']:.0f} | {r['prefix_lps']:.0f} | {','.join(map(str, r['post_status']))} "
            f"| {r['vault_calls_total']:.0f} | {r['broker_cpu_s']:.2f} / {r['bao_cpu_broker_s']:.2f} / "
            f"{r['bao_cpu_prefix_s']:.2f} | {r['broker_issue_s']:.1f} / {r['prefix_issue_s']:.1f} "
            f"| {max(r['left'])} (+{max(r['issuance_tokens_left'])} issuance tokens) "
            f"| {'pass' if r['ratio'] <= GOAL_RATIO else 'MISS'} |")
    lines.append("")
    lines.append("| N | lease kind | broker revoke s | token-tree cascade in Vault s (no broker) | revoke-prefix s "
                 "| broker / cascade | cascade / prefix | bao CPU s cascade | cascade issuance s |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if math.isnan(r["cascade_s"]):
            continue
        lines.append(f"| {r['n']} | {r['kind']} | {r['broker_s']:.2f} | {r['cascade_s']:.2f} | {r['prefix_s']:.2f} "
                     f"| {r['broker_s'] / r['cascade_s']:.2f} | {r['cascade_s'] / r['prefix_s']:.2f} "
                     f"| {r['bao_cpu_cascade_s']:.2f} | {r['cascade_issue_s']:.1f} |")
    lines.append("")
    lines.append("Per repetition, revoke s (broker | prefix | cascade | explicit):")
    for r in rows:
        lines.append(f"  {r['kind']} N={r['n']}: {r['all_broker_s']} | {r['all_prefix_s']} | {r['all_cascade_s']} "
                     f"| {r['all_explicit_s']}  (bao CPU s: cascade {r['bao_cpu_cascade_s']:.2f}, "
                     f"explicit {r['bao_cpu_explicit_s']:.2f})")
    lines.append("")
    lines.append("Vault calls during the broker's revocation (first repetition), by operation and path:")
    for r in rows:
        top = sorted(r["vault_calls_first_rep"].items(), key=lambda kv: -kv[1])
        lines.append(f"  {r['kind']} N={r['n']}: " + ", ".join(f"{k} x{v}" for k, v in top))
    lines.append("Vault calls during the token-tree cascade (first repetition; LIST = this script's polling):")
    for r in rows:
        top = sorted(r["cascade_calls_first_rep"].items(), key=lambda kv: -kv[1])
        lines.append(f"  {r['kind']} N={r['n']}: " + ", ".join(f"{k} x{v}" for k, v in top))
    return "\n".join(lines)


async def run_all(stack: BenchStack, args: argparse.Namespace, out: list[Result]) -> bool:
    limit = asyncio.timeout(args.time_limit)
    try:
        async with limit, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                                connector=aiohttp.TCPConnector(limit=0)) as session:
            bench = RevokeBench(stack, session, args)
            try:
                await bench.run()
            finally:
                out.extend(bench.results)
                if bench.profiler is not None and bench.profiler[0].poll() is None:
                    bench.stop_profile()
    except TimeoutError:
        if not limit.expired():
            raise
        print(f"time limit of {args.time_limit:.0f}s reached: aborting", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile and args.profile.exists():
        args.profile.unlink()
    info = machine_info()
    print("starting OpenBao, PostgreSQL and the broker on loopback...", file=sys.stderr)
    results: list[Result] = []
    complete = False
    t0 = time.monotonic()
    with BenchStack.start() as stack:
        try:
            complete = asyncio.run(run_all(stack, args, results))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
        except Exception:
            print("broker log tail:\n" + stack.broker_log_tail(), file=sys.stderr)
            raise
    print(f"run took {time.monotonic() - t0:.0f}s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv, "complete": complete,
                                         "results": [asdict(r) for r in results]}, indent=2))
    rows = summarise(results)
    print(f"machine: {info['nproc']} x {info['cpu_model']}, load {info['loadavg_before']}, Python {info['python']}, "
          f"{info['openbao']}, {info['postgresql']}, {info['date']}, git {info['git_head']} "
          f"(+{info['git_dirty_broker_files']} changed files under broker/)")
    print(f"command: {' '.join(sys.argv)}")
    if not complete:
        print("INCOMPLETE RUN: only the rows below finished")
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv, "complete": complete,
                                         "results": [asdict(r) for r in results], "rows": rows}, indent=2))
        print(f"raw numbers written to {args.json}")
    if args.profile and args.profile.exists():
        print("\nbroker profile (py-spy, timed revocations only):\n" + profile_summary(args.profile))
    return 0 if complete else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
