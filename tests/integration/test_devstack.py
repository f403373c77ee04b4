"""Integration tests: ``broker.dev.stack`` starts and stops a real dev OpenBao cleanly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import aiohttp
import pytest

from broker.dev.stack import start_dev_openbao
from broker.vault import VaultClient
from tests.support.pg import PgCluster

pytestmark = pytest.mark.timeout(90)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class TestStartStop:
    async def test_start_serves_and_stop_leaves_no_process(self, tmp_path: Path) -> None:
        """A started server answers health with its root token; stop() reaps it and frees both ports."""
        server = start_dev_openbao(tmp_path)
        pid = server.process.pid
        port = int(server.addr.rsplit(":", 1)[1])
        try:
            async with aiohttp.ClientSession() as session:
                client = VaultClient(session, server.addr, token=server.root_token)
                assert not (await client.health()).sealed
                assert "root" in (await client.lookup_self()).policies
        finally:
            server.stop()
        assert server.process.returncode is not None
        assert not _pid_exists(pid), "process (or zombie) still present"
        assert _port_bindable(port) and _port_bindable(port + 1)
        server.stop()  # idempotent

    def test_config_declares_the_file_audit_device(self, tmp_path: Path) -> None:
        """openbao.hcl declares the file audit device, and requests land in workdir/audit.log."""
        server = start_dev_openbao(tmp_path, root_token="dev-root-token-for-test")
        try:
            assert server.root_token.reveal() == "dev-root-token-for-test"
            assert "dev-root-token-for-test" not in repr(server)
            hcl = (tmp_path / "openbao.hcl").read_text()
            assert 'audit "file" "main"' in hcl and str(tmp_path / "audit.log") in hcl
            assert server.audit_log == tmp_path / "audit.log"
        finally:
            server.stop()
        assert server.audit_log.stat().st_size > 0
        assert (tmp_path / "openbao.log").exists()

    def test_explicit_port_in_use_fails_loudly(self, tmp_path: Path) -> None:
        """Asking for a port that is taken raises VaultUnavailable with the server log in reason, and leaves no process."""
        from broker.errors import VaultUnavailable

        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            port = blocker.getsockname()[1]
            with pytest.raises(VaultUnavailable) as info:
                start_dev_openbao(tmp_path, port=port, startup_timeout=10)
        assert info.value.reason


class TestScramCluster:
    async def test_wrong_password_is_refused(self, pg_cluster: PgCluster) -> None:
        """The test PostgreSQL enforces SCRAM: the right password logs in, a wrong one is refused."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(pg_cluster.dsn()) as conn:
            cur = await conn.execute("SHOW password_encryption")
            assert (await cur.fetchone()) == ("scram-sha-256",)
            cur = await conn.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules")
            assert {r[0] for r in await cur.fetchall()} == {"scram-sha-256"}
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await psycopg.AsyncConnection.connect(
                host=pg_cluster.host, port=pg_cluster.port, user="postgres", password="wrong", dbname="postgres",
                connect_timeout=5,
            )
