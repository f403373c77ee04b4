"""Grant types as data: one declared adapter per secrets engine. Pure: no I/O.

An adapter says, for one kind of Vault endpoint, everything the broker needs to hand out what it
answers: the path's shape, the HTTP method, whether Vault takes a TTL, which request field (if any) the
agent may supply, how to read the credential, its lifetime and its id out of Vault's answer, how its end
is confirmed, and its **revocation class**:

* ``revocable``: a Vault lease or a child token. Revoking the task token revokes it; Vault confirms.
* ``expiry-only``: a certificate (SSH). Nothing in Vault can pull it back: it lives at most its TTL,
  which the broker caps at the task's end like any other.
* ``static``: a value read from KV. The broker can stop handing it out, nothing more: it stays valid
  until someone rotates it. A grant must say ``allow_static = true`` to hand one out.

Rules this file keeps:
1. Adding an engine is adding an ``Engine`` to ``ENGINES``; ``broker.leases`` and
   ``broker.revocations`` never branch on an engine or a lease kind, they call the adapter.
2. A grant's engine is named in its configuration (``engine = "ssh"``) or inferred from its path: the
   first adapter whose shape matches and whose ``mounts`` (if it lists any) contain the path's mount.
   A path no adapter claims falls back to ``dynamic`` (today's rule: a lease or a token, else refused).
3. The agent chooses nothing but what ``agent_inputs`` names (the SSH public key to sign), only where
   the grant's own ``params`` leave it open, and only after it is parsed and checked (``broker.sshkeys``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from broker.errors import BadRequest, ConfigError, VaultBadResponse
from broker.sshkeys import certificate_validity

__all__ = [
    "ENGINES", "Engine", "Reading", "Revocation", "SecretAnswer", "engine_for_kind", "engine_named", "infer_engine",
    "revocation_of_kind",
]

Revocation = Literal["revocable", "expiry-only", "static"]
Confirm = Literal["lease", "accessor", "expiry", "never"]


class _TokenAuth(Protocol):
    @property
    def accessor(self) -> str: ...
    @property
    def lease_duration(self) -> int: ...
    @property
    def policies(self) -> tuple[str, ...]: ...
    @property
    def client_token(self) -> Any: ...  # broker.vault.Sensitive: ``.reveal()``


class SecretAnswer(Protocol):
    """What an adapter reads of Vault's answer (``broker.vault.VaultSecret`` is one)."""

    @property
    def lease_id(self) -> str: ...
    @property
    def lease_duration(self) -> int: ...
    @property
    def renewable(self) -> bool: ...
    @property
    def data(self) -> Mapping[str, Any] | None: ...
    @property
    def auth(self) -> _TokenAuth | None: ...


@dataclass(frozen=True)
class Reading:
    """What the broker keeps of one answer: the lease kind, Vault's id for it, its lifetime, the credential.

    ``vault_id`` is a Vault lease id, a token accessor, a certificate serial or a KV path and version:
    never the secret. ``duration`` is ``None`` where Vault gives the value no lifetime (KV): the broker
    then tracks it to its task's end, when the end releases it. ``data`` goes to the agent, never to a log.
    """

    kind: str
    vault_id: str
    duration: int | None
    renewable: bool
    data: Mapping[str, Any]

    def __repr__(self) -> str:
        return f"Reading(kind={self.kind!r}, vault_id={self.vault_id!r}, duration={self.duration}, data=<redacted>)"


Reader = Callable[[SecretAnswer, str, float], Reading]


@dataclass(frozen=True)
class Engine:
    """One grant type. ``read(answer, path, now)`` raises ``VaultBadResponse`` for an answer it cannot use."""

    name: str
    summary: str
    shape: re.Pattern[str]
    mounts: tuple[str, ...] | None
    method: Literal["GET", "POST"] | None  # None: the grant's config decides (dynamic)
    revocation: Revocation
    kind: str  # the lease row's kind; at most 8 characters (the store's column)
    confirm: Confirm  # how its end is confirmed: a lease or accessor lookup, its expiry, or never
    ttl_param: bool  # whether the request carries the capped TTL
    read: Reader
    agent_inputs: frozenset[str] = frozenset()

    def matches(self, path: str) -> bool:
        return self.shape.fullmatch(path) is not None


