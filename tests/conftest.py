"""Shared fixtures: a real OpenBao and a SCRAM PostgreSQL (tests/support), generated identities, the broker app.

Identities are minted at test time from throwaway keys: an agent trust domain ``example.org``, a second
trust domain ``partner.example`` (trusted for its own agents only), a user IdP, and keys nobody trusts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from broker.app import make_app
from broker.audit.signing import generate_signing_key_file
from broker.config import Settings, load_settings
from broker.delegation import Catalog
from broker.dev.identities import DevIssuer
from broker.sealing import TokenSealer
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin
from broker.vault.sync import audit_device_of, sync, write_broker_token
from tests.support.fixtures import *  # noqa: F403
from tests.support.fixtures import BaoEngines

AUDIENCE = "agent-broker"
IDP = "https://idp.test.example"
TD = "example.org"
PARTNER_TD = "partner.example"
AGENT = f"spiffe://{TD}/agent/support-1"
OTHER_AGENT = f"spiffe://{TD}/agent/support-2"
OUTSIDER_AGENT = f"spiffe://{TD}/agent/billing-1"
USER = "alice@example.com"


def person(name: str = USER) -> str:
    """The person id the broker records for a test user minted by ``Identities.user(name)`` (sub = name)."""
    return f"{IDP}#{name}"


USER_ID = person(USER)

CONFIG = """
[server]
listen = "127.0.0.1:0"
audience = "{audience}"

[vault]
addr = "{addr}"
token_file = "vault-token"
audit_log = "{audit_log}"
revoke_confirm_timeout = 5

[store]
url = "sqlite:///broker.db"
key_file = "store.key"

[audit]
signing_key_file = "audit-signing.key"

[[agents.trust]]
trust_domain = "{td}"
jwks_file = "spiffe.jwks"

[[agents.trust]]
trust_domain = "{partner_td}"
jwks_file = "partner.jwks"

[[users.issuers]]
issuer = "{idp}"
jwks_file = "idp.jwks"
groups_claim = "groups"

[people]
operators = ["group:secops"]
auditors = ["group:audit"]
approvers = ["group:secops-leads"]

[[task_roles]]
name = "support-triage"
tenant = "acme"
agents = ["spiffe://{td}/agent/support-*"]
delegators = ["group:support"]
max_ttl = "30m"

  [[task_roles.grants]]
  name = "tickets-db-ro"
  path = "database/creds/tickets-ro"
  max_ttl = "10m"

  [[task_roles.grants]]
  name = "agent-cert"
  path = "pki/issue/agents"
  max_ttl = "10m"
  params = {{ common_name = "{{task}}.agents.{td}", uri_sans = "{{agent}}" }}

  [[task_roles.grants]]
  name = "child-token"
  path = "auth/token/create/agent-child"
  method = "write"
  max_ttl = "10m"

  [[task_roles.grants]]
  name = "prod-write"
  path = "database/creds/tickets-rw"
  max_ttl = "5m"
  risk = "high"

  [[task_roles.grants]]
  name = "prod-cert"
  path = "pki/issue/agents"
  max_ttl = "5m"
  risk = "high"
  approvals_required = 2
  params = {{ common_name = "prod-{{task}}.agents.{td}" }}

[[task_roles]]
name = "billing-report"
tenant = "globex"
agents = ["spiffe://{td}/agent/billing-*"]
delegators = ["group:billing"]
max_ttl = "15m"

  [[task_roles.grants]]
  name = "tickets-db-rw"
  path = "database/creds/tickets-rw"
  max_ttl = "5m"
"""


@dataclass
class Identities:
    """Token minting for tests. ``stranger`` signs with a key nobody trusts."""

    spiffe: DevIssuer
    partner: DevIssuer
    idp: DevIssuer
    stranger: DevIssuer

    def agent(self, spiffe_id: str = AGENT, **kw: Any) -> str:
        kw.setdefault("audience", AUDIENCE)
        return self.spiffe.mint_svid(spiffe_id, **kw)

    def user(self, name: str = USER, groups: tuple[str, ...] = ("support",), **kw: Any) -> str:
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("auth_time", time.time())
        return self.idp.mint_id_token(issuer=IDP, subject=name, email=name, groups=groups, **kw)


@dataclass
class BrokerSite:
    """What a broker test needs: its settings, the engines behind it, identities."""

    root: Path
    settings: Settings
    engines: BaoEngines
    ids: Identities


@pytest.fixture(scope="session")
def identities() -> Identities:
    return Identities(spiffe=DevIssuer.generate(kid="spiffe-1"), partner=DevIssuer.generate(kid="partner-1"),
                      idp=DevIssuer.generate(kid="idp-1"), stranger=DevIssuer.generate(kid="spiffe-1"))


@pytest.fixture(scope="session")
def broker_root(tmp_path_factory: pytest.TempPathFactory, bao_with_engines: BaoEngines,
                identities: Identities) -> Path:
    """Config, keys and a broker Vault token (policy agent-broker, from `vault sync`), once per session."""
    root = tmp_path_factory.mktemp("broker")
    identities.spiffe.write_jwks(root / "spiffe.jwks")
    identities.partner.write_jwks(root / "partner.jwks")
    identities.idp.write_jwks(root / "idp.jwks")
    TokenSealer.generate_key_file(root / "store.key")
    generate_signing_key_file(root / "audit-signing.key")
    bao = bao_with_engines.bao
    (root / "broker.toml").write_text(CONFIG.format(audience=AUDIENCE, addr=bao.addr, audit_log=bao.audit_log,
                                                    td=TD, partner_td=PARTNER_TD, idp=IDP))
    settings = load_settings({}, root / "broker.toml")

    with VaultAdmin(bao.addr, token=bao.root_token) as admin:
        sync(admin, Catalog.from_settings(settings), audit_device=audit_device_of(settings))
        write_broker_token(admin, root / "vault-token")
    return root


@pytest.fixture
def site(broker_root: Path, bao_with_engines: BaoEngines, identities: Identities, tmp_path: Path) -> BrokerSite:
    """A fresh SQLite store per test, over the session's Vault set-up."""
    settings = load_settings({"BROKER_STORE_URL": f"sqlite:///{tmp_path / 'broker.db'}"}, broker_root / "broker.toml")
    return BrokerSite(root=broker_root, settings=settings, engines=bao_with_engines, ids=identities)


@pytest_asyncio.fixture
async def client(site: BrokerSite, aiohttp_client: Callable[..., Any]) -> AsyncIterator[TestClient[Any, Any]]:
    yield await aiohttp_client(make_app(site.settings))


@pytest_asyncio.fixture
async def admin(site: BrokerSite) -> AsyncIterator[VaultClient]:
    """Root access to the same OpenBao: the tests' source of Vault truth."""
    async with aiohttp.ClientSession() as session:
        yield VaultClient(session, site.engines.bao.addr, token=site.engines.bao.root_token)


@pytest.fixture
def hvac_admin(site: BrokerSite) -> Iterator[VaultAdmin]:
    """Root set-up access (hvac, synchronous) to the same OpenBao; async tests call it with ``asyncio.to_thread``."""
    with VaultAdmin(site.engines.bao.addr, token=site.engines.bao.root_token) as admin:
        yield admin


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
