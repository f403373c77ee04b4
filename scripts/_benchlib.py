"""Shared helpers for the benchmark scripts in ``scripts/``: a real stack on loopback, load loops, statistics.

``BenchStack`` starts, all on 127.0.0.1 and free ports: a dev OpenBao with its file audit device (as the
broker would run), a SCRAM PostgreSQL cluster in its own ``/tmp`` directory, the example engines
(``broker.dev.stack``), the broker's keys and config, ``vault sync`` plus a broker token (as
``tests/conftest.py`` does), and finally the broker itself as a SEPARATE PROCESS
(``python -m broker serve``) so that its CPU time can be read from ``/proc`` without counting the load
generator. ``BenchStack.close()`` stops everything it started and removes its directories; it is safe to
call after a partial start and more than once.

Nothing here is for production: dev OpenBao, throwaway keys, dev identities.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the broker and tests.support are imported from the checkout
    sys.path.insert(0, str(ROOT))

from broker.config import Settings, load_settings
from broker.delegation import Catalog
from broker.dev.config import AUDIENCE, AgentTrust, BrokerConfig, People, TaskRole, UserIssuer, example_grants
from broker.dev.identities import DevIssuer
from broker.dev.stack import (
    DevOpenBao,
    configure_child_token_role,
    configure_database,
    configure_pki,
    find_bao_binary,
    seed_tickets_schema,
    start_dev_openbao,
)
from broker.sealing import TokenSealer
from broker.vault.admin import VaultAdmin
from broker.vault.sync import audit_device_of, sync, write_broker_token
from tests.support.pg import (
    PG_BIN,
    PgCluster,
    make_workdir,
    remove_workdir,
    start_scram_cluster,
)

IDP = "https://idp.bench.example"
TRUST_DOMAIN = "example.org"
USER = "alice@example.com"
USER_GROUPS = ("support",)


def agent_id(i: int) -> str:
    """The SPIFFE ID of simulated agent ``i`` (matches the bench role's ``support-*`` pattern)."""
    return f"spiffe://{TRUST_DOMAIN}/agent/support-bench-{i}"


# --------------------------------------------------------------------------------------------------
# Machine and versions


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_line(args: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def host_probe() -> dict[str, float]:
    """How fast this host is right now, in two fixed pieces of work (best of three, ~0.3 s in all).

    The benchmark host is shared and its speed moves by more than the changes measured: the same code
    verified 1M records in 3.7 s one day and 6.3 s the next. Ratios against OpenBao in the same run
    absorb that; absolute goals (lines/s, ms of CPU) do not, and this says by how much the host moved.
    """
    def best(work: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        return min(times)

    block = b"\x5a" * (16 << 20)
    return {"python_loop_ms": round(best(lambda: sum(i * i for i in range(1_000_000))) * 1000, 1),
            "sha256_mb_per_s": round(16.78 / best(lambda: hashlib.sha256(block).digest()))}


def machine_info() -> dict[str, Any]:
    """What a reader needs to weigh the figures: cores, CPU, versions, date, load before the run."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "openbao": _first_line([find_bao_binary(), "version"]),
        "postgresql": _first_line([str(PG_BIN / "postgres"), "--version"]),
        "loadavg_before": os.getloadavg(),
        "host_probe": host_probe(),
        # The tree moves while others work: record which broker code ran (read-only git commands).
        "git_head": _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "git_dirty_broker_files": len(subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "broker"], capture_output=True, text=True,
            check=False).stdout.splitlines()),
    }


# --------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass
class CpuMeter:
    """CPU seconds of one process, all threads, and of its worker processes, between ``start`` and ``stop``.

    ``stop`` returns user+system, the broker's worker processes included (``python -m broker.audit.*``:
    the Vault audit ingest worker, the parallel verifier's), whether still running or already exited and
    waited for: their work is the broker's. After it, ``system`` holds the process's own system part,
    ``workers`` the worker processes' part, ``main_thread`` the part of the process's main thread (for the
    broker: the event loop; the rest is mostly the store's thread) and ``threads`` every thread's part by
    native id, busiest first.
    """

    pid: int
    system: float = 0.0
    main_thread: float = 0.0
    workers: float = 0.0
    threads: dict[int, float] = field(default_factory=dict)
    _start: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    _start_threads: dict[int, float] = field(default_factory=dict)

    def _now(self) -> tuple[float, float, float, float, dict[int, float]]:
        proc = psutil.Process(self.pid)
        t = proc.cpu_times()
        per = {th.id: th.user_time + th.system_time for th in proc.threads()}
        # Exited and waited-for children are in the process's children_* times; running ones are read.
        workers = float(t.children_user + t.children_system)
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any("broker.audit." in part for part in child.cmdline()):
                    c = child.cpu_times()
                    workers += c.user + c.system
        return float(t.user), float(t.system), float(per.get(self.pid, 0.0)), workers, per

    def start(self) -> None:
        *self._start, self._start_threads = self._now()  # type: ignore[assignment]

    def stop(self) -> float:
        user, system, main, workers, per = self._now()
        self.system = system - self._start[1]
        self.main_thread = main - self._start[2]
        self.workers = max(0.0, workers - self._start[3])
        deltas = {tid: cpu - self._start_threads.get(tid, 0.0) for tid, cpu in per.items()}
        self.threads = dict(sorted(((k, v) for k, v in deltas.items() if v > 0), key=lambda kv: -kv[1]))
        return user - self._start[0] + self.system + self.workers


# --------------------------------------------------------------------------------------------------
# Load


class Progress:
    """One overwritten status line on stderr (only when stderr is a terminal: else one line per phase)."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._label = ""
        self._last = 0.0

    def phase(self, label: str) -> None:
        self._label = label
        if not self._tty:
            print(f"  {label}", file=sys.stderr, flush=True)

    def tick(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._tty and (now - self._last > 0.2 or done == total):
            self._last = now
            print(f"\r\x1b[K  {self._label}: {done}/{total}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._tty:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


@dataclass
class LoadResult:
    """``n`` timed operations in ``elapsed`` seconds; ``latencies`` in seconds; ``errors`` by message."""

    n: int
    elapsed: float
    latencies: list[float]
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000.0  # milliseconds


async def closed_loop(n: int, workers: Sequence[Callable[[], Awaitable[None]]],
                      progress: Progress | None = None) -> LoadResult:
    """Run ``n`` operations with ``len(workers)`` in flight: worker ``i`` repeats its own operation.

    Closed loop (each worker sends its next request when the previous one answered), a fixed total
    count. A failed operation is counted in ``errors`` and not timed.
    """
    remaining = n
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def run(op: Callable[[], Awaitable[None]]) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                await op()
            except Exception as exc:  # noqa: BLE001 -- counted and reported, the run goes on
                key = f"{type(exc).__name__}: {str(exc)[:120]}"
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append(time.perf_counter() - t0)
            if progress is not None:
                progress.tick(len(latencies) + sum(errors.values()), n)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(op) for op in workers))
    return LoadResult(n=n, elapsed=time.perf_counter() - t0, latencies=latencies, errors=errors)


# --------------------------------------------------------------------------------------------------
# The stack

def bench_config(root: Path, *, port: int, addr: str, audit_log: str | Path | None) -> BrokerConfig:
    """The bench broker: one role over the example engines, patient Vault timeouts, budgets out of the way."""
    role = TaskRole(name="bench", tenant="acme", agents=(f"spiffe://{TRUST_DOMAIN}/agent/support-*",),
                    delegators=("group:support",), max_ttl="1h", grants=example_grants(TRUST_DOMAIN))
    return BrokerConfig(
        listen=f"127.0.0.1:{port}", vault_addr=addr, audit_log=audit_log, revoke_confirm_timeout=60, vault_timeout=30,
        store_url=f"sqlite:///{root}/broker.db",
        # The broker's budgets are raised so that the benchmarks measure the broker, not its rate limiter: one
        # simulated agent issues ~1,000 credentials a second at most, a user 10,000+ leases in bench_revoke.
        limits={"max_live_leases_per_agent": 1_000_000, "max_live_leases_per_user": 1_000_000,
                "issue_rate_per_agent": 100_000.0, "issue_burst_per_agent": 100_000,
                "issue_rate_per_user": 100_000.0, "issue_burst_per_user": 100_000,
                # A repetition starts up to 32 tasks for one user at once (the default burst is 20).
                "task_start_rate_per_user": 100_000.0, "task_start_burst_per_user": 100_000},
        agents=(AgentTrust(trust_domain=TRUST_DOMAIN, jwks_file="spiffe.jwks"),),
        users=(UserIssuer(issuer=IDP, jwks_file="idp.jwks"),),
        people=People(operators=("group:secops",), auditors=("group:audit",)),
        task_roles=(role,),
    )


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL if needed; always reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    else:
        proc.wait()


def _wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=1) as resp:
            # Healthy, and past the issuance journal's start-up probe: the timed part measures the mode the
            # broker runs in, not its first second in the other one.
            if resp.status == 200 and json.loads(resp.read()).get("issuance_journal") != "probing":
                return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    msg = f"{url} did not answer 200 within {timeout}s: {tail}"
    raise RuntimeError(msg)


@dataclass
class BenchStack:
    """OpenBao + PostgreSQL + a broker process, on loopback. Build with ``BenchStack.start()``."""

    workdir: Path
    spiffe: DevIssuer
    idp: DevIssuer
    bao: DevOpenBao | None = None
    pg: PgCluster | None = None
    pg_workdir: Path | None = None
    broker: subprocess.Popen[bytes] | None = None
    broker_url: str = ""
    config_path: Path | None = None
    _broker_log: Any = None
    _closed: bool = False

    def tailer_lag(self) -> int:
        """Bytes of OpenBao's audit file the broker's tailer has not merged yet, read from outside the broker
        (its SQLite store, read-only, and the file's size): polling costs the measured broker nothing."""
        assert self.bao is not None
        log = Path(self.bao.audit_log)
        st = log.stat()
        db = sqlite3.connect(f"file:{self.workdir / 'broker' / 'broker.db'}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute('SELECT "offset" FROM vault_audit_position WHERE device = ? AND inode = ?',
                             (st.st_dev, st.st_ino)).fetchone()
        finally:
            db.close()
        return st.st_size - (int(row[0]) if row else 0)

    async def wait_tailer_caught_up(self, timeout: float = 120) -> int:
        """Wait (bounded) until the tailer has merged everything OpenBao has written; the bytes left."""
        deadline = time.monotonic() + timeout
        lag = self.tailer_lag()
        while lag > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            lag = self.tailer_lag()
        return lag

    # -- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    def start(cls, *, broker_args: Sequence[str] = ()) -> BenchStack:
        """Start everything; on any failure stop what was started and re-raise."""
        workdir = Path(tempfile.mkdtemp(prefix="broker-bench-", dir="/tmp"))
        stack = cls(workdir=workdir, spiffe=DevIssuer.generate(kid="spiffe-bench"),
                    idp=DevIssuer.generate(kid="idp-bench"))
        try:
            stack.bao = start_dev_openbao(workdir / "openbao", startup_timeout=30)
            stack.pg_workdir = make_workdir("broker-bench-pg-")
            stack.pg = start_scram_cluster(stack.pg_workdir)
            asyncio.run(stack._configure_vault())
            stack._start_broker(broker_args)
        except BaseException:
            stack.close()
            raise
        return stack

    def close(self) -> None:
        """Stop the broker, OpenBao and PostgreSQL; remove the work directories. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.broker is not None:
            _stop_process(self.broker)
        if self._broker_log is not None:
            self._broker_log.close()
        if self.bao is not None:
            self.bao.stop()
        if self.pg is not None:
            self.pg.stop()
        if self.pg_workdir is not None:
            remove_workdir(self.pg_workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- set-up -----------------------------------------------------------------------------------

    async def _configure_vault(self) -> None:
        assert self.bao is not None and self.pg is not None
        root = self.workdir / "broker"
        root.mkdir()
        self.spiffe.write_jwks(root / "spiffe.jwks")
        self.idp.write_jwks(root / "idp.jwks")
        TokenSealer.generate_key_file(root / "store.key")
        port = free_port()
        self.config_path = bench_config(root, port=port, addr=self.bao.addr,
                                        audit_log=self.bao.audit_log).write(root / "broker.toml")
        self.broker_url = f"http://127.0.0.1:{port}"
        settings = load_settings({}, self.config_path)
        await seed_tickets_schema(self.pg.dsn())
        await asyncio.to_thread(self._vault_setup, settings, root)

    def _vault_setup(self, settings: Settings, root: Path) -> None:
        """Engines, `broker vault sync` and the broker token, through VaultAdmin (hvac: synchronous)."""
        assert self.bao is not None and self.pg is not None
        with VaultAdmin(self.bao.addr, token=self.bao.root_token, timeout=30) as admin:
            configure_pki(admin)
            # Without this every revoked certificate rebuilds the CRL synchronously: ending one task with
            # 1,000 certificates kept this OpenBao busy for ~55 s (quadratic as the CRL grows), and that
            # work would spill into the next timed pass. Issuance itself does not touch the CRL.
            admin.write("pki/config/crl", {"auto_rebuild": True})
            configure_child_token_role(admin)
            configure_database(admin, dsn_admin=self.pg.dsn())
            sync(admin, Catalog.from_settings(settings), audit_device=audit_device_of(settings))
            write_broker_token(admin, root / "vault-token")

    def _start_broker(self, extra_args: Sequence[str]) -> None:
        assert self.config_path is not None
        log_path = self.workdir / "broker.log"
        self._broker_log = log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_", "BROKER_"))}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.broker = subprocess.Popen(
            [sys.executable, *extra_args, "-m", "broker", "serve", "--config", str(self.config_path),
             "--log-level", "warning"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._broker_log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the benchmark only; it then stops the broker itself
        )
        _wait_http_ok(self.broker_url + "/v1/health", self.broker, 30, log_path)

    # -- accessors ----------------------------------------------------------------------------------

    @property
    def broker_pid(self) -> int:
        assert self.broker is not None
        return self.broker.pid

    @property
    def bao_pid(self) -> int:
        assert self.bao is not None
        return self.bao.process.pid

    @property
    def store_db(self) -> Path:
        return self.workdir / "broker" / "broker.db"

    @property
    def store_key(self) -> Path:
        return self.workdir / "broker" / "store.key"

    def broker_log_tail(self, limit: int = 2000) -> str:
        path = self.workdir / "broker.log"
        return path.read_text(errors="replace")[-limit:] if path.exists() else ""

    def user_token(self, user: str = USER, groups: Sequence[str] = USER_GROUPS) -> str:
        return self.idp.mint_id_token(issuer=IDP, subject=user, email=user, groups=tuple(groups), audience=AUDIENCE,
                                      auth_time=time.time())

    def operator_token(self) -> str:
        """An ID token of a member of ``group:secops`` (the config's operators)."""
        return self.user_token("secops-bench@example.com", ("secops",))

    def agent_svid(self, i: int, ttl: float) -> str:
        return self.spiffe.mint_svid(agent_id(i), audience=AUDIENCE, ttl=ttl)


async def admin_lease_count(session: aiohttp.ClientSession, bao: DevOpenBao, prefix: str) -> int:
    """How many leases OpenBao holds under ``prefix`` (one level: ``LIST sys/leases/lookup/<prefix>``)."""
    url = f"{bao.addr}/v1/sys/leases/lookup/{prefix.strip('/')}/"
    async with session.request("LIST", url, headers={"X-Vault-Token": bao.root_token.reveal()}) as resp:
        if resp.status == 404:
            return 0
        resp.raise_for_status()
        body = await resp.json()
    return len(body.get("data", {}).get("keys", []))


async def wait_leases_drained(session: aiohttp.ClientSession, bao: DevOpenBao, prefix: str,
                              timeout: float = 120) -> int:
    """Poll until OpenBao holds no lease under ``prefix`` (revocations done); return what is left at timeout."""
    deadline = time.monotonic() + timeout
    left = await admin_lease_count(session, bao, prefix)
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        left = await admin_lease_count(session, bao, prefix)
    return left


async def admin_lease_keys(session: aiohttp.ClientSession, bao: DevOpenBao, prefix: str) -> list[str]:
    """The keys OpenBao lists one level under ``prefix`` (leases, and sub-prefixes ending in ``/``); 404 = none."""
    url = f"{bao.addr}/v1/sys/leases/lookup/{prefix.strip('/')}/"
    async with session.request("LIST", url, headers={"X-Vault-Token": bao.root_token.reveal()}) as resp:
        if resp.status == 404:
            return []
        resp.raise_for_status()
        body = await resp.json()
    return list(body.get("data", {}).get("keys", []))


class AuditTail:
    """Vault requests seen by the file audit device from ``mark()`` on, counted by (operation, path).

    Reads only the ``request`` records appended since the mark, so it counts what OpenBao was asked
    (by anyone) in a window: the broker's Vault calls when nothing else talks to OpenBao.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def mark(self) -> None:
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def _records(self) -> list[dict[str, Any]]:
        import json
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        out: list[dict[str, Any]] = []
        for line in data.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def task_requests(self, tasks: Iterable[str]) -> int:
        """Requests made with a token of one of ``tasks`` (``response`` records whose ``auth.metadata.task``
        is one of them): a task token or an issuance token, i.e. the per-credential path, without the
        broker's own calls (maintenance, its token's renewal) or anyone else's."""
        wanted = set(tasks)
        return sum(1 for rec in self._records() if rec.get("type") == "response"
                   and str(((rec.get("auth") or {}).get("metadata") or {}).get("task")) in wanted)

    def counts(self) -> dict[str, int]:
        import re
        out: dict[str, int] = {}
        for rec in self._records():
            if rec.get("type") != "request":
                continue
            req = rec.get("request", {})
            path = str(req.get("path", "?"))
            # Group lease ids and per-role paths so the table stays short.
            path = re.sub(r"^(sys/leases/(lookup|revoke(-prefix)?))/.*$", r"\1", path)
            key = f"{req.get('operation', '?')} {path}"
            out[key] = out.get(key, 0) + 1
        return out
