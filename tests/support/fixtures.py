"""Pytest fixtures for a real OpenBao and a SCRAM PostgreSQL. Import them into a conftest:

    from tests.support.fixtures import *  # noqa: F403

Scopes: the server processes are session-scoped and synchronous (no event loop involved); clients that
hold an ``aiohttp.ClientSession`` are function-scoped and declare ``loop_scope="function"``, so they work
whatever ``asyncio_default_fixture_loop_scope`` says, with tests on the default function loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
import pytest_asyncio

from broker.dev.engines import configure_kv, configure_ssh
from broker.dev.stack import (
    DevOpenBao,
    PersistentOpenBao,
    configure_child_token_role,
    configure_database,
    configure_pki,
    seed_tickets_schema,
    start_persistent_openbao,
)
from broker.vault import Sensitive, VaultClient
from broker.vault.admin import VaultAdmin
from tests.support.openbao import start_test_openbao
from tests.support.pg import (
    PgCluster,
    make_workdir,
    remove_workdir,
    start_scram_cluster,
)

__all__ = [
    "KV_VALUE",
    "BaoEngines",
    "BaoServer",
    "bao_with_engines",
    "openbao",
    "persistent_bao_with_engines",
    "persistent_openbao",
    "pg_cluster",
    "root_admin",
    "throwaway_openbao",
    "vault_admin",
]

T = TypeVar("T")


def run_coro_in_thread(coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    """Run ``coro`` to completion on a private loop in a worker thread.

    Session fixtures use this for one-off async set-up, so they neither need nor disturb the loops that
    pytest-asyncio owns.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result(timeout=timeout)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevOpenBao]:
    """A dev OpenBao for the whole session, with the file audit device ``main`` at ``audit_log``."""
    server = start_test_openbao(tmp_path_factory.mktemp("openbao"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def throwaway_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevOpenBao]:
    """A dev OpenBao for one test (to seal, stop or otherwise break)."""
    server = start_test_openbao(tmp_path_factory.mktemp("openbao-throwaway"))
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def vault_admin(openbao: DevOpenBao) -> AsyncIterator[VaultClient]:
    """A ``VaultClient`` with the root token on a fresh ``aiohttp`` session."""
    async with aiohttp.ClientSession() as session:
        yield VaultClient(session, openbao.addr, token=openbao.root_token)


@pytest.fixture
def root_admin(openbao: DevOpenBao) -> Iterator[VaultAdmin]:
    """A ``VaultAdmin`` (hvac) with the root token of the session OpenBao; async tests call it in a thread."""
    with VaultAdmin(openbao.addr, token=openbao.root_token) as admin:
        yield admin


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL 15 cluster on 127.0.0.1 that requires SCRAM passwords (no trust line)."""
    workdir = make_workdir()
    cluster = start_scram_cluster(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()
        remove_workdir(workdir)


class BaoServer(Protocol):
    """What ``DevOpenBao`` and ``PersistentOpenBao`` have in common (what engine set-up and tests read)."""

    @property
    def addr(self) -> str: ...
    @property
    def root_token(self) -> Sensitive: ...
    @property
    def audit_log(self) -> Path: ...
    @property
    def workdir(self) -> Path: ...
    @property
    def audit_device(self) -> str: ...


@dataclass(frozen=True)
class BaoEngines:
    """An OpenBao with example engines configured against ``pg``.

    ``bao`` is the session dev server (``bao_with_engines``) or a ``PersistentOpenBao``
    (``persistent_bao_with_engines``): narrow it with ``isinstance`` to stop/start it.

    ``pki_issue`` = ``pki/issue/agents`` (EC certs with leases), ``child_role`` = token role
    ``agent-child``, database mount ``database`` with roles ``tickets-ro``/``tickets-rw``
    (default TTL 10m, max 1h) on connection ``tickets`` (database ``postgres``, table ``tickets``).
    """

    bao: BaoServer
    pg: PgCluster
    pki_issue: str = "pki/issue/agents"
    child_role: str = "agent-child"
    db_creds_ro: str = "database/creds/tickets-ro"
    db_creds_rw: str = "database/creds/tickets-rw"
    ssh_sign: str = "ssh/sign/agents"
    kv_secret: str = "secret/data/brk/api-key"


# The KV value the session's OpenBao holds at ``BaoEngines.kv_secret`` (a dev server's own, nothing real).
KV_VALUE: dict[str, str] = {"api_key": "kv-" + secrets.token_hex(8)}


def _configure(bao: BaoServer, pg: PgCluster) -> None:
    run_coro_in_thread(seed_tickets_schema(pg.dsn()))
    with VaultAdmin(bao.addr, token=bao.root_token, timeout=30) as admin:
        configure_pki(admin)
        configure_child_token_role(admin)
        configure_database(admin, dsn_admin=pg.dsn())
        # SSH certificates and a KV value need no server of their own.
        configure_ssh(admin, allowed_users=("deploy", "ops"))
        configure_kv(admin, path="brk/api-key", data=KV_VALUE)


@pytest.fixture(scope="session")
def bao_with_engines(openbao: DevOpenBao, pg_cluster: PgCluster) -> BaoEngines:
    """The session OpenBao with PKI, the child-token role and the PostgreSQL engine set up once."""
    _configure(openbao, pg_cluster)
    return BaoEngines(bao=openbao, pg=pg_cluster)


@pytest.fixture
def persistent_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersistentOpenBao]:
    """A non-dev OpenBao on raft storage for one test: ``stop()``/``start()`` keep its data and port.

    Stopped (SIGKILL if SIGTERM does not do it within 10 s) at the end, whatever state the test left it in.
    """
    server = start_persistent_openbao(tmp_path_factory.mktemp("openbao-persistent"), startup_timeout=30)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def persistent_bao_with_engines(persistent_openbao: PersistentOpenBao, pg_cluster: PgCluster) -> BaoEngines:
    """``persistent_openbao`` with PKI, the child-token role and the PostgreSQL engine (as ``bao_with_engines``).

    ``engines.bao`` is the ``PersistentOpenBao`` (use the ``persistent_openbao`` fixture to get it typed).
    """
    _configure(persistent_openbao, pg_cluster)
    return BaoEngines(bao=persistent_openbao, pg=pg_cluster)
