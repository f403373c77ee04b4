"""Integration tests: ``PersistentOpenBao`` (raft storage) stops and comes back with its data, on the same port.

The harness is for tests where OpenBao goes away in the middle of something (a revocation, an issue) and
must come back with its leases; these tests show what it guarantees and measure what clients see meanwhile.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import psycopg
import pytest
import pytest_asyncio

from broker.dev.stack import PersistentOpenBao, start_persistent_openbao
from broker.errors import VaultUnavailable
from broker.vault import VaultClient, VaultSecret
from broker.vault.admin import VaultAdmin
from tests.support.fixtures import BaoEngines
from tests.support.pg import PgCluster, pg_login_works

pytestmark = pytest.mark.timeout(120)

POLICY_HCL = 'path "secret/data/x" { capabilities = ["read"] }\n'


def _processes_in(workdir: Path) -> list[psutil.Process]:
    """Live processes (zombies included) whose command line mentions ``workdir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _port_bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def pg_role_exists(pg: PgCluster, username: str) -> bool:
    async with await psycopg.AsyncConnection.connect(pg.dsn(), connect_timeout=5) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,))
        return await cur.fetchone() is not None


def _creds(secret: VaultSecret) -> tuple[str, str]:
    assert secret.data is not None
    return str(secret.data["username"]), str(secret.data["password"])


async def _restart(bao: PersistentOpenBao, *, kill: bool = False) -> None:
    """stop + start off the event loop (both block for up to ``startup_timeout``)."""
    await asyncio.to_thread(bao.stop, kill)
    await asyncio.to_thread(bao.start)


async def _list_leases(session: aiohttp.ClientSession, bao: PersistentOpenBao, prefix: str) -> list[str]:
    async with session.request(
        "LIST",
        f"{bao.addr}/v1/sys/leases/lookup/{prefix}",
        headers={"X-Vault-Token": bao.root_token.reveal()},
        timeout=aiohttp.ClientTimeout(total=5),
    ) as resp:
        if resp.status == 404:
            return []
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return [str(k) for k in body["data"]["keys"]]


@pytest_asyncio.fixture(loop_scope="function")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def setup_admin(persistent_openbao: PersistentOpenBao) -> Iterator[VaultAdmin]:
    """Root set-up access (hvac) to the persistent server: policies and lease revocation, in a thread."""
    with VaultAdmin(persistent_openbao.addr, token=persistent_openbao.root_token, timeout=30) as admin:
        yield admin


