"""A throwaway PostgreSQL cluster with SCRAM password authentication, for tests.

Why not the machine's own server on 5432: it trusts every connection, so it accepts any password and
cannot show that a revoked credential stops working. This cluster has no ``trust`` line at all.

PostgreSQL refuses to run as root. When the tests run as root, its binaries run as the ``postgres`` OS
user (``runuser``), the cluster's directories are chown'ed to it, and every parent of ``workdir`` must be
traversable by it (use a directory under ``/tmp`` with mode 0755, as ``make_workdir`` does).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("BROKER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_OS_USER = "postgres"


@dataclass
class PgCluster:
    """A running cluster on 127.0.0.1. ``stop()`` is idempotent."""

    host: str
    port: int
    superuser: str
    password: str
    datadir: Path
    workdir: Path
    _run_as: list[str]

    def dsn(self, db: str = "postgres") -> str:
        """A ``postgresql://`` URL for the superuser (password included: test clusters only)."""
        return f"postgresql://{self.superuser}:{self.password}@{self.host}:{self.port}/{db}"

    def __repr__(self) -> str:
        return f"PgCluster(host={self.host!r}, port={self.port}, superuser={self.superuser!r})"

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` and wait; then ``immediate`` if that did not work."""
        if not (self.datadir / "postmaster.pid").exists():
            return
        for mode in ("fast", "immediate"):
            done = subprocess.run(
                [*self._run_as, str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                return


def make_workdir(prefix: str = "broker-pg-") -> Path:
    """A fresh directory under ``/tmp`` that the ``postgres`` OS user can traverse (mode 0755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_traversable(path: Path, uid: int) -> None:
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            msg = f"{parent} is not traversable by the postgres OS user; use tests.support.pg.make_workdir()"
            raise RuntimeError(msg)


def start_scram_cluster(workdir: Path, *, startup_timeout: int = 60) -> PgCluster:
    """initdb a new cluster in ``workdir`` with SCRAM auth for every connection, start it, return it.

    Listens on 127.0.0.1 only, on a free port, with its unix socket inside ``workdir``; ``fsync`` is off
    (the data is thrown away).

    Raises:
        RuntimeError: binaries missing, a directory the ``postgres`` user cannot reach, or a failed
            ``initdb``/``pg_ctl start`` (the message carries the server log's tail).
    """
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).is_file():
            msg = f"PostgreSQL binary {PG_BIN / tool} not found (set BROKER_TEST_PG_BIN)"
            raise RuntimeError(msg)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_as: list[str] = []
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        pw = pwd.getpwnam(_OS_USER)
        owner = (pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", _OS_USER, "--"]
        _check_traversable(workdir, pw.pw_uid)

    datadir = workdir / "data"
    rundir = workdir / "run"  # socket, log and the one-shot password file; owned by the server's user
    rundir.mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)
    pwfile = rundir / "pwfile"
    pwfile.write_text(password + "\n", encoding="utf-8")
    pwfile.chmod(0o600)
    if owner is not None:
        os.chown(workdir, *owner)
        os.chown(rundir, *owner)
        os.chown(pwfile, *owner)

    def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=timeout, check=False)

    init = run(
        [
            str(PG_BIN / "initdb"),
            "-D", str(datadir),
            "-U", "postgres",
            "-E", "UTF8",
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "--no-instructions",
        ],
        timeout=120,
    )
    pwfile.unlink()
    if init.returncode != 0:
        msg = f"initdb failed: {init.stderr[-2000:]}"
        raise RuntimeError(msg)
    hba = (datadir / "pg_hba.conf").read_text(encoding="utf-8")
    if any(line.split()[-1:] == ["trust"] for line in hba.splitlines() if line and not line.startswith("#")):
        msg = "initdb wrote a trust line into pg_hba.conf"
        raise RuntimeError(msg)

    log = rundir / "postgres.log"
    for _attempt in range(3):
        port = _free_port()
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {rundir} -c fsync=off -c synchronous_commit=off"
            " -c full_page_writes=off -c password_encryption=scram-sha-256 -c max_connections=100"
        )
        start = run(
            [str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-l", str(log), "-o", opts, "-w", "-t", str(startup_timeout), "start"],
            timeout=startup_timeout + 30,
        )
        if start.returncode == 0:
            return PgCluster(
                host="127.0.0.1", port=port, superuser="postgres", password=password,
                datadir=datadir, workdir=workdir, _run_as=run_as,
            )
    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.exists() else ""
    msg = f"pg_ctl start failed: {start.stderr[-1000:]} {tail}"
    raise RuntimeError(msg)


def remove_workdir(workdir: Path) -> None:
    """Delete a cluster's directory after ``stop()``."""
    shutil.rmtree(workdir, ignore_errors=True)


async def pg_login_works(pg: PgCluster, username: str, password: str) -> bool:
    """True when PostgreSQL accepts the credential and lets it read ``tickets``."""
    import psycopg

    try:
        conn = await psycopg.AsyncConnection.connect(
            host=pg.host, port=pg.port, dbname="postgres", user=username, password=password, connect_timeout=5
        )
    except psycopg.OperationalError:
        return False
    async with conn:
        cur = await conn.execute("SELECT count(*) FROM tickets")
        row = await cur.fetchone()
        assert row is not None and row[0] >= 2
    return True


@contextlib.asynccontextmanager
async def scratch_database(pg: PgCluster, prefix: str = "broker_") -> AsyncIterator[str]:
    """A fresh database on the tests' own PostgreSQL, dropped afterwards (even with connections left open)."""
    import psycopg

    name = prefix + secrets.token_hex(4)
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
