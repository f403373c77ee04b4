"""Use a credential without handing it over: open a connection or a session to a grant's endpoint with it.

``broker mcp``'s tools and the SDK's helpers (``TaskSession.postgres`` and friends) both open what they
use here, so the two cannot drift apart. The caller gets a connection, never the password.

Rules this file keeps:
- Where to connect comes from the catalog (``broker.endpoints.Endpoint``), never from the caller.
- Secrets go to the driver as separate arguments, never spliced into a DSN or URL that a driver or a log
  line might repeat.
- A driver's error leaves as ``UpstreamFailed`` with the driver's class name and message, both passed
  through ``Redactor``: drivers quote what they were given, and some of it may be the credential.
- An HTTP session sends its credential only to the allow-listed hosts, on every request and every
  redirect (an aiohttp client middleware), and refuses any other host before connecting.
- A private key never touches a file system: the TLS context loads it from an anonymous memory file.
- Drivers other than psycopg (a core dependency) are imported when first used: they come with the
  ``mcp`` extra.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import yarl

from broker.endpoints import Endpoint, HostAllowList
from broker.errors import HostNotAllowed, UpstreamFailed

if TYPE_CHECKING:
    import psycopg
    import redis.asyncio

__all__ = ["Redactor", "http_session", "mysql", "postgres", "redis_client", "secrets_of"]

# The credential fields that are secrets (what a tool must never show); the username, policies and TTL
# are not. Everything a PKI issue returns but the key is public.
_SECRET_FIELDS: Final = ("password", "token", "private_key", "secret_key", "secret_id", "client_token", "key")
_REDACTED: Final = "[redacted]"


def secrets_of(data: Mapping[str, Any]) -> list[str]:
    """The secret strings of a credential payload (``CredentialOut.data``)."""
    return [str(data[k]) for k in _SECRET_FIELDS if isinstance(data.get(k), str) and data[k]]


class Redactor:
    """Replaces every secret it was told about, and its usual encodings, wherever it appears in text.

    Defence in depth: tools never put a credential in a result on purpose, but a server may echo one back
    (OpenBao's ``lookup-self`` answers with the token itself, a debug endpoint with the header).
    """

    def __init__(self) -> None:
        self._forms: set[str] = set()

    def add(self, *secrets: str) -> None:
        for secret in secrets:
            if len(secret) < 6:
                continue  # too short to be a credential; redacting it would shred ordinary text
            raw = secret.encode()
            self._forms.update({
                secret, urllib.parse.quote(secret, safe=""), base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="), binascii.hexlify(raw).decode(),
            })
            if "\n" in secret:  # a PEM key: each line of it, in case a body is re-wrapped
                self._forms.update(line for line in secret.splitlines() if len(line) >= 16 and "-----" not in line)

    def clear(self) -> None:
        self._forms.clear()

    def text(self, value: str) -> str:
        # Longest first, so a secret that contains another is replaced whole.
        for form in sorted(self._forms, key=len, reverse=True):
            if form in value:
                value = value.replace(form, _REDACTED)
        return value

    def value(self, value: Any) -> Any:
        """``value`` with every string in it (keys too) redacted: a tool result before it leaves."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


def upstream_error(exc: BaseException, redactor: Redactor, *, what: str) -> UpstreamFailed:
    """The one translation of a driver's exception: class name and first line of its message, redacted."""
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    detail = redactor.text(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
    return UpstreamFailed(f"{what} failed: {detail}")


async def postgres(endpoint: Endpoint, data: Mapping[str, Any], *, timeout: float,
                   statement_timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
    """A PostgreSQL connection as the credential's user (``username``/``password`` of a database grant).

    ``statement_timeout`` (seconds) is set for the session on the server, so a runaway query ends there.

    Raises:
        UpstreamFailed: the connection failed.
    """
    import psycopg

    options = f"-c statement_timeout={int(statement_timeout * 1000)}" if statement_timeout else None
    try:
        return await psycopg.AsyncConnection.connect(
            host=endpoint.host, port=endpoint.port, dbname=endpoint.database, user=str(data.get("username", "")),
            password=str(data.get("password", "")), connect_timeout=max(1, int(timeout)), options=options,
            autocommit=True, application_name="broker-mcp")
    except psycopg.Error as exc:
        raise upstream_error(exc, _redactor_for(data), what="connecting to PostgreSQL") from None


async def mysql(endpoint: Endpoint, data: Mapping[str, Any], *, timeout: float) -> Any:
    """An ``aiomysql`` connection (unbuffered cursors available) as the credential's user.

    Raises:
        UpstreamFailed: the connection failed.
    """
    import aiomysql
    import pymysql

    try:
        return await aiomysql.connect(host=endpoint.host, port=endpoint.port, db=endpoint.database,
                                      user=str(data.get("username", "")), password=str(data.get("password", "")),
                                      connect_timeout=timeout, autocommit=True, program_name="broker-mcp")
    except (pymysql.MySQLError, OSError) as exc:
        raise upstream_error(exc, _redactor_for(data), what="connecting to MySQL") from None


def redis_client(endpoint: Endpoint, data: Mapping[str, Any], *, timeout: float) -> redis.asyncio.Redis:
    """A Redis client (it connects on first use) as the credential's ACL user."""
    import redis.asyncio

    return redis.asyncio.Redis(host=endpoint.host, port=endpoint.port, db=int(endpoint.database or 0),
                               username=str(data.get("username", "")) or None,
                               password=str(data.get("password", "")) or None, ssl=endpoint.tls,
                               socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False)
    # No client_name: CLIENT SETNAME is a command the grant's ACL need not allow.


def _redactor_for(data: Mapping[str, Any]) -> Redactor:
    r = Redactor()
    r.add(*secrets_of(data))
    return r


def http_session(endpoint: Endpoint, allowed: HostAllowList, data: Mapping[str, Any], *, http_auth: str | None,
                 timeout: float, ca_file: str | None = None) -> aiohttp.ClientSession:
    """An ``aiohttp`` session whose requests carry the credential, to the allow-listed hosts only.

    A relative URL is joined to the endpoint. ``http_auth`` says how the credential travels: ``bearer``
    (``Authorization: Bearer``), ``vault-token`` (``X-Vault-Token``) or ``client-certificate`` (TLS);
    ``None`` picks by the credential: a certificate as itself, a token as bearer.

    Raises:
        UpstreamFailed: the credential has nothing this ``http_auth`` can carry.
    """
    auth = http_auth or ("client-certificate" if "private_key" in data else "bearer")
    context = ssl.create_default_context(cafile=ca_file)
    headers: dict[str, str] = {}
    if auth == "client-certificate":
        if not isinstance(data.get("certificate"), str) or not isinstance(data.get("private_key"), str):
            raise UpstreamFailed("this grant's credential holds no client certificate")
        _load_client_certificate(context, data["certificate"], data["private_key"],
                                 [str(c) for c in data.get("ca_chain") or []])
    else:
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise UpstreamFailed("this grant's credential holds no token")
        headers = {"X-Vault-Token": token} if auth == "vault-token" else {"Authorization": f"Bearer {token}"}

    async def only_allowed(request: aiohttp.ClientRequest,
                           handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        host = request.url.host or ""
        if not allowed.allows(host) or (request.url.scheme == "http" and endpoint.scheme != "http"):
            msg = f"this grant's credential may not be sent to {host or 'that URL'}"
            raise HostNotAllowed(msg)
        for name, value in headers.items():
            request.headers[name] = value
        return await handler(request)

    return aiohttp.ClientSession(base_url=yarl.URL(endpoint.base_url), middlewares=(only_allowed,),
                                 connector=aiohttp.TCPConnector(ssl=context if endpoint.tls else False),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


def _load_client_certificate(context: ssl.SSLContext, certificate: str, private_key: str,
                             chain: Iterable[str]) -> None:
    """Load a certificate and its key into ``context`` from anonymous memory, never from a file on disk."""
    pem = "\n".join([certificate.strip(), *(c.strip() for c in chain if c.strip() != certificate.strip())]) + "\n"
    with _memory_file(pem + private_key.strip() + "\n") as path:
        context.load_cert_chain(path)


@contextlib.contextmanager
def _memory_file(text: str) -> Iterator[str]:
    """A path to ``text`` in an anonymous memory file (Linux ``memfd``), closed on leaving the block."""
    if not hasattr(os, "memfd_create"):
        raise UpstreamFailed("client certificates need Linux memfd_create (a key is never written to disk)")
    fd = os.memfd_create("broker-client-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, text.encode())
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
