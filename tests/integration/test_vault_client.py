"""Integration tests: ``broker.vault.VaultClient`` and the admin ``VaultAdmin`` (hvac) against a real OpenBao
(and a SCRAM PostgreSQL).

No mock of Vault's API anywhere: every answer comes from ``bao server -dev``. The error-map tests at the
top are pure (they pin the translation tables, httpx ``tests/test_exceptions.py`` style).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import pickle
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import aiohttp
import hvac.exceptions
import psycopg
import pytest
import pytest_asyncio
import requests

from broker.audit.vaultlog import parse_time
from broker.dev.stack import HMAC_AUDIT_DEVICE, DevOpenBao
from broker.errors import (
    BadRequest,
    VaultBadResponse,
    VaultDenied,
    VaultError,
    VaultUnavailable,
)
from broker.vault.admin import (
    TokenRole,
    VaultAdmin,
    hvac_error_class,
    transport_error_class,
)
from broker.vault.client import (
    Sensitive,
    VaultClient,
    VaultSecret,
    VaultTokenAuth,
    _status_error,
    _transport_error,
    _transport_error_class,
    validate_path,
)
from broker.vault.transport import ConnectFailed
from tests.support.fixtures import BaoEngines
from tests.support.openbao import bao_cli
from tests.support.pg import pg_login_works

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

TASK_ROLE = "task-test"
TASK_POLICY = "task-test-grants"
BROKER_POLICY = "test-broker"


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, timeout: float = 5.0) -> T:
    """Poll ``probe`` until ``done(result)``; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout}s; last result {result!r}")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture(loop_scope="function")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def engines_setup(bao_with_engines: BaoEngines) -> Iterator[VaultAdmin]:
    """Root admin (hvac) on the session OpenBao with engines, after writing the task-token role and policies."""
    with VaultAdmin(bao_with_engines.bao.addr, token=bao_with_engines.bao.root_token) as admin:
        _write_test_roles(admin)
        yield admin


def _write_test_roles(admin: VaultAdmin) -> None:
    admin.put_policy(
        TASK_POLICY,
        'path "pki/issue/agents" { capabilities = ["update"] }\n'
        'path "database/creds/tickets-ro" { capabilities = ["read"] }\n',
    )
    admin.put_policy(
        BROKER_POLICY,
        f'path "auth/token/create/{TASK_ROLE}" {{ capabilities = ["update"] }}\n'
        'path "auth/token/revoke-accessor" { capabilities = ["update"] }\n'
        'path "auth/token/lookup-accessor" { capabilities = ["update"] }\n'
        'path "sys/leases/lookup" { capabilities = ["update"] }\n'
        'path "sys/leases/renew" { capabilities = ["update"] }\n'
        'path "sys/leases/revoke" { capabilities = ["update"] }\n',
    )
    admin.put_token_role(
        TASK_ROLE,
        TokenRole(allowed_policies=frozenset({TASK_POLICY}), orphan=True, renewable=False, token_type="service",
                  token_explicit_max_ttl=600),
    )


@pytest_asyncio.fixture(loop_scope="function")
async def engines_admin(engines_setup: VaultAdmin, bao_with_engines: BaoEngines,
                        session: aiohttp.ClientSession) -> VaultClient:
    """Root client on the session OpenBao with engines, once ``engines_setup`` wrote the role and policies."""
    return VaultClient(session, bao_with_engines.bao.addr, token=bao_with_engines.bao.root_token)


async def broker_client(setup: VaultAdmin, session: aiohttp.ClientSession, addr: str) -> VaultClient:
    """A client on a fresh token that holds only the narrow broker policy."""
    auth = await asyncio.to_thread(setup.create_token, policies=[BROKER_POLICY], ttl="10m", display_name="broker-test")
    return VaultClient(session, addr, token=auth.client_token)


async def new_task_token(broker: VaultClient, task: str = "t-1", ttl: int = 300) -> VaultTokenAuth:
    return await broker.create_token_from_role(
        TASK_ROLE,
        policies=[TASK_POLICY],
        ttl=ttl,
        explicit_max_ttl=ttl,
        meta={"task": task, "user": "alice", "agent": "spiffe://example.org/agent/a", "tenant": "acme", "role": "r"},
        display_name=f"task-{task}",
    )


# ------------------------------------------------------------------------------------------------
# Pure: the value types and the error maps


