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
from broker.dev.config import (
    AUDIENCE,
    DEV_PEOPLE,
    AgentTrust,
    BrokerConfig,
    DelegationIssuer,
    Grant,
    KubernetesCluster,
    TaskRole,
    UserIssuer,
    example_grants,
)
from broker.dev.identities import DevIssuer
from broker.sealing import TokenSealer
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin
from broker.vault.sync import audit_device_of, sync, write_broker_token
from tests.support.engines import *  # noqa: F403
from tests.support.engines import redis_role
from tests.support.fixtures import *  # noqa: F403
from tests.support.fixtures import BaoEngines

IDP = "https://idp.test.example"
TD = "example.org"
PARTNER_TD = "partner.example"
AGENT = f"spiffe://{TD}/agent/support-1"
OTHER_AGENT = f"spiffe://{TD}/agent/support-2"
OUTSIDER_AGENT = f"spiffe://{TD}/agent/billing-1"
USER = "alice@example.com"
# Two Kubernetes clusters, each its own trust domain, issuer and keys (broker.identity.kubernetes).
K8S_TD = "k8s-a.example.org"
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_B_TD = "k8s-b.example.org"
K8S_B_ISSUER = "https://oidc.k8s-b.example.net/id/7f3a"
K8S_AGENT = f"spiffe://{K8S_TD}/ns/support/sa/support-bot"


def person(name: str = USER) -> str:
    """The person id the broker records for a test user minted by ``Identities.user(name)`` (sub = name)."""
    return f"{IDP}#{name}"


USER_ID = person(USER)

def site_config(*, addr: str, audit_log: str | Path | None) -> BrokerConfig:
    """The tests' broker: two agent trust domains, a user IdP, and two task roles (files relative to the config).

    ``support-triage`` has the example engines' grants plus two high-risk ones (``prod-cert`` needs two
    approvers); ``billing-report`` is another tenant's role, for agents of another name.
    """
    support = TaskRole(
        name="support-triage", tenant="acme",
        agents=(f"spiffe://{TD}/agent/support-*", f"spiffe://{K8S_TD}/ns/support/sa/support-*"),
        delegators=("group:support",),
        max_ttl="30m", grants=(
            *example_grants(TD),
            Grant(name="prod-write", path="database/creds/tickets-rw", max_ttl="5m", risk="high"),
            Grant(name="prod-cert", path="pki/issue/agents", max_ttl="5m", risk="high", approvals_required=2,
                  params={"common_name": f"prod-{{task}}.agents.{TD}"}),
        ))
    billing = TaskRole(
        name="billing-report", tenant="globex", agents=(f"spiffe://{TD}/agent/billing-*",),
        delegators=("group:billing",), max_ttl="15m",
        grants=(Grant(name="tickets-db-rw", path="database/creds/tickets-rw", max_ttl="5m"),))
    # The engines beyond PostgreSQL, PKI and tokens (tests/support/engines.py, tests/api/test_engines.py).
    engines = TaskRole(
        name="engines", tenant="acme", agents=(f"spiffe://{TD}/agent/support-*",), delegators=("group:support",),
        max_ttl="30m", grants=(
            Grant(name="app-db-ro", path="database/creds/app-ro", max_ttl="5m"),
            Grant(name="cache-rw", path=f"database/creds/{redis_role()}", max_ttl="5m"),
            Grant(name="queue", path="rabbitmq/creds/agent", max_ttl="5m"),
            Grant(name="ssh-deploy", path="ssh/sign/agents", max_ttl="5m",
                  params={"valid_principals": "deploy", "key_id": "{task}", "cert_type": "user"}),
            Grant(name="api-key", path="secret/data/brk/api-key", max_ttl="5m", allow_static=True),
            Grant(name="ssh-root", path="ssh/sign/agents", max_ttl="5m", risk="high",
                  params={"valid_principals": "ops", "key_id": "{task}", "cert_type": "user"}),
        ))
    return BrokerConfig(
        vault_addr=addr, audit_log=audit_log, revoke_confirm_timeout=5, signing_key_file="audit-signing.key",
        agents=(AgentTrust(trust_domain=TD, jwks_file="spiffe.jwks"),
                AgentTrust(trust_domain=PARTNER_TD, jwks_file="partner.jwks")),
        clusters=(KubernetesCluster(trust_domain=K8S_TD, issuer=K8S_ISSUER, jwks_file="k8s-a.jwks"),
                  KubernetesCluster(trust_domain=K8S_B_TD, issuer=K8S_B_ISSUER, jwks_file="k8s-b.jwks")),
        users=(UserIssuer(issuer=IDP, jwks_file="idp.jwks"),),
        # The user IdP also performs token exchange (RFC 8693): the same person ids either way.
        delegation_issuers=(DelegationIssuer(issuer=IDP, jwks_file="idp.jwks"),),
        people=DEV_PEOPLE,
        task_roles=(support, billing, engines),
    )


