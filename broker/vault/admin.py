"""The Vault / OpenBao admin client: set-up endpoints on hvac, typed answers, one error boundary.

``broker vault sync``, ``broker dev`` and the test fixtures write policies, token roles, mounts and
engine configuration through ``VaultAdmin``. The serving broker never does: its calls go through the
async ``VaultClient`` (``broker.vault.client``).

Rules this file keeps:

1. OFF the hot path. hvac is synchronous (``requests``) and costs about 1 ms of CPU per call, so nothing
   that serves a request imports this module; async callers run each call in a worker thread
   (``await asyncio.to_thread(admin.put_policy, ...)``). One ``VaultAdmin`` serves one thread at a time.
2. Every method names its endpoint in its docstring and returns ``None``, a typed value (``TokenRole``,
   ``VaultTokenAuth``, ``str``) or, for the generic ``read``/``write`` of set-up only, Vault's ``data``.
3. No hvac or ``requests`` exception leaves this module: ``_call`` is the one boundary, and maps them to
   the same ``VaultError`` subclasses as ``VaultClient`` (the status map is the client's
   ``_status_error``). ``tests/integration/test_vault_client.py`` checks that the maps are complete.
4. Tokens are ``Sensitive`` in and out; Vault's error strings go (scrubbed) to ``reason`` only.
5. Paths and names pass ``validate_path`` before hvac sees them (hvac only URL-escapes, which lets
   ``..`` through), and redirects are not followed (a standby's ``307`` would replay the token).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import hvac
import hvac.adapters
import hvac.exceptions
import requests

from broker.errors import VaultBadResponse, VaultError, VaultUnavailable
from broker.paths import validate_name, validate_path
from broker.vault.client import (
    Sensitive,
    VaultTokenAuth,
    _parse_auth,
    _scrub,
    _Shape,
    _status_error,
    transport_failure,
)

__all__ = ["TokenRole", "VaultAdmin", "hvac_error_class", "transport_error_class"]


@dataclass(frozen=True, slots=True)
class TokenRole:
    """The settings of a token role (``auth/token/roles/:name``) that the broker sets and compares.

    ``allowed_policies`` is a set: Vault may list them in any order. ``token_explicit_max_ttl`` is in
    seconds; it is what caps tokens of the role (OpenBao ignores ``token_ttl`` on roles).
    """

    allowed_policies: frozenset[str]
    orphan: bool
    renewable: bool
    token_type: str
    token_explicit_max_ttl: int
    token_no_default_policy: bool = False

    def to_wire(self) -> dict[str, Any]:
        """The JSON body of ``POST auth/token/roles/:name``."""
        return {
            "allowed_policies": sorted(self.allowed_policies),
            "orphan": self.orphan,
            "renewable": self.renewable,
            "token_type": self.token_type,
            "token_explicit_max_ttl": self.token_explicit_max_ttl,
            "token_no_default_policy": self.token_no_default_policy,
        }


# --------------------------------------------------------------------------------------------------
# The error boundary

# hvac raises one class per status it knows; the others (405, 412, 472, 473, 504...) are all
# UnexpectedError, so ``_Adapter`` keeps the real status on the exception and the map below is the
# fallback for an exception that lacks it.
_HVAC_STATUS: Final[Mapping[type[hvac.exceptions.VaultError], int]] = types.MappingProxyType({
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.UnsupportedOperation: 405,
    hvac.exceptions.PreconditionFailed: 412,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
})


def hvac_error_class(kind: type[hvac.exceptions.VaultError], status: int | None = None) -> type[VaultError]:
    """Which ``VaultError`` an hvac exception of class ``kind`` (answer status ``status``) becomes.

    A status-less ``UnexpectedError`` is ``VaultBadResponse``; ``ParamValidationError`` (hvac refused the
    arguments before any request) and the base class are a plain ``VaultError``.
    """
    if status is None:
        status = _HVAC_STATUS.get(kind)
    if status is not None:
        return type(_status_error(status, None, ""))
    if issubclass(kind, hvac.exceptions.UnexpectedError):
        return VaultBadResponse
    return VaultError


def transport_error_class(kind: type[BaseException]) -> type[VaultError]:
    """Which ``VaultError`` a ``requests`` failure of class ``kind`` becomes (as ``VaultClient`` maps aiohttp's).

    TLS failures and malformed URLs are configuration (or attack): ``VaultError``. Connection failures,
    timeouts and broken bodies are "retry later": ``VaultUnavailable``. A malformed or undecodable answer
    is ``VaultBadResponse``.
    """
    exc = requests.exceptions
    if issubclass(kind, (exc.SSLError, exc.InvalidURL, exc.MissingSchema, exc.InvalidSchema, exc.URLRequired,
                         exc.InvalidProxyURL)):
        return VaultError
    if issubclass(kind, (exc.ConnectionError, exc.Timeout, exc.ChunkedEncodingError)):
        return VaultUnavailable
    if issubclass(kind, (exc.ContentDecodingError, exc.InvalidJSONError, exc.InvalidHeader, exc.TooManyRedirects,
                         exc.HTTPError)):
        return VaultBadResponse
    return VaultError


def _hvac_error(exc: hvac.exceptions.VaultError, op: str) -> VaultError:
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = _HVAC_STATUS.get(type(exc))
    if status is None:
        cls = hvac_error_class(type(exc))
        detail = _scrub(", ".join(str(e) for e in exc.errors or ()))
        return cls(f"Vault request failed ({op})", reason=f"{op}: {type(exc).__name__}: {detail}")
    body = exc.json if isinstance(exc.json, dict) else {"errors": list(exc.errors or ())}
    return _status_error(status, body, op)


def _transport_error(exc: requests.exceptions.RequestException, op: str) -> VaultError:
    return transport_failure(transport_error_class(type(exc)), exc, op)


class _Adapter(hvac.adapters.JSONAdapter):  # type: ignore[misc]  # hvac is untyped
    """hvac's JSON adapter, keeping the answer's HTTP status on the exception it raises."""

    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> None:
        try:
            super()._raise_for_error(method, url, response)
        except hvac.exceptions.VaultError as exc:
            exc.status_code = response.status_code
            raise


def _shape_error(op: str, what: str) -> VaultBadResponse:
    return VaultBadResponse(f"unexpected answer from Vault to {op}", reason=f"{op}: bad or missing field {what}")


def _json_of(answer: Any, op: str) -> Mapping[str, Any]:
    """The JSON object hvac returned (a dict), else ``VaultBadResponse`` (204, non-JSON 200...)."""
    if isinstance(answer, dict):
        return answer
    msg = f"unexpected answer from Vault to {op}"
    status = answer.status_code if isinstance(answer, requests.Response) else "?"
    raise VaultBadResponse(msg, reason=f"{op}: HTTP {status}: expected a JSON object")


def _data_of(answer: Any) -> Mapping[str, Any] | None:
    if isinstance(answer, dict):
        d = answer.get("data")
        return d if isinstance(d, dict) else None
    return None


class _Absent:
    """The answer was a 404 and the caller said that means "none"."""


_ABSENT: Final = _Absent()


# --------------------------------------------------------------------------------------------------


class VaultAdmin:
    """Synchronous admin client (hvac) for set-up: policies, token roles, tokens, mounts, engine config.

    Never on the hot path (see the rules above). Close it (or use it as a context manager) to release
    its HTTP connections.

    Every method raises:
        VaultUnavailable: Vault cannot be reached, timed out, is sealed, is a standby, or redirected.
        VaultDenied: HTTP 403 (missing capability, or an invalid/expired token).
        VaultBadResponse: any other unexpected status, a non-JSON body or a missing/mistyped field.
        VaultError: a configuration problem (invalid URL, TLS failure, arguments hvac refused).
        BadRequest: a path or name argument failed ``validate_path``; raised before any request.
    """

    def __init__(
        self, addr: str, *, token: str | Sensitive, timeout: float = 30.0, namespace: str | None = None,
        ca_cert: Path | None = None,
    ) -> None:
        checked_namespace = validate_path(namespace) if namespace else None
        session = requests.Session()
        # Configuration comes in as arguments, never from the environment (as for VaultClient): no proxy or
        # .netrc credentials (trust_env), and hvac's own VAULT_CACERT/VAULT_CAPATH/VAULT_CLIENT_CERT look-ups
        # are overridden by an explicit ``verify`` and an empty ``cert``.
        session.trust_env = False
        # On the session too: hvac takes a given session's ``verify`` over its own argument.
        session.verify = str(ca_cert) if ca_cert is not None else True  # [vault].ca_cert, as the serving broker
        self._addr = addr.rstrip("/")
        self._session = session
        self._hvac = hvac.Client(
            url=self._addr,
            token=token.reveal() if isinstance(token, Sensitive) else token,
            timeout=timeout,
            verify=session.verify,
            cert=(),
            proxies={},
            allow_redirects=False,
            session=session,
            adapter=_Adapter,
            namespace=checked_namespace,
        )

    def __repr__(self) -> str:
        return f"VaultAdmin(addr={self._addr!r})"

    def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the one boundary ------------------------------------------------------------------------

    def _call(self, op: str, fn: Callable[..., Any], /, *args: Any, absent_ok: bool = False, **kwargs: Any) -> Any:
        """Call one hvac method; return its answer (``_ABSENT`` for a 404 when ``absent_ok``).

        A redirect (hvac hands back the 3xx ``Response`` since redirects are not followed) is
        ``VaultUnavailable``, as in ``VaultClient``.
        """
        try:
            answer = fn(*args, **kwargs)
        except hvac.exceptions.InvalidPath as exc:
            if absent_ok:
                return _ABSENT
            raise _hvac_error(exc, op) from exc
        except hvac.exceptions.VaultError as exc:
            raise _hvac_error(exc, op) from exc
        except requests.exceptions.RequestException as exc:
            raise _transport_error(exc, op) from exc
        if isinstance(answer, requests.Response) and 300 <= answer.status_code < 400:
            raise _status_error(answer.status_code, None, op)
        return answer

    # -- policies ----------------------------------------------------------------------------------

    def put_policy(self, name: str, hcl: str) -> None:
        """PUT /v1/sys/policies/acl/:name -- create or replace an ACL policy."""
        self._call("write policy", self._hvac.sys.create_or_update_acl_policy, name=validate_name(name), policy=hcl)

    def read_policy(self, name: str) -> str | None:
        """GET /v1/sys/policies/acl/:name -- the policy's HCL; ``None`` when there is none."""
        op = "read policy"
        answer = self._call(op, self._hvac.sys.read_acl_policy, validate_name(name), absent_ok=True)
        if answer is _ABSENT:
            return None
        policy = (_data_of(_json_of(answer, op)) or {}).get("policy")
        if not isinstance(policy, str):
            raise _shape_error(op, "policy")
        return policy

    # -- token roles and tokens ----------------------------------------------------------------------

    def put_token_role(self, name: str, role: TokenRole) -> None:
        """POST /v1/auth/token/roles/:name -- create or replace a token role.

        Sent as one JSON body: hvac's ``create_or_update_role`` has no ``token_type`` nor
        ``token_no_default_policy``, and a role must be written whole.
        """
        path = "auth/token/roles/" + validate_name(name)
        self._call("write token role", self._hvac.write_data, path, data=role.to_wire())

    def read_token_role(self, name: str) -> TokenRole | None:
        """GET /v1/auth/token/roles/:name -- the role's settings; ``None`` when there is none."""
        op = "read token role"
        answer = self._call(op, self._hvac.auth.token.read_role, validate_name(name), absent_ok=True)
        if answer is _ABSENT:
            return None
        d = _data_of(_json_of(answer, op))
        if d is None:
            raise _shape_error(op, "data")
        policies = d.get("allowed_policies") or []
        ttl = d.get("token_explicit_max_ttl", 0)
        fields = {k: d.get(k, False) for k in ("orphan", "renewable", "token_no_default_policy")}
        token_type = d.get("token_type", "")
        if not (isinstance(policies, list) and all(isinstance(p, str) for p in policies)):
            raise _shape_error(op, "allowed_policies")
        if isinstance(ttl, bool) or not isinstance(ttl, int):
            raise _shape_error(op, "token_explicit_max_ttl")
        for key, value in fields.items():
            if not isinstance(value, bool):
                raise _shape_error(op, key)
        if not isinstance(token_type, str):
            raise _shape_error(op, "token_type")
        return TokenRole(allowed_policies=frozenset(policies), token_type=token_type, token_explicit_max_ttl=ttl,
                         orphan=fields["orphan"], renewable=fields["renewable"],
                         token_no_default_policy=fields["token_no_default_policy"])

    def create_token(
        self,
        *,
        policies: Sequence[str],
        ttl: str | None = None,
        period: str | None = None,
        no_parent: bool = False,
        display_name: str = "",
        meta: Mapping[str, str] | None = None,
    ) -> VaultTokenAuth:
        """POST /v1/auth/token/create -- a token for the broker itself (``no_parent`` needs root/sudo).

        HTTP 500 may mean the token was created (OpenBao can fail on the response's audit record after
        creating it).
        """
        op = "create token"
        kwargs: dict[str, Any] = {"policies": list(policies), "no_parent": no_parent, "ttl": ttl, "period": period,
                                  "meta": dict(meta) if meta else None}
        if display_name:
            kwargs["display_name"] = display_name
        answer = _json_of(self._call(op, self._hvac.auth.token.create, **kwargs), op)
        auth = answer.get("auth")
        if not isinstance(auth, dict):
            raise _shape_error(op, "auth")
        try:
            return _parse_auth(auth)
        except _Shape as exc:
            raise _shape_error(op, str(exc)) from exc

    # -- mounts and leases ---------------------------------------------------------------------------

    def enable_secrets_engine(self, path: str, type_: str, *, config: Mapping[str, Any] | None = None,
                              options: Mapping[str, str] | None = None) -> None:
        """POST /v1/sys/mounts/:path -- mount a secrets engine; idempotent when the same type is there.

        Raises:
            VaultBadResponse: the path is in use by an engine of another type (besides the usual errors).
        """
        op = "enable secrets engine"
        path = validate_path(path)
        try:
            self._call(op, self._hvac.sys.enable_secrets_engine, type_, path=path,
                       config=dict(config) if config else None, options=dict(options) if options else None)
            return
        except VaultBadResponse as exc:
            if "already in use" not in exc.reason:
                raise
        mounts = _data_of(_json_of(self._call("read secrets engines", self._hvac.sys.list_mounted_secrets_engines),
                                   "read secrets engines")) or {}
        found = (mounts.get(path + "/") or {}).get("type")
        if found == type_:
            return
        msg = f"unexpected answer from Vault to {op}"
        raise VaultBadResponse(msg, reason=f"{op}: {path} already mounted with type {found!r}, wanted {type_!r}")

    def revoke_lease(self, lease_id: str) -> None:
        """PUT /v1/sys/leases/revoke -- revoke one lease, synchronously (the PostgreSQL role is gone on return)."""
        self._call("revoke lease", self._hvac.sys.revoke_lease, lease_id)

    def list_keys(self, path: str) -> list[str]:
        """LIST /v1/:path -- the keys one level below ``path`` (empty on 404, which is how Vault says "none")."""
        answer = self._call("list", self._hvac.list, validate_path(path.rstrip("/")))
        keys = (_data_of(answer) or {}).get("keys") or []
        return [str(k) for k in keys]

    # -- PKI ---------------------------------------------------------------------------------------

    def pki_default_issuer(self, mount: str) -> str | None:
        """GET /v1/:mount/config/issuers -- the default issuer's id; ``None`` while there is none."""
        op = "read pki issuers"
        answer = self._call(op, self._hvac.read, validate_path(mount) + "/config/issuers")
        default = (_data_of(answer) or {}).get("default")
        return default if isinstance(default, str) and default else None

    def pki_generate_root(self, mount: str, *, common_name: str, ttl: str, key_type: str, key_bits: int) -> None:
        """POST /v1/:mount/root/generate/internal -- a self-signed root CA whose key never leaves Vault."""
        self._call("generate pki root", self._hvac.secrets.pki.generate_root, "internal", common_name,
                   extra_params={"ttl": ttl, "key_type": key_type, "key_bits": key_bits},
                   mount_point=validate_path(mount))

    def pki_put_role(self, mount: str, name: str, settings: Mapping[str, Any]) -> None:
        """POST /v1/:mount/roles/:name -- create or replace a PKI role (``settings`` as Vault documents them)."""
        self._call("write pki role", self._hvac.secrets.pki.create_or_update_role, validate_name(name),
                   extra_params=dict(settings), mount_point=validate_path(mount))

    # -- database ------------------------------------------------------------------------------------

    def database_configure(
        self,
        mount: str,
        name: str,
        *,
        plugin_name: str,
        connection_url: str,
        username: str,
        password: Sensitive,
        allowed_roles: Sequence[str],
        verify_connection: bool = True,
        **plugin_settings: Any,
    ) -> None:
        """POST /v1/:mount/config/:name -- a database connection (plugin-specific settings as keywords)."""
        self._call("configure database", self._hvac.secrets.database.configure, validate_name(name), plugin_name,
                   verify_connection=verify_connection, allowed_roles=list(allowed_roles),
                   mount_point=validate_path(mount), connection_url=connection_url, username=username,
                   password=password.reveal(), **plugin_settings)

    def database_put_role(
        self,
        mount: str,
        name: str,
        *,
        db_name: str,
        creation_statements: Sequence[str],
        revocation_statements: Sequence[str],
        default_ttl: str,
        max_ttl: str,
    ) -> None:
        """POST /v1/:mount/roles/:name -- create or replace a dynamic database role."""
        self._call("write database role", self._hvac.secrets.database.create_role, validate_name(name), db_name,
                   list(creation_statements), default_ttl=default_ttl, max_ttl=max_ttl,
                   revocation_statements=list(revocation_statements), mount_point=validate_path(mount))

    # -- audited request headers -----------------------------------------------------------------------

    def audit_request_header(self, name: str) -> bool | None:
        """GET /v1/sys/config/auditing/request-headers/:name -- its ``hmac`` setting; None when not audited.

        OpenBao answers an unknown header with 400 "Could not find header in config", not 404.
        """
        op = "read audited request header"
        try:
            answer = self._hvac.read("sys/config/auditing/request-headers/" + validate_name(name))
        except hvac.exceptions.InvalidRequest as exc:
            if "could not find header" in str(exc).lower():
                return None
            raise _hvac_error(exc, op) from exc
        except hvac.exceptions.VaultError as exc:
            raise _hvac_error(exc, op) from exc
        except requests.exceptions.RequestException as exc:
            raise _transport_error(exc, op) from exc
        data = _data_of(_json_of(answer, op)) if answer is not None else None
        entry = data.get(name) if data is not None else None
        if not isinstance(entry, Mapping):
            return None
        return bool(entry.get("hmac", False))

    def put_audit_request_header(self, name: str, *, hmac: bool) -> None:
        """PUT /v1/sys/config/auditing/request-headers/:name -- audit the header (needs ``sudo``)."""
        self._call("audit request header", self._hvac.write_data,
                   "sys/config/auditing/request-headers/" + validate_name(name), data={"hmac": hmac})

    # -- generic (set-up and tests only) ---------------------------------------------------------------

    def write(self, path: str, data: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """POST /v1/:path -- generic write for set-up; the answer's ``data`` (``None`` on 204)."""
        return _data_of(self._call("write", self._hvac.write_data, validate_path(path), data=dict(data)))

    def read(self, path: str) -> Mapping[str, Any] | None:
        """GET /v1/:path -- generic read for set-up; the answer's ``data``, ``None`` on 404."""
        op = "read"
        answer = self._call(op, self._hvac.read, validate_path(path))
        if answer is None:  # hvac's read answers a 404 with None
            return None
        return _data_of(_json_of(answer, op))