class TestSensitive:
    def test_repr_and_str_hide_the_value(self) -> None:
        """repr(), str() and f-strings of a Sensitive show '<redacted>', never the value."""
        s = Sensitive("s.abcdefghijklmnopqrstuvwx")
        assert repr(s) == str(s) == f"{s}" == "<redacted>"
        assert "abcdef" not in repr([s, {"k": s}])

    def test_reveal_returns_the_value(self) -> None:
        """reveal() gives back the exact string, and equality compares values."""
        assert Sensitive("x1").reveal() == "x1"
        assert Sensitive("x1") == Sensitive("x1") != Sensitive("x2")

    def test_cannot_be_pickled(self) -> None:
        """Pickling a secret is refused, so it cannot leak into caches or queues."""
        with pytest.raises(TypeError):
            pickle.dumps(Sensitive("v"))

    def test_secret_repr_hides_data_and_token(self) -> None:
        """VaultSecret's repr lists the data keys but neither passwords nor the token."""
        auth = VaultTokenAuth(Sensitive("s.tokentokentokentokentoken"), "acc", 60, False, ("p",), True)
        secret = VaultSecret("rid", "lease/1", 60, True, {"password": "hunter2-secret"}, auth, ())
        text = repr(secret)
        assert "hunter2" not in text and "tokentoken" not in text
        assert "password" in text and "lease/1" in text


class TestValidatePath:
    @pytest.mark.parametrize(
        "path", ["database/creds/tickets-ro", "pki/issue/agents", "auth/token/create/r_1", "a", "x/y.z/A-9"]
    )
    def test_accepts_plain_paths(self, path: str) -> None:
        """Segments of [A-Za-z0-9_.-] joined by single slashes pass unchanged."""
        assert validate_path(path) == path

    @pytest.mark.parametrize(
        "path",
        ["", "/pki/issue", "pki/issue/", "pki//issue", "pki/../sys/seal", "./pki", "pki/.", "a b", "a?b=c",
         "a%2Fb", "a#b", "p@q", "caf\u00e9", "x" * 513, "sys/raw\\x", "a\nb"],
    )
    def test_rejects_unsafe_paths(self, path: str) -> None:
        """Empty, dot and dot-dot segments, outer slashes, query/escape characters and >512 chars raise BadRequest."""
        with pytest.raises(BadRequest):
            validate_path(path)


def _all_subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    out: set[type[BaseException]] = set()
    for sub in cls.__subclasses__():
        out.add(sub)
        out |= _all_subclasses(sub)
    return out


# Every aiohttp client exception, pinned. A new aiohttp class fails the completeness test below until
# someone decides what it means for the broker.
TRANSPORT_MAP: dict[str, type[VaultError]] = {
    "ClientError": VaultError,
    "ClientConnectionError": VaultUnavailable,
    "ClientConnectionResetError": VaultUnavailable,
    "ClientConnectorCertificateError": VaultError,
    "ClientConnectorDNSError": VaultUnavailable,
    "ClientConnectorError": VaultUnavailable,
    "ClientConnectorSSLError": VaultError,
    "ClientHttpProxyError": VaultBadResponse,
    "ClientOSError": VaultUnavailable,
    "ClientPayloadError": VaultUnavailable,
    "ClientProxyConnectionError": VaultUnavailable,
    "ClientResponseError": VaultBadResponse,
    "ClientSSLError": VaultError,
    "ConnectionTimeoutError": VaultUnavailable,
    "ContentTypeError": VaultBadResponse,
    "InvalidURL": VaultError,
    "InvalidUrlClientError": VaultError,
    "InvalidUrlRedirectClientError": VaultError,
    "NonHttpUrlClientError": VaultError,
    "NonHttpUrlRedirectClientError": VaultError,
    "RedirectClientError": VaultError,
    "ServerConnectionError": VaultUnavailable,
    "ServerDisconnectedError": VaultUnavailable,
    "ServerFingerprintMismatch": VaultError,
    "ServerTimeoutError": VaultUnavailable,
    "SocketTimeoutError": VaultUnavailable,
    "TooManyRedirects": VaultBadResponse,
    "UploadAbortedError": VaultError,
    "UnixClientConnectorError": VaultUnavailable,
    "WSServerHandshakeError": VaultBadResponse,
}