# -- readers ---------------------------------------------------------------------------------------------


def _read_lease(answer: SecretAnswer, path: str, now: float) -> Reading:
    del now
    if not answer.lease_id:
        msg = "the grant's Vault path returned no lease"
        raise VaultBadResponse(msg, reason=f"{path} returned no lease (a PKI role needs generate_lease=true)")
    return Reading("lease", answer.lease_id, answer.lease_duration, answer.renewable, dict(answer.data or {}))


def _read_token(answer: SecretAnswer, path: str, now: float) -> Reading:
    del now
    auth = answer.auth
    if auth is None:
        msg = "the grant's Vault path returned no token"
        raise VaultBadResponse(msg, reason=f"{path} returned no auth block")
    data = {"token": auth.client_token.reveal(), "policies": list(auth.policies), "ttl": auth.lease_duration}
    return Reading("token", auth.accessor, auth.lease_duration, False, data)


def _read_dynamic(answer: SecretAnswer, path: str, now: float) -> Reading:
    if answer.auth is not None:
        return _read_token(answer, path, now)
    if answer.lease_id:
        return _read_lease(answer, path, now)
    # Nothing to revoke: an engine the broker has no adapter for must hand out leases or tokens.
    msg = "the grant's Vault path returned no lease"
    raise VaultBadResponse(msg, reason=f"{path} returned no lease or token")


def _read_ssh_certificate(answer: SecretAnswer, path: str, now: float) -> Reading:
    data = answer.data or {}
    signed, serial = data.get("signed_key"), data.get("serial_number")
    if not isinstance(signed, str) or not isinstance(serial, str) or not serial:
        msg = "unexpected answer from Vault to an SSH signing request"
        raise VaultBadResponse(msg, reason=f"{path}: no signed_key or serial_number")
    try:
        _after, before = certificate_validity(signed)
    except BadRequest as exc:
        msg = "unexpected answer from Vault to an SSH signing request"
        raise VaultBadResponse(msg, reason=f"{path}: {exc.reason}") from exc
    # The certificate's own end is what bounds it: no lease exists to revoke.
    return Reading("cert", f"ssh-serial:{serial}", max(0, int(before - now)), False,
                   {"signed_key": signed, "serial_number": serial})


def _read_kv(answer: SecretAnswer, path: str, now: float) -> Reading:
    del now
    body = answer.data or {}
    values, meta = body.get("data"), body.get("metadata")
    if not isinstance(values, dict) or not isinstance(meta, dict):
        msg = "unexpected answer from Vault to a KV read"
        raise VaultBadResponse(msg, reason=f"{path}: no data/metadata (is it a KV version 2 mount?)")
    version = meta.get("version")
    return Reading("static", f"{path}@v{version}", None, False, dict(values))


# -- the adapters --------------------------------------------------------------------------------------

_ANY_MOUNT: Final = r"[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*?"