@dataclass
class Identities:
    """Token minting for tests. ``stranger`` signs with a key nobody trusts."""

    spiffe: DevIssuer
    partner: DevIssuer
    idp: DevIssuer
    stranger: DevIssuer
    k8s: DevIssuer
    k8s_b: DevIssuer

    def agent(self, spiffe_id: str = AGENT, **kw: Any) -> str:
        kw.setdefault("audience", AUDIENCE)
        return self.spiffe.mint_svid(spiffe_id, **kw)

    def user(self, name: str = USER, groups: tuple[str, ...] = ("support",), **kw: Any) -> str:
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("auth_time", time.time())
        return self.idp.mint_id_token(issuer=IDP, subject=name, email=name, groups=groups, **kw)

    def k8s_agent(self, namespace: str = "support", service_account: str = "support-bot", **kw: Any) -> str:
        """A projected service-account token of cluster A (``K8S_AGENT`` by default)."""
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("issuer", K8S_ISSUER)
        return self.k8s.mint_k8s_token(namespace=namespace, service_account=service_account, **kw)

    def delegation(self, actor: str = AGENT, *, role: str = "support-triage", name: str = USER,
                   groups: tuple[str, ...] = ("support",), **kw: Any) -> str:
        """The IdP's token-exchange result: ``name`` delegates ``role`` to ``actor``."""
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("scope", f"openid task:{role}")
        return self.idp.mint_delegation_token(issuer=IDP, subject=name, actor=actor, groups=groups, **kw)


@dataclass
class BrokerSite:
    """What a broker test needs: its settings, the engines behind it, identities."""

    root: Path
    settings: Settings
    engines: BaoEngines
    ids: Identities


@pytest.fixture(scope="session")
def identities() -> Identities:
    # The clusters sign with RS256 (kube-apiserver's usual keys); cluster B reuses A's kid, as two clusters may.
    return Identities(spiffe=DevIssuer.generate(kid="spiffe-1"), partner=DevIssuer.generate(kid="partner-1"),
                      idp=DevIssuer.generate(kid="idp-1"), stranger=DevIssuer.generate(kid="spiffe-1"),
                      k8s=DevIssuer.generate(alg="RS256", kid="k8s-1"),
                      k8s_b=DevIssuer.generate(alg="RS256", kid="k8s-1"))


@pytest.fixture(scope="session")
def broker_root(tmp_path_factory: pytest.TempPathFactory, bao_with_engines: BaoEngines,
                identities: Identities) -> Path:
    """Config, keys and a broker Vault token (policy agent-broker, from `vault sync`), once per session."""
    root = tmp_path_factory.mktemp("broker")
    identities.spiffe.write_jwks(root / "spiffe.jwks")
    identities.partner.write_jwks(root / "partner.jwks")
    identities.idp.write_jwks(root / "idp.jwks")
    identities.k8s.write_jwks(root / "k8s-a.jwks")
    identities.k8s_b.write_jwks(root / "k8s-b.jwks")
    TokenSealer.generate_key_file(root / "store.key")
    generate_signing_key_file(root / "audit-signing.key")
    bao = bao_with_engines.bao
    settings = load_settings({}, site_config(addr=bao.addr, audit_log=bao.audit_log).write(root / "broker.toml"))

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


# The campaigns: modules with a `slow` test, and the ingest worker's tests (they SIGKILL workers and time
# the fallback). They kill processes, load both cores and the disk, and bound their waits for a machine
# that runs one of them at a time.
_CAMPAIGNS = "campaigns"
_ALSO_CAMPAIGNS = frozenset({"tests/unit/test_ingest_worker.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for scripts/test.sh's xdist workers (``--dist loadgroup``): each module is one group, so it runs
    on one worker and its module fixtures are made once; the campaigns share one group, so they run one
    after another on one worker, as in a serial run, while the other worker takes the rest."""
    modules = [item.nodeid.split("::", 1)[0] for item in items]
    campaigns = _ALSO_CAMPAIGNS | {m for m, item in zip(modules, items, strict=True) if item.get_closest_marker("slow")}
    for module, item in zip(modules, items, strict=True):
        item.add_marker(pytest.mark.xdist_group(_CAMPAIGNS if module in campaigns else module))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