class TestErrorMap:
    def test_every_aiohttp_error_is_mapped_as_pinned(self) -> None:
        """Each aiohttp.ClientError subclass maps to exactly the VaultError class pinned in TRANSPORT_MAP."""
        classes: set[type[BaseException]] = {aiohttp.ClientError, *_all_subclasses(aiohttp.ClientError)}
        missing = sorted(c.__name__ for c in classes if c.__name__ not in TRANSPORT_MAP)
        assert not missing, f"decide how these map: {missing}"
        for cls in classes:
            assert _transport_error_class(cls) is TRANSPORT_MAP[cls.__name__], cls.__name__

    @pytest.mark.parametrize(
        ("exc", "expected"),
        [
            (TimeoutError(), VaultUnavailable),
            (TimeoutError(), VaultUnavailable),
            (ConnectionRefusedError(), VaultUnavailable),
            (OSError("network down"), VaultUnavailable),
            (aiohttp.ServerDisconnectedError(), VaultUnavailable),
        ],
    )
    def test_non_aiohttp_transport_errors(self, exc: BaseException, expected: type[VaultError]) -> None:
        """Timeouts and OS socket errors map to VaultUnavailable."""
        assert type(_transport_error(exc, "op")) is expected

    def test_every_status_maps(self) -> None:
        """Every non-2xx status 300-599 maps: 403 denied; 3xx/412/429/472/473/502/503/504 unavailable; else bad response."""
        unavailable = {412, 429, 472, 473, 502, 503, 504}
        for status in [*range(300, 600)]:
            if 200 <= status < 300:
                continue
            err = _status_error(status, {"errors": ["x"]}, "op")
            if status == 403:
                assert type(err) is VaultDenied
            elif status in unavailable or status < 400:
                assert type(err) is VaultUnavailable, status
            else:
                assert type(err) is VaultBadResponse, status

    def test_vault_text_goes_to_reason_scrubbed_never_to_message(self) -> None:
        """Vault's error strings stay out of the message; in reason, token-looking strings are cut out."""
        body = {"errors": ["bad token s.AAAAAAAAAAAAAAAAAAAAAAAA and hvs.BBBBBBBBBBBBBBBBBBBBBBBBBBBB b.CCCCCCCCCCCCCCCCCCCCCCCCC"]}
        err = _status_error(400, body, "read credential")
        assert "bad token" not in str(err)
        assert "bad token" in err.reason
        for fragment in ("AAAAAAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBBBBBB", "CCCCCCCCCCCCCCCCCCCC"):
            assert fragment not in err.reason and fragment not in str(err)

    def test_500_is_documented_as_maybe_issued(self) -> None:
        """A 500 is VaultBadResponse, and the issuing methods say it may mean the credential was created."""
        assert type(_status_error(500, None, "op")) is VaultBadResponse
        for method in (VaultClient.read_credential, VaultClient.create_token_from_role, VaultAdmin.create_token):
            assert method.__doc__ is not None and "500" in method.__doc__


# ------------------------------------------------------------------------------------------------
# Transport failures against real sockets


class TestTransport:
    async def test_unreachable_port_is_unavailable(self, session: aiohttp.ClientSession) -> None:
        """Connection refused on a closed loopback port raises VaultUnavailable, chained from the transport's
        "nothing was sent" error (which lets a request fail over to another node)."""
        client = VaultClient(session, f"http://127.0.0.1:{free_port()}", token="t", timeout=2)
        with pytest.raises(VaultUnavailable) as info:
            await client.lookup_self()
        assert isinstance(info.value.__cause__, ConnectFailed)

    async def test_silent_server_times_out_as_unavailable(self, session: aiohttp.ClientSession) -> None:
        """A listener that accepts and never answers raises VaultUnavailable after the client timeout."""
        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)
            writer.close()

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = VaultClient(session, f"http://127.0.0.1:{port}", token="t", timeout=0.3)
            started = time.monotonic()
            with pytest.raises(VaultUnavailable):
                await client.health()
            assert time.monotonic() - started < 3
        finally:
            server.close()

    async def test_disconnect_is_unavailable(self, session: aiohttp.ClientSession) -> None:
        """A peer that closes the connection without answering raises VaultUnavailable."""
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(10)
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = VaultClient(session, f"http://127.0.0.1:{port}", token="t", timeout=2)
            with pytest.raises(VaultUnavailable):
                await client.lookup_lease("x")
        finally:
            server.close()

    async def test_non_json_answer_is_bad_response(self, bao_with_engines: BaoEngines, session: aiohttp.ClientSession) -> None:
        """A 200 whose body is not JSON (pki/ca/pem answers PEM text) raises VaultBadResponse."""
        client = VaultClient(session, bao_with_engines.bao.addr, token=bao_with_engines.bao.root_token)
        with pytest.raises(VaultBadResponse):
            await client.read_credential("pki/ca/pem", token=bao_with_engines.bao.root_token)

    async def test_invalid_path_never_reaches_the_network(self, session: aiohttp.ClientSession) -> None:
        """A path with '..' raises BadRequest before any request (the address is unreachable anyway)."""
        client = VaultClient(session, f"http://127.0.0.1:{free_port()}", token="t")
        with pytest.raises(BadRequest):
            await client.read_credential("database/../sys/seal", token="t")


