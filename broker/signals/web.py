"""``GET /.well-known/ssf-configuration`` and the JWKS it names: what a receiver needs to trust our SETs.

Both are public, like an OpenID provider's discovery document and keys: they hold the issuer, the push
method, the critical subject members and public keys, nothing else. Without ``[signals].issuer`` and
``signing_key_file`` the broker is no transmitter and both answer 404.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from broker.errors import NotFound
from broker.models import Jwks, SsfConfiguration
from broker.signals.events import CRITICAL_SUBJECT_MEMBERS
from broker.signals.keys import PublicKey, SigningKey, jwks

__all__ = ["CONFIGURATION_PATH", "JWKS_PATH", "PUSH", "TRANSMITTER_INFO", "TransmitterInfo", "add_signal_routes"]

CONFIGURATION_PATH: Final = "/.well-known/ssf-configuration"
JWKS_PATH: Final = "/v1/signals/jwks.json"
PUSH: Final = "urn:ietf:rfc:8935"
# Receivers fetch these rarely; a rotation is seen within this many seconds.
_CACHE = "public, max-age=300"


@dataclass(frozen=True)
class TransmitterInfo:
    issuer: str
    key: SigningKey
    retired: tuple[PublicKey, ...] = ()

    def configuration(self) -> SsfConfiguration:
        return SsfConfiguration(issuer=self.issuer, jwks_uri=self.issuer + JWKS_PATH,
                                delivery_methods_supported=[PUSH],
                                critical_subject_members=list(CRITICAL_SUBJECT_MEMBERS))

    def jwks(self) -> dict[str, Any]:
        return Jwks.model_validate(jwks(self.key, self.retired)).model_dump()


TRANSMITTER_INFO = web.AppKey("ssf_transmitter_info", TransmitterInfo)


def _info(request: web.Request) -> TransmitterInfo:
    """Raises: NotFound: the broker is not configured as a transmitter."""
    info = request.app.get(TRANSMITTER_INFO)
    if info is None:
        raise NotFound("this broker sends no shared signals ([signals] is not configured)")
    return info


async def ssf_configuration(request: web.Request) -> web.Response:
    doc = _info(request).configuration().model_dump()
    return web.json_response(doc, headers={"Cache-Control": _CACHE})


async def ssf_jwks(request: web.Request) -> web.Response:
    return web.json_response(_info(request).jwks(), headers={"Cache-Control": _CACHE})


def add_signal_routes(app: web.Application) -> None:
    app.router.add_get(CONFIGURATION_PATH, ssf_configuration)
    app.router.add_get(JWKS_PATH, ssf_jwks)
