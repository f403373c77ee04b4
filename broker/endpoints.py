"""Where a grant's credential is used: the catalog's ``endpoint`` and ``allowed_hosts``, parsed. Pure.

``broker mcp`` and the SDK's "use, don't hold" helpers connect to the server a grant names, with the
credential the broker issues for it; the model or the agent's code never chooses where a credential goes.

Rules this file keeps:
1. An endpoint never carries a credential: a ``user:password@`` part, a query string (``?password=``,
   ``?sslkey=``) or a fragment is refused, so the catalog (which operators read, diff and commit) holds none.
2. The scheme says what the credential is used for, and only these are known: ``postgresql`` (or
   ``postgres``), ``mysql``, ``redis`` / ``rediss``, ``https``. ``http`` is refused except for a loopback host,
   where the request never leaves the machine (a dev OpenBao, a test target): a token in clear text on a
   network is a token given away.
3. An HTTP grant's credential goes only to the hosts its allow-list names: exact names, or ``*.suffix``
   for any name below ``suffix`` (never ``suffix`` itself). Without a list, only the endpoint's own host.
   Hosts compare in lower case, without a trailing dot; an IP address is matched literally.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Endpoint", "EndpointKind", "HostAllowList", "is_loopback"]

EndpointKind = Literal["postgresql", "mysql", "redis", "http"]

_KINDS: Final[dict[str, EndpointKind]] = {
    "postgresql": "postgresql", "postgres": "postgresql", "mysql": "mysql", "redis": "redis", "rediss": "redis",
    "https": "http", "http": "http",
}
_DEFAULT_PORTS: Final = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "redis": 6379, "rediss": 6379,
                         "https": 443, "http": 80}
_LABEL: Final = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST: Final = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_DB: Final = re.compile(r"^[A-Za-z0-9_$.-]{1,63}$")
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, lower case) stays on this machine."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host(text: str) -> str:
    """A host name or an IP address, lower case, without a trailing dot; ValueError otherwise."""
    host = text.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii() or _HOST.fullmatch(host) is None:
        msg = "not a host name or an IP address"
        raise ValueError(msg)
    return host


@dataclass(frozen=True)
class Endpoint:
    """A parsed ``endpoint``: what kind of server, where, and (for a database) which database.

    Built only by ``parse``, so a value of this type has passed every rule above.
    """

    scheme: str
    kind: EndpointKind
    host: str
    port: int
    database: str | None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Raises: ValueError: an unknown scheme, a credential or query in the URL, a bad host, port or path."""
        if not isinstance(text, str) or len(text) > 512:
            msg = "an endpoint is a URL of at most 512 characters"
            raise ValueError(msg)
        try:
            url = urllib.parse.urlsplit(text.strip())
            port = url.port
        except ValueError as exc:
            msg = "not a URL with a valid port"
            raise ValueError(msg) from exc
        scheme = url.scheme.lower()
        kind = _KINDS.get(scheme)
        if kind is None:
            msg = f"endpoint scheme must be one of {', '.join(sorted(_KINDS))}"
            raise ValueError(msg)
        if url.username is not None or url.password is not None or "@" in url.netloc:
            # The value is not repeated: it may hold the very password it must not hold.
            msg = "an endpoint must not carry credentials (no user:password@): the broker issues them"
            raise ValueError(msg)
        if url.query or url.fragment or "?" in text or "#" in text:
            msg = "an endpoint takes no query or fragment (they can carry credentials)"
            raise ValueError(msg)
        host = _host(url.hostname or "")
        if scheme == "http" and not is_loopback(host):
            msg = "http:// sends the credential in clear text: use https://, or http:// only to a loopback host"
            raise ValueError(msg)
        database = _database(kind, url.path)
        return cls(scheme=scheme, kind=kind, host=host, port=port or _DEFAULT_PORTS[scheme], database=database)

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "rediss")

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` (IPv6 in brackets): the URL an HTTP request path is joined to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.base_url + (f"/{self.database}" if self.database is not None else "")


def _database(kind: EndpointKind, path: str) -> str | None:
    name = path.lstrip("/")
    if kind == "http":
        if name:
            msg = "an https endpoint is scheme://host[:port]; the path goes in each request"
            raise ValueError(msg)
        return None
    if not name:
        if kind == "redis":
            return None
        msg = f"a {kind} endpoint names its database: {kind}://HOST:PORT/DB"
        raise ValueError(msg)
    if kind == "redis" and not name.isdigit():
        msg = "a redis endpoint's path is a database number: redis://HOST:PORT/0"
        raise ValueError(msg)
    if _DB.fullmatch(name) is None:
        msg = "a database name is letters, digits, '_', '$', '.', '-' (at most 63)"
        raise ValueError(msg)
    return name


@dataclass(frozen=True)
class HostAllowList:
    """The hosts an HTTP grant's credential may be sent to (rule 3)."""

    exact: frozenset[str]
    suffixes: tuple[str, ...]

    @classmethod
    def parse(cls, patterns: Sequence[str], *, default: str | None = None) -> HostAllowList:
        """Raises: ValueError: a pattern that is not a host, an IP address or ``*.`` followed by a host."""
        exact: set[str] = set()
        suffixes: list[str] = []
        for pattern in patterns:
            text = pattern.strip().lower()
            if text.startswith("*."):
                suffixes.append("." + _host(text[2:]))
            elif "*" in text:
                msg = "a wildcard is only '*.' at the start of a host pattern"
                raise ValueError(msg)
            else:
                exact.add(_host(text))
        if not exact and not suffixes and default is not None:
            exact.add(_host(default))
        return cls(frozenset(exact), tuple(suffixes))

    def allows(self, host: str) -> bool:
        try:
            name = _host(host)
        except ValueError:
            return False
        return name in self.exact or any(name.endswith(s) for s in self.suffixes)

    @property
    def patterns(self) -> list[str]:
        return sorted(self.exact) + sorted("*" + s for s in self.suffixes)