# Every VaultClient method that reads fields of Vault's answer, with arguments. A new public method fails
# the completeness test below until it is put here or in UNPARSED.
PARSERS: dict[str, Callable[[VaultClient], Awaitable[object]]] = {
    "health": lambda c: c.health(),
    "create_token_from_role": lambda c: c.create_token_from_role(
        "r", policies=["p"], ttl=60, explicit_max_ttl=60, meta={}, display_name="d"),
    "create_child_token": lambda c: c.create_child_token(
        token="t", policies=["p"], ttl=60, explicit_max_ttl=60, meta={}, display_name="d"),
    "renew_self": lambda c: c.renew_self(token="t", increment=60),
    "lookup_accessor": lambda c: c.lookup_accessor("a"),
    "lookup_lease": lambda c: c.lookup_lease("l"),
    "list_leases": lambda c: c.list_leases("pki/issue/agents"),
    "read_credential": lambda c: c.read_credential("database/creds/r", token="t"),
    "renew_lease": lambda c: c.renew_lease("l", increment=60),
    "lookup_self": lambda c: c.lookup_self(),
    "audit_hash": lambda c: c.audit_hash("file", "v"),
}
# Methods that read nothing of the answer. (The set-up calls are broker.vault.admin's, on hvac.)
UNPARSED = frozenset({"revoke_accessor", "revoke_lease", "force_revoke_lease", "tidy_leases"})
# Each field a parser reads first, with the wrong type.
MISTYPED = {"auth": 7, "data": 7, "hash": 7, "initialized": 7, "lease_id": 7}


@pytest_asyncio.fixture(loop_scope="function")
async def not_vault() -> AsyncIterator[str]:
    """Not a Vault: a loopback server that answers any request (LIST too) 200 with MISTYPED's fields."""
    body = json.dumps(MISTYPED).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


class TestAnswerShapes:
    def test_every_method_is_classified(self) -> None:
        """Each public VaultClient method either reads its answer (PARSERS) or does not (UNPARSED)."""
        methods = {name for name, f in vars(VaultClient).items()
                   if not name.startswith("_") and inspect.iscoroutinefunction(f)}
        assert methods == set(PARSERS) | UNPARSED

    @pytest.mark.parametrize("name", sorted(PARSERS))
    async def test_a_mistyped_answer_is_a_bad_response(
        self, name: str, not_vault: str, session: aiohttp.ClientSession
    ) -> None:
        """A 200 whose fields have the wrong type raises VaultBadResponse naming the field, never anything else."""
        client = VaultClient(session, not_vault, token="t", timeout=2)
        with pytest.raises(VaultBadResponse) as info:
            await PARSERS[name](client)
        assert "bad or missing field" in info.value.reason
        assert str(info.value).startswith("unexpected answer from Vault to ")


# ------------------------------------------------------------------------------------------------
# Against the real server


