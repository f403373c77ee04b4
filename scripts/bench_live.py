"""Issuance with many live leases against issuance with none: no O(live leases) work per credential.

What it measures (issue 10: "the rate at 10,000 live leases is within 10% of the rate at none")
    One broker on its embedded default (SQLite, dev OpenBao; ``scripts/_benchlib.py``). Per repetition:
    ``--concurrency`` agents of one user start a task each; a timed pass of ``--n`` credentials (the
    same agents, the same user) with almost nothing live; then ``--live`` more credentials through the
    broker, untimed, all kept live; then the same timed pass again. The tasks end (and Vault confirms
    every lease gone) before the next repetition. Everything that could grow with live leases is on
    that path: the live-lease budgets (per agent and per user, summed from each task's counter since
    migration 0019), the tailer's attribution, the audit chain, the indexes the issuance writes.

    ratio = median rate with ``--live`` live leases / median rate with none (goal >= 0.9).
    broker CPU ms/credential is the broker process's CPU (all threads) over each timed pass.

Example
    python scripts/bench_live.py                       # 10,000 live PKI leases, 3 repetitions
    python scripts/bench_live.py --live 2000 --reps 1  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import BenchStack, Progress, closed_loop, machine_info, wait_leases_drained
from bench_issue import GRANT_KINDS, Bench, PassResult

GOAL_RATIO = 0.9


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grant", default="pki", choices=sorted(GRANT_KINDS), help="the grant issued (default: pki)")
    p.add_argument("--live", type=int, default=10_000, help="live leases piled up between the passes")
    p.add_argument("--n", type=int, default=600, help="timed credentials per pass (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="agents in flight (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (default: 3)")
    args = p.parse_args(argv)
    # What bench_issue.Bench reads from its arguments.
    args.concurrency_list = [args.concurrency]
    args.warmup = 40
    args.no_direct2 = True
    for key in GRANT_KINDS:
        setattr(args, f"{key}_n", args.n)
    return args


async def repetition(bench: Bench, args: argparse.Namespace, rep: int) -> tuple[PassResult, ...]:
    """(broker, none live), (broker, full), (direct, none), (direct, full): the direct passes (the same
    Vault call, straight to OpenBao with the task tokens) tell OpenBao's own slowdown apart from the
    broker's, since both share the two cores."""
    kind = GRANT_KINDS[args.grant]
    bench.refresh_svids()
    tasks = [await bench.start_task(i) for i in range(args.concurrency)]
    try:
        ops = [bench.broker_op(kind, t, i) for i, t in enumerate(tasks)]
        direct = [bench.direct_op(kind, t, i, bench.task_token(t), [0]) for i, t in enumerate(tasks)]
        await bench.warmup(ops)
        await bench.warmup(direct)
        empty = await bench.timed_pass(kind, args.concurrency, rep, "broker, none live", ops, tasks)
        empty_direct = await bench.timed_pass(kind, args.concurrency, rep, "direct, none live", direct, tasks)
        bench.progress.phase(f"rep {rep + 1}: {args.live:,} more credentials, kept live")
        piled = await closed_loop(args.live, ops, bench.progress)
        bench.progress.done()
        if piled.errors:
            msg = f"piling up live leases failed: {piled.errors}"
            raise RuntimeError(msg)
        full = await bench.timed_pass(kind, args.concurrency, rep, f"broker, {args.live:,} live", ops, tasks)
        full_direct = await bench.timed_pass(kind, args.concurrency, rep, f"direct, {args.live:,} live", direct,
                                             tasks)
        return empty, full, empty_direct, full_direct
    finally:
        bench.progress.phase(f"rep {rep + 1}: ending tasks, waiting for revocations")
        for i, t in enumerate(tasks):
            await bench.end_task(t, i)
        assert bench.stack.bao is not None
        await wait_leases_drained(bench.session, bench.stack.bao, kind.lease_prefix)


async def run(stack: BenchStack, args: argparse.Namespace) -> list[tuple[PassResult, ...]]:
    out: list[tuple[PassResult, ...]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        bench = Bench(stack, session, args, Progress())
        for rep in range(args.reps):
            out.append(await repetition(bench, args, rep))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    print("starting OpenBao, PostgreSQL and the broker on loopback...", file=sys.stderr)
    t0 = time.monotonic()
    with BenchStack.start() as stack:
        try:
            pairs = asyncio.run(run(stack, args))
        except Exception:
            print("broker log tail:\n" + stack.broker_log_tail(), file=sys.stderr)
            raise
    print(f"run took {time.monotonic() - t0:.0f}s", file=sys.stderr)
    med = statistics.median
    r0, r1 = med(p[0].rps for p in pairs), med(p[1].rps for p in pairs)
    c0, c1 = med(p[0].broker_cpu_ms_per_issue for p in pairs), med(p[1].broker_cpu_ms_per_issue for p in pairs)
    print(f"machine: {info}")
    print(f"command: scripts/bench_live.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()
    print(f"| grant | agents | live leases | rps (median of {len(pairs)}) | p50 ms | broker CPU ms/credential |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rps, cpu, idx in (("~0", r0, c0, 0), (f"{args.live:,}", r1, c1, 1)):
        p50 = med(p[idx].p50_ms for p in pairs)
        print(f"| {args.grant} | {args.concurrency} | {label} | {rps:.0f} | {p50:.1f} | {cpu:.2f} |")
    ratio = r1 / r0 if r0 else float("nan")
    d0, d1 = med(p[2].rps for p in pairs), med(p[3].rps for p in pairs)
    direct_ratio = d1 / d0 if d0 else float("nan")
    print(f"| {args.grant} (direct to OpenBao) | {args.concurrency} | ~0 | {d0:.0f} | "
          f"{med(p[2].p50_ms for p in pairs):.1f} | - |")
    print(f"| {args.grant} (direct to OpenBao) | {args.concurrency} | {args.live:,} | {d1:.0f} | "
          f"{med(p[3].p50_ms for p in pairs):.1f} | - |")
    print(f"\nratio (rate with {args.live:,} live / rate with none): {ratio:.2f}; goal >= {GOAL_RATIO}: "
          f"{'pass' if ratio >= GOAL_RATIO else 'MISS'}")
    print(f"the same ratio for the direct calls (OpenBao holding the same leases): {direct_ratio:.2f}; the broker's "
          f"own (broker ratio / direct ratio): {ratio / direct_ratio:.2f}")
    print("each repetition (broker none / full rps, direct none / full rps): "
          + ", ".join(f"{a.rps:.0f} / {b.rps:.0f}, {c.rps:.0f} / {d.rps:.0f}" for a, b, c, d in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