TOKEN = Engine(
    name="token", summary="a child token of the task token (auth/token/create/<role>)",
    shape=re.compile(r"auth/token/create(?:/[A-Za-z0-9_.\-]+)?"), mounts=None, method="POST",
    revocation="revocable", kind="token", confirm="accessor", ttl_param=True, read=_read_token,
)
SSH = Engine(
    name="ssh", summary="an SSH certificate signed by OpenBao's SSH CA (ssh/sign/<role>)",
    shape=re.compile(_ANY_MOUNT + r"/sign/[A-Za-z0-9_.\-]+"), mounts=("ssh",), method="POST",
    revocation="expiry-only", kind="cert", confirm="expiry", ttl_param=True, read=_read_ssh_certificate,
    agent_inputs=frozenset({"public_key"}),
)
RABBITMQ = Engine(
    name="rabbitmq", summary="a RabbitMQ user with a lease (rabbitmq/creds/<role>)",
    shape=re.compile(_ANY_MOUNT + r"/creds/[A-Za-z0-9_.\-]+"), mounts=("rabbitmq",), method="GET",
    revocation="revocable", kind="lease", confirm="lease", ttl_param=False, read=_read_lease,
)
DATABASE = Engine(
    name="database",
    summary="a database login with a lease: PostgreSQL, MySQL/MariaDB, Redis... (database/creds/<role>)",
    shape=re.compile(_ANY_MOUNT + r"/creds/[A-Za-z0-9_.\-]+"), mounts=None, method="GET",
    revocation="revocable", kind="lease", confirm="lease", ttl_param=False, read=_read_lease,
)
PKI = Engine(
    name="pki", summary="an X.509 certificate with a lease (pki/issue/<role>, generate_lease=true)",
    shape=re.compile(_ANY_MOUNT + r"/issue/[A-Za-z0-9_.\-]+"), mounts=None, method="POST",
    revocation="revocable", kind="lease", confirm="lease", ttl_param=True, read=_read_lease,
)
KV = Engine(
    name="kv", summary="a KV version 2 secret's current value (secret/data/<path>)",
    shape=re.compile(_ANY_MOUNT + r"/data/[A-Za-z0-9_.\-/]+"), mounts=None, method="GET",
    revocation="static", kind="static", confirm="never", ttl_param=False, read=_read_kv,
)
DYNAMIC = Engine(
    name="dynamic", summary="any other path that answers with a lease or a token",
    shape=re.compile(r".+"), mounts=None, method=None,
    revocation="revocable", kind="lease", confirm="lease", ttl_param=True, read=_read_dynamic,
)

# Inference order: the narrower claims first (named mounts), the catch-all last.
ENGINES: Final[tuple[Engine, ...]] = (TOKEN, SSH, RABBITMQ, DATABASE, PKI, KV, DYNAMIC)
_BY_NAME: Final[Mapping[str, Engine]] = {e.name: e for e in ENGINES}
# How each lease kind's end is confirmed, and its class: what a stored lease row needs, whatever the catalog
# says today. ``dynamic`` leases and tokens are confirmed as ``database``'s and ``token``'s are.
_BY_KIND: Final[Mapping[str, Engine]] = {"lease": DATABASE, "token": TOKEN, "cert": SSH, "static": KV}


def engine_named(name: str) -> Engine:
    """Raises: ConfigError: no such engine."""
    engine = _BY_NAME.get(name)
    if engine is None:
        msg = f"unknown engine {name!r} (known: {', '.join(sorted(_BY_NAME))})"
        raise ConfigError(msg)
    return engine


def infer_engine(path: str, named: str | None = None) -> Engine:
    """The adapter for a grant's ``path``: the one ``named`` in its config, else the first that claims it.

    Raises:
        ConfigError: ``named`` is unknown, or its shape does not match ``path``.
    """
    if named is not None:
        engine = engine_named(named)
        if not engine.matches(path):
            msg = f"path {path!r} is not the shape of a {engine.name} grant ({engine.summary})"
            raise ConfigError(msg)
        return engine
    mount = path.split("/", 1)[0]
    for engine in ENGINES:
        if engine.matches(path) and (engine.mounts is None or mount in engine.mounts):
            return engine
    return DYNAMIC


def engine_for_kind(kind: str) -> Engine:
    """The adapter that confirms the end of a stored lease of ``kind`` (unknown kinds: as Vault leases)."""
    return _BY_KIND.get(kind, DATABASE)


def revocation_of_kind(kind: str) -> Revocation:
    """How a stored lease of ``kind`` ends: ``revocable``, ``expiry-only`` or ``static``."""
    return engine_for_kind(kind).revocation