class TestHealth:
    async def test_active_dev_server(self, vault_admin: VaultClient) -> None:
        """An unsealed dev server reports initialized, unsealed, active, version 2.7.x."""
        health = await vault_admin.health()
        assert health.initialized and not health.sealed and not health.standby
        assert health.version.startswith("2.")

    async def test_sealed_server_is_data_for_health_and_unavailable_for_calls(
        self, throwaway_openbao: DevOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """After `bao operator seal`, health says sealed (503 as data) and token calls raise VaultUnavailable."""
        await bao_cli(throwaway_openbao, "operator", "seal")
        client = VaultClient(session, throwaway_openbao.addr, token=throwaway_openbao.root_token)
        health = await client.health()
        assert health.sealed and health.initialized
        with pytest.raises(VaultUnavailable) as info:
            await client.lookup_self()
        assert "503" in info.value.reason
        with pytest.raises(VaultUnavailable):
            await client.read_credential("secret/data/x", token=throwaway_openbao.root_token)


class TestAdmin:
    """``VaultAdmin`` (hvac, synchronous) against the real server: set-up endpoints, typed answers."""

    def test_policy_round_trip(self, root_admin: VaultAdmin) -> None:
        """put_policy then read_policy returns the same HCL; an unknown policy reads as None."""
        hcl = 'path "database/creds/x" { capabilities = ["read"] }\n'
        root_admin.put_policy("adm-rt", hcl)
        assert root_admin.read_policy("adm-rt") == hcl
        assert root_admin.read_policy("adm-no-such") is None

    def test_token_role_round_trip(self, root_admin: VaultAdmin) -> None:
        """put_token_role then read_token_role gives the same TokenRole back; an unknown role reads as None."""
        role = TokenRole(allowed_policies=frozenset({"p1", "p2"}), orphan=True, renewable=False, token_type="service",
                         token_explicit_max_ttl=120, token_no_default_policy=True)
        root_admin.put_token_role("adm-role", role)
        assert root_admin.read_token_role("adm-role") == role
        assert root_admin.read_token_role("adm-role-missing") is None

    def test_enable_secrets_engine_is_idempotent_for_the_same_type(self, root_admin: VaultAdmin) -> None:
        """Mounting the same type twice succeeds; another type on the same path raises VaultBadResponse."""
        root_admin.enable_secrets_engine("adm-kv", "kv", config={"max_lease_ttl": "1h"})
        root_admin.enable_secrets_engine("adm-kv", "kv")
        with pytest.raises(VaultBadResponse) as info:
            root_admin.enable_secrets_engine("adm-kv", "transit")
        assert "kv" in info.value.reason

    def test_generic_write_and_read(self, root_admin: VaultAdmin) -> None:
        """write() stores, read() returns the data, and a missing path reads as None."""
        root_admin.enable_secrets_engine("adm-kv1", "kv")
        assert root_admin.write("adm-kv1/thing", {"colour": "blue"}) is None
        assert root_admin.read("adm-kv1/thing") == {"colour": "blue"}
        assert root_admin.read("adm-kv1/nothing") is None

    def test_non_json_answer_is_bad_response(self, root_admin: VaultAdmin, bao_with_engines: BaoEngines) -> None:
        """A 200 whose body is not JSON (pki/ca/pem answers PEM text) raises VaultBadResponse, as in VaultClient."""
        with pytest.raises(VaultBadResponse):
            root_admin.read("pki/ca/pem")

    def test_invalid_path_never_reaches_the_network(self) -> None:
        """A name or path with '..' or '/' raises BadRequest before any request (the address is unreachable)."""
        with VaultAdmin(f"http://127.0.0.1:{free_port()}", token="t") as admin:
            for call in (lambda: admin.read("pki/../sys/seal"), lambda: admin.put_policy("a/b", ""),
                         lambda: admin.read_token_role(".."), lambda: admin.enable_secrets_engine("x/../y", "kv")):
                with pytest.raises(BadRequest):
                    call()

    def test_unreachable_port_is_unavailable(self) -> None:
        """Connection refused raises VaultUnavailable, chained from the requests error."""
        with VaultAdmin(f"http://127.0.0.1:{free_port()}", token="t", timeout=2) as admin, \
                pytest.raises(VaultUnavailable) as info:
            admin.read_policy("x")
        assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)

    async def test_redirect_is_not_followed(self) -> None:
        """A 307 (a standby pointing elsewhere) is VaultUnavailable: the token is not replayed to the Location."""
        seen: list[bytes] = []

        async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/v1/sys/policies/acl/x\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(redirect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with VaultAdmin(f"http://127.0.0.1:{port}", token="s.redirected-token-000000000", timeout=5) as admin:
                with pytest.raises(VaultUnavailable) as info:
                    await asyncio.to_thread(admin.read_policy, "x")
                assert "307" in info.value.reason
        finally:
            server.close()
        assert len(seen) == 1

    def test_forbidden_and_bad_token_are_denied(self, root_admin: VaultAdmin, openbao: DevOpenBao) -> None:
        """A token without the capability, and an invalid token, raise VaultDenied (403), never hvac's Forbidden."""
        auth = root_admin.create_token(policies=["default"], ttl="5m")
        bogus = "s.ZZZZZZZZZZZZZZZZZZZZZZZZ"
        for token in (auth.client_token, Sensitive(bogus)):
            with VaultAdmin(openbao.addr, token=token) as weak, pytest.raises(VaultDenied) as info:
                weak.put_policy("adm-denied", 'path "x" { capabilities = ["read"] }')
            assert isinstance(info.value.__cause__, hvac.exceptions.Forbidden)
            assert bogus not in str(info.value) and bogus not in info.value.reason
        assert "ZZZZ" not in repr(VaultAdmin(openbao.addr, token=bogus))

    async def test_create_token_and_lookup_self(self, root_admin: VaultAdmin, vault_admin: VaultClient) -> None:
        """create_token makes a token with the given policies/meta; VaultClient.lookup_self with it reports them."""
        auth = await asyncio.to_thread(
            root_admin.create_token, policies=["default"], ttl="5m", display_name="adm", meta={"k": "v"},
            no_parent=True,
        )
        assert auth.orphan and auth.accessor and "default" in auth.policies
        assert isinstance(auth.client_token, Sensitive) and auth.client_token.reveal() not in repr(auth)
        info = await vault_admin.lookup_self(token=auth.client_token)
        assert info.accessor == auth.accessor and info.meta == {"k": "v"} and 0 < info.ttl <= 300
        assert info.expire_time is not None

    async def test_forbidden_call_is_denied(self, root_admin: VaultAdmin, vault_admin: VaultClient) -> None:
        """A token without the policy for a path raises VaultDenied (403), not a generic error."""
        auth = await asyncio.to_thread(root_admin.create_token, policies=["default"], ttl="5m")
        with pytest.raises(VaultDenied):
            await vault_admin.read_credential("sys/mounts", token=auth.client_token)
        with pytest.raises(VaultDenied):
            await vault_admin.lookup_self(token="s.not-a-real-token-000000000")

    async def test_error_messages_carry_no_token(self, vault_admin: VaultClient) -> None:
        """A denied call's message and reason never contain the token that was sent."""
        bogus = "s.ZZZZZZZZZZZZZZZZZZZZZZZZ"
        with pytest.raises(VaultError) as info:
            await vault_admin.lookup_self(token=bogus)
        assert bogus not in str(info.value) and bogus not in info.value.reason

    async def test_audit_hash_matches_the_audit_log(
        self, root_admin: VaultAdmin, vault_admin: VaultClient, openbao: DevOpenBao
    ) -> None:
        """audit_hash of a token's accessor equals the HMAC a device at Vault's default wrote for that token's
        request; the device with ``hmac_accessor = "false"`` wrote the accessor itself."""
        assert openbao.hmac_audit_log is not None
        auth = await asyncio.to_thread(root_admin.create_token, policies=["default"], ttl="5m")
        await vault_admin.lookup_self(token=auth.client_token)
        hashed = await vault_admin.audit_hash(HMAC_AUDIT_DEVICE, auth.accessor)
        assert hashed.startswith("hmac-sha256:")

        def written(log: Path, accessor: str) -> bool:
            for line in log.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if (entry.get("request", {}).get("path") == "auth/token/lookup-self"
                        and entry.get("auth", {}).get("accessor") == accessor):
                    return True
            return False

        async def seen() -> bool:
            return written(openbao.hmac_audit_log, hashed) and written(openbao.audit_log, auth.accessor)

        await eventually(seen, bool)


# Every hvac exception and every requests exception, pinned (as TRANSPORT_MAP pins aiohttp's). A new class
# in either library fails the completeness tests below until someone decides what it means.
HVAC_MAP: dict[str, type[VaultError]] = {
    "VaultError": VaultError,
    "InvalidRequest": VaultBadResponse,
    "Unauthorized": VaultBadResponse,
    "Forbidden": VaultDenied,
    "InvalidPath": VaultBadResponse,
    "UnsupportedOperation": VaultBadResponse,
    "PreconditionFailed": VaultUnavailable,
    "RateLimitExceeded": VaultUnavailable,
    "InternalServerError": VaultBadResponse,
    "VaultNotInitialized": VaultBadResponse,
    "BadGateway": VaultUnavailable,
    "VaultDown": VaultUnavailable,
    "UnexpectedError": VaultBadResponse,
    "ParamValidationError": VaultError,
}

REQUESTS_MAP: dict[str, type[VaultError]] = {
    "RequestException": VaultError,
    "ConnectionError": VaultUnavailable,
    "ProxyError": VaultUnavailable,
    "SSLError": VaultError,
    "ConnectTimeout": VaultUnavailable,
    "ReadTimeout": VaultUnavailable,
    "Timeout": VaultUnavailable,
    "ChunkedEncodingError": VaultUnavailable,
    "RetryError": VaultError,
    "HTTPError": VaultBadResponse,
    "TooManyRedirects": VaultBadResponse,
    "ContentDecodingError": VaultBadResponse,
    "InvalidJSONError": VaultBadResponse,
    "JSONDecodeError": VaultBadResponse,
    "InvalidHeader": VaultBadResponse,
    "URLRequired": VaultError,
    "MissingSchema": VaultError,
    "InvalidSchema": VaultError,
    "InvalidURL": VaultError,
    "InvalidProxyURL": VaultError,
    "StreamConsumedError": VaultError,
    "UnrewindableBodyError": VaultError,
}


class TestAdminErrorMap:
    def test_every_hvac_error_is_mapped_as_pinned(self) -> None:
        """Each hvac.exceptions.VaultError subclass maps to exactly the VaultError class pinned in HVAC_MAP."""
        root = hvac.exceptions.VaultError
        classes: set[type[BaseException]] = {root, *_all_subclasses(root)}
        missing = sorted(c.__name__ for c in classes if c.__name__ not in HVAC_MAP)
        assert not missing, f"decide how these map: {missing}"
        for cls in classes:
            assert hvac_error_class(cls) is HVAC_MAP[cls.__name__], cls.__name__

    def test_status_beats_hvac_class(self) -> None:
        """hvac lumps 412/472/473/504 into UnexpectedError: the status the adapter kept decides, as in VaultClient."""
        for status in (412, 472, 473, 504):
            assert hvac_error_class(hvac.exceptions.UnexpectedError, status) is VaultUnavailable
        assert hvac_error_class(hvac.exceptions.UnexpectedError, 405) is VaultBadResponse

    def test_every_requests_error_is_mapped_as_pinned(self) -> None:
        """Each requests.RequestException subclass maps to exactly the VaultError class pinned in REQUESTS_MAP."""
        root = requests.exceptions.RequestException
        classes: set[type[BaseException]] = {root, *_all_subclasses(root)}
        missing = sorted(c.__name__ for c in classes if c.__name__ not in REQUESTS_MAP)
        assert not missing, f"decide how these map: {missing}"
        for cls in classes:
            assert transport_error_class(cls) is REQUESTS_MAP[cls.__name__], cls.__name__


class TestLeases:
    async def test_pki_lease_lookup_and_revoke(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, bao_with_engines: BaoEngines
    ) -> None:
        """A PKI cert has a lease; lookup shows it; revoke_lease removes it; lookup then returns None."""
        root = bao_with_engines.bao.root_token
        cert = await engines_admin.read_credential(
            "pki/issue/agents", token=root, method="POST",
            data={"common_name": "agent-a", "uri_sans": "spiffe://example.org/agent/a", "ttl": "5m"},
        )
        assert cert.lease_id.startswith("pki/issue/agents/") and cert.data is not None and "certificate" in cert.data
        info = await engines_admin.lookup_lease(cert.lease_id)
        assert info is not None and info.lease_id == cert.lease_id and 0 < info.ttl <= 300 and info.expire_time
        assert info.issue_time and abs(parse_time(info.issue_time) - time.time()) < 30
        assert cert.lease_id in await engines_admin.list_leases("pki/issue/agents")
        await asyncio.to_thread(engines_setup.revoke_lease, cert.lease_id)
        assert await engines_admin.lookup_lease(cert.lease_id) is None
        assert cert.lease_id not in await engines_admin.list_leases("pki/issue/agents")

    async def test_listing_a_path_without_leases_is_empty(self, engines_admin: VaultClient) -> None:
        """Vault answers 404 to a LIST with nothing under it: no leases, not an error."""
        assert await engines_admin.list_leases("pki/issue/nobody-issues-here") == []

    async def test_lookup_of_unknown_lease_is_none(self, vault_admin: VaultClient) -> None:
        """sys/leases/lookup's 400 "invalid lease" becomes None."""
        assert await vault_admin.lookup_lease("database/creds/tickets-ro/doesnotexist") is None

    async def test_db_credential_renew(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, bao_with_engines: BaoEngines
    ) -> None:
        """A database lease is renewable; renewing with an increment returns the granted TTL."""
        cred = await engines_admin.read_credential("database/creds/tickets-ro", token=bao_with_engines.bao.root_token)
        assert cred.renewable and cred.lease_duration == 600
        renewed = await engines_admin.renew_lease(cred.lease_id, increment=900)
        assert renewed.lease_id == cred.lease_id and 600 < renewed.ttl <= 900
        await asyncio.to_thread(engines_setup.revoke_lease, cred.lease_id)

    async def test_measured_renew_with_smaller_increment_shortens_db_lease(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, bao_with_engines: BaoEngines
    ) -> None:
        """MEASURED (OpenBao 2.7.2): renew with increment 60 < current TTL 600 shortens the database lease to ~60 s."""
        cred = await engines_admin.read_credential("database/creds/tickets-ro", token=bao_with_engines.bao.root_token)
        renewed = await engines_admin.renew_lease(cred.lease_id, increment=60)
        info = await engines_admin.lookup_lease(cred.lease_id)
        assert info is not None
        assert renewed.ttl == 60 and 55 <= info.ttl <= 60
        async with await psycopg.AsyncConnection.connect(bao_with_engines.pg.dsn()) as conn:
            cur = await conn.execute(
                "SELECT extract(epoch FROM rolvaliduntil - now()) FROM pg_roles WHERE rolname = %s",
                (cred.data["username"] if cred.data else "",),
            )
            row = await cur.fetchone()
        # PostgreSQL's VALID UNTIL follows the renewal too (lease expiry + a few seconds of slack).
        assert row is not None and row[0] is not None and 50 <= float(row[0]) <= 70
        await asyncio.to_thread(engines_setup.revoke_lease, cred.lease_id)

    async def test_measured_ttl_param_on_database_creds(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, bao_with_engines: BaoEngines
    ) -> None:
        """MEASURED (OpenBao 2.7.2): `?ttl=60` on database/creds is ignored (role default_ttl applies); POST answers 405."""
        root = bao_with_engines.bao.root_token
        by_query = await engines_admin.read_credential("database/creds/tickets-ro", token=root, data={"ttl": "60"})
        assert by_query.lease_duration == 600
        await asyncio.to_thread(engines_setup.revoke_lease, by_query.lease_id)
        with pytest.raises(VaultBadResponse) as info:
            await engines_admin.read_credential("database/creds/tickets-ro", token=root, method="POST", data={"ttl": 60})
        assert "405" in info.value.reason


class TestTaskTokenPattern:
    async def test_broker_token_can_create_task_tokens_only_through_its_role(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, session: aiohttp.ClientSession,
        bao_with_engines: BaoEngines,
    ) -> None:
        """A broker token that lacks the task policy creates an orphan task token via the role; it cannot read grants itself."""
        broker = await broker_client(engines_setup, session, bao_with_engines.bao.addr)
        task = await new_task_token(broker, task="t-own")
        assert task.orphan and task.policies == (TASK_POLICY,) and task.lease_duration == 300
        info = await broker.lookup_accessor(task.accessor)
        assert info is not None and info.meta["task"] == "t-own" and info.meta["tenant"] == "acme"
        assert info.policies == (TASK_POLICY,)
        with pytest.raises(VaultDenied):
            await broker.read_credential("database/creds/tickets-ro", token=await _broker_token(engines_setup))
        with pytest.raises(VaultBadResponse) as refused:  # outside the role's allowed_policies: 400, not 403
            await broker.create_token_from_role(
                TASK_ROLE, policies=["root"], ttl=60, explicit_max_ttl=60, meta={}, display_name="x"
            )
        assert "400" in refused.value.reason
        await broker.revoke_accessor(task.accessor)

    async def test_task_token_issues_and_revoke_accessor_kills_everything(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, session: aiohttp.ClientSession,
        bao_with_engines: BaoEngines,
    ) -> None:
        """Task token reads a cert and a DB login that works; revoke-accessor removes both leases and the login fails."""
        broker = await broker_client(engines_setup, session, bao_with_engines.bao.addr)
        task = await new_task_token(broker, task="t-flow")
        cert = await broker.read_credential(
            "pki/issue/agents", token=task.client_token, method="POST",
            data={"common_name": "agent-a", "uri_sans": "spiffe://example.org/agent/a", "ttl": "2m"},
        )
        db = await broker.read_credential("database/creds/tickets-ro", token=task.client_token)
        assert cert.lease_id and db.lease_id and db.data is not None
        username, password = db.data["username"], db.data["password"]
        assert await pg_login_works(bao_with_engines.pg, username, password)
        assert await pg_login_works(bao_with_engines.pg, username, password + "x") is False
        assert await broker.lookup_lease(cert.lease_id) is not None
        assert await broker.lookup_lease(db.lease_id) is not None

        await broker.revoke_accessor(task.accessor)

        # revoke-accessor returns before the token's leases are gone: confirm by polling.
        await eventually(lambda: broker.lookup_accessor(task.accessor), lambda r: r is None)
        await eventually(lambda: broker.lookup_lease(db.lease_id), lambda r: r is None)
        await eventually(lambda: broker.lookup_lease(cert.lease_id), lambda r: r is None)
        assert await pg_login_works(bao_with_engines.pg, username, password) is False
        with pytest.raises(VaultDenied):  # the task token itself is dead
            await broker.read_credential("database/creds/tickets-ro", token=task.client_token)

    async def test_revoke_unknown_accessor_returns_normally(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, session: aiohttp.ClientSession,
        bao_with_engines: BaoEngines,
    ) -> None:
        """revoke-accessor on an unknown accessor answers 200 with a warning: no exception; lookup gives None."""
        broker = await broker_client(engines_setup, session, bao_with_engines.bao.addr)
        await broker.revoke_accessor("AAAAAAAAAAAAAAAAAAAAAAAA")
        assert await broker.lookup_accessor("AAAAAAAAAAAAAAAAAAAAAAAA") is None

    async def test_child_token_role(
        self, engines_admin: VaultClient, engines_setup: VaultAdmin, bao_with_engines: BaoEngines
    ) -> None:
        """The devstack child-token role issues non-orphan tokens capped by its explicit max TTL."""
        child = await engines_admin.read_credential(
            f"auth/token/create/{bao_with_engines.child_role}", token=bao_with_engines.bao.root_token,
            method="POST", data={"ttl": "7200s"},
        )
        assert child.auth is not None and child.lease_id == "" and not child.auth.orphan
        assert child.auth.lease_duration <= 3600
        await engines_admin.revoke_accessor(child.auth.accessor)


async def _broker_token(setup: VaultAdmin) -> Sensitive:
    auth = await asyncio.to_thread(setup.create_token, policies=[BROKER_POLICY], ttl="5m")
    return auth.client_token