class TestRestartKeepsData:
    async def test_policy_written_before_stop_is_there_after_start(
        self, persistent_openbao: PersistentOpenBao, session: aiohttp.ClientSession, setup_admin: VaultAdmin
    ) -> None:
        """A policy written before stop() is read back after start(), on the same addr, with the same root token."""
        bao = persistent_openbao
        addr = bao.addr
        admin = VaultClient(session, bao.addr, token=bao.root_token)
        await asyncio.to_thread(setup_admin.put_policy, "survivor", POLICY_HCL)
        old_pid = bao.process.pid if bao.process else None
        await _restart(bao)
        assert bao.addr == addr and bao.process is not None and bao.process.pid != old_pid
        assert await asyncio.to_thread(setup_admin.read_policy, "survivor") == POLICY_HCL
        assert "root" in (await admin.lookup_self()).policies

    async def test_audit_log_keeps_growing_across_restarts(
        self, persistent_openbao: PersistentOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """The file audit device declared in the config is active again after a restart, in the same file."""
        bao = persistent_openbao
        admin = VaultClient(session, bao.addr, token=bao.root_token)
        await admin.lookup_self()
        size = bao.audit_log.stat().st_size
        await _restart(bao)
        await admin.lookup_self()
        assert bao.audit_log.stat().st_size > size

    async def test_leases_survive_restart_and_stay_revocable(
        self,
        persistent_bao_with_engines: BaoEngines,
        persistent_openbao: PersistentOpenBao,
        session: aiohttp.ClientSession,
        setup_admin: VaultAdmin,
    ) -> None:
        """Leases issued before a restart are listed and looked up after it; the PostgreSQL credential still
        logs in; revoking it after the restart drops the role."""
        bao, pg = persistent_openbao, persistent_bao_with_engines.pg
        admin = VaultClient(session, bao.addr, token=bao.root_token, timeout=30)
        cred = await admin.read_credential(persistent_bao_with_engines.db_creds_ro, token=bao.root_token)
        cert = await admin.read_credential(
            persistent_bao_with_engines.pki_issue, token=bao.root_token, method="POST",
            data={"common_name": "t1.agents.example.org", "ttl": "5m"},
        )
        user, password = _creds(cred)
        await _restart(bao)
        assert cred.lease_id.rsplit("/", 1)[1] in await _list_leases(session, bao, "database/creds/tickets-ro/")
        assert cert.lease_id.rsplit("/", 1)[1] in await _list_leases(session, bao, "pki/issue/agents/")
        info = await admin.lookup_lease(cred.lease_id)
        assert info is not None and 0 < info.ttl <= 600
        assert await pg_login_works(pg, user, password)
        await asyncio.to_thread(setup_admin.revoke_lease, cred.lease_id)
        await asyncio.to_thread(setup_admin.revoke_lease, cert.lease_id)
        assert await admin.lookup_lease(cred.lease_id) is None
        assert await admin.lookup_lease(cert.lease_id) is None
        assert not await pg_role_exists(pg, user)

    async def test_kill_9_then_start_recovers_data_and_leases(
        self,
        persistent_bao_with_engines: BaoEngines,
        persistent_openbao: PersistentOpenBao,
        session: aiohttp.ClientSession,
        setup_admin: VaultAdmin,
    ) -> None:
        """After SIGKILL (no graceful shutdown) start() brings back the policy and the lease, still revocable."""
        bao, pg = persistent_openbao, persistent_bao_with_engines.pg
        admin = VaultClient(session, bao.addr, token=bao.root_token, timeout=30)
        await asyncio.to_thread(setup_admin.put_policy, "survivor", POLICY_HCL)
        cred = await admin.read_credential(persistent_bao_with_engines.db_creds_ro, token=bao.root_token)
        user, password = _creds(cred)
        await _restart(bao, kill=True)
        assert await asyncio.to_thread(setup_admin.read_policy, "survivor") == POLICY_HCL
        assert await admin.lookup_lease(cred.lease_id) is not None
        assert await pg_login_works(pg, user, password)
        await asyncio.to_thread(setup_admin.revoke_lease, cred.lease_id)
        assert not await pg_role_exists(pg, user)

    async def test_lease_that_expired_while_down_is_revoked_by_the_server_after_start(
        self,
        persistent_bao_with_engines: BaoEngines,
        persistent_openbao: PersistentOpenBao,
        session: aiohttp.ClientSession,
    ) -> None:
        """MEASURED: a lease whose TTL ran out while OpenBao was stopped is revoked by OpenBao itself soon
        after start() (lease restore), and its PostgreSQL role is dropped."""
        bao, pg = persistent_openbao, persistent_bao_with_engines.pg
        admin = VaultClient(session, bao.addr, token=bao.root_token, timeout=30)
        cred = await admin.read_credential(persistent_bao_with_engines.db_creds_ro, token=bao.root_token)
        user, _ = _creds(cred)
        await admin.renew_lease(cred.lease_id, increment=2)  # shortens it to ~2 s
        await asyncio.to_thread(bao.stop)
        await asyncio.sleep(3)
        assert await pg_role_exists(pg, user)  # nobody revoked it while OpenBao was down
        await asyncio.to_thread(bao.start)
        deadline = time.monotonic() + 15
        while await pg_role_exists(pg, user) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not await pg_role_exists(pg, user)
        assert await admin.lookup_lease(cred.lease_id) is None


class TestWhileDown:
    async def test_stopped_server_fails_fast_with_vault_unavailable(
        self, persistent_openbao: PersistentOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """While stopped, a VaultClient call raises VaultUnavailable in well under a second (connection refused)."""
        bao = persistent_openbao
        client = VaultClient(session, bao.addr, token=bao.root_token, timeout=5)
        await asyncio.to_thread(bao.stop)
        started = time.monotonic()
        with pytest.raises(VaultUnavailable):
            await client.lookup_self()
        assert time.monotonic() - started < 1.0
        await asyncio.to_thread(bao.start)
        assert "root" in (await client.lookup_self()).policies

    async def test_paused_server_times_out_as_vault_unavailable(
        self, persistent_openbao: PersistentOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """SIGSTOPped (port open, nobody answering), a client with a 0.5 s timeout raises VaultUnavailable
        within its timeout; after SIGCONT the same client works again."""
        bao = persistent_openbao
        client = VaultClient(session, bao.addr, token=bao.root_token, timeout=0.5)
        bao.pause()
        try:
            started = time.monotonic()
            with pytest.raises(VaultUnavailable):
                await client.lookup_self()
            assert time.monotonic() - started < 1.5
        finally:
            bao.resume()
        assert "root" in (await client.lookup_self()).policies

    async def test_sealed_server_is_vault_unavailable_until_unsealed(
        self, persistent_openbao: PersistentOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """seal() makes calls fail with VaultUnavailable; unseal() with the saved key restores service."""
        bao = persistent_openbao
        client = VaultClient(session, bao.addr, token=bao.root_token)
        await asyncio.to_thread(bao.seal)
        assert (await client.health()).sealed
        with pytest.raises(VaultUnavailable):
            await client.lookup_self()
        await asyncio.to_thread(bao.unseal)
        assert "root" in (await client.lookup_self()).policies


class TestProcessHygiene:
    def test_restart_cycles_leave_no_process_and_free_the_ports(self, tmp_path: Path) -> None:
        """TERM, KILL and a paused stop all reap the server; after the last stop nothing with the workdir in
        its command line runs and both ports are free; the root token never shows in repr()."""
        bao = start_persistent_openbao(tmp_path)
        try:
            assert bao.root_token.reveal() not in repr(bao) and bao.unseal_key.reveal() not in repr(bao)
            pids = []
            for kill in (False, True):
                assert bao.process is not None
                pids.append(bao.process.pid)
                bao.stop(kill=kill)
                assert not bao.running and not _processes_in(tmp_path)
                bao.start()
            bao.pause()
            assert bao.process is not None
            pids.append(bao.process.pid)
        finally:
            bao.stop()  # on a SIGSTOPped server: must not hang
        assert not _processes_in(tmp_path)
        assert not any(psutil.pid_exists(pid) for pid in pids)
        assert _port_bindable(bao.port) and _port_bindable(bao.port + 1)
        bao.stop()  # idempotent

    def test_start_after_stop_reuses_the_port_immediately(self, tmp_path: Path) -> None:
        """start() right after stop() binds the same port (no TIME_WAIT failure), even with a client
        connection open at the moment of the stop."""
        bao = start_persistent_openbao(tmp_path)
        try:
            with socket.create_connection(("127.0.0.1", bao.port), timeout=2):
                bao.stop(kill=True)
            bao.start()
            assert bao.addr.endswith(f":{bao.port}") and bao.running
        finally:
            bao.stop()

    def test_refuses_a_workdir_that_already_holds_data(self, persistent_openbao: PersistentOpenBao) -> None:
        """start_persistent_openbao on a used workdir raises instead of initialising over existing data."""
        from broker.errors import ConfigError

        with pytest.raises(ConfigError):
            start_persistent_openbao(persistent_openbao.workdir)
