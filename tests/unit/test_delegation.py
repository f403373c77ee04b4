"""The pure decisions: who may delegate what to whom, and how long a lease may live."""

from __future__ import annotations

import pytest

from broker.config import Settings
from broker.delegation import (
    Catalog,
    Principal,
    TaskView,
    cap_ttl,
    check_grant,
    check_start,
)
from broker.errors import (
    AgentNotAllowed,
    BadRequest,
    ConfigError,
    Denied,
    Gone,
    GrantNotInRole,
    NotDelegator,
    NotTaskAgent,
)
from broker.identity import AgentIdentity, SpiffeId, UserIdentity

NOW = 1_800_000_000.0
BASE = {
    "server": {"audience": "agent-broker"},
    "vault": {"token_file": "/nonexistent/token"},
    "store": {"key_file": "/nonexistent/key"},
}


def catalog(**role_overrides: object) -> Catalog:
    role = {
        "name": "support-triage", "tenant": "acme", "agents": ["spiffe://example.org/agent/support-*"],
        "delegators": ["group:support", "user:carol@example.com"], "max_ttl": "30m",
        "grants": [{"name": "tickets-db-ro", "path": "database/creds/tickets-ro", "max_ttl": "10m"},
                   {"name": "cert", "path": "pki/issue/agents", "max_ttl": "5m", "params": {"common_name": "{task}.x"}}],
    }
    role.update(role_overrides)
    return Catalog.from_settings(Settings.model_validate({**BASE, "task_roles": [role]}))


def user(name: str = "alice@example.com", groups: tuple[str, ...] = ("support",), *,
         email_trusted: bool = True, issuer: str = "https://idp") -> UserIdentity:
    return UserIdentity(subject=name, issuer=issuer, groups=frozenset(groups), auth_time=NOW,
                        expires_at=NOW + 300, email=name, email_trusted=email_trusted)


def agent(sid: str = "spiffe://example.org/agent/support-1") -> AgentIdentity:
    return AgentIdentity(spiffe_id=SpiffeId.parse(sid), expires_at=NOW + 300, token_id=None)


def task(**kw: object) -> TaskView:
    values: dict[str, object] = {"id": "tsk_1", "agent": "spiffe://example.org/agent/support-1",
                                 "role": "support-triage", "state": "active", "expires_at": NOW + 600}
    values.update(kw)
    return TaskView(**values)  # type: ignore[arg-type]


class TestCheckStart:
    def test_delegator_by_group(self) -> None:
        """A member of a delegator group may delegate; the TTL is capped at the role's max."""
        d = check_start(catalog(), user(), agent="spiffe://example.org/agent/support-1", role="support-triage",
                        ttl=7200, tenant=None)
        assert d.ttl == 1800 and str(d.agent) == "spiffe://example.org/agent/support-1"

    def test_delegator_by_name(self) -> None:
        """A user named among the delegators may delegate without the group."""
        check_start(catalog(), user("carol@example.com", ()), agent="spiffe://example.org/agent/support-9",
                    role="support-triage", ttl=60, tenant="acme")

    @pytest.mark.parametrize(("who", "role", "tenant"), [
        (user("mallory@example.com", ("billing",)), "support-triage", None),
        (user(), "no-such-role", None),
        (user(), "support-triage", "globex"),
        (user("support", ()), "support-triage", None),  # a user *named* like the group is not in it
    ])
    def test_not_a_delegator(self, who: UserIdentity, role: str, tenant: str | None) -> None:
        """Unknown role, wrong tenant and non-delegators all get the same NotDelegator."""
        with pytest.raises(NotDelegator):
            check_start(catalog(), who, agent="spiffe://example.org/agent/support-1", role=role, ttl=60,
                        tenant=tenant)

    @pytest.mark.parametrize("sid", [
        "spiffe://example.org/agent/billing-1",
        "spiffe://example.org/agent/support-1/sub",
        "spiffe://example.org/agent",
        "spiffe://other.org/agent/support-1",
    ])
    def test_agent_outside_pattern(self, sid: str) -> None:
        """Agents must match a role pattern segment by segment, in the same trust domain."""
        with pytest.raises(AgentNotAllowed):
            check_start(catalog(), user(), agent=sid, role="support-triage", ttl=60, tenant=None)

    @pytest.mark.parametrize("sid", ["not-a-spiffe-id", "spiffe://Example.org/agent/x", "spiffe://example.org/a/../b"])
    def test_malformed_agent_is_a_bad_request(self, sid: str) -> None:
        """A malformed SPIFFE ID in the body is a 400, not a denial."""
        with pytest.raises(BadRequest):
            check_start(catalog(), user(), agent=sid, role="support-triage", ttl=60, tenant=None)

    def test_non_positive_ttl(self) -> None:
        """A zero TTL is refused."""
        with pytest.raises(BadRequest):
            check_start(catalog(), user(), agent="spiffe://example.org/agent/support-1", role="support-triage",
                        ttl=0, tenant=None)


class TestCheckGrant:
    def test_grant_of_the_role(self) -> None:
        """The task's agent gets a grant of the task's role."""
        assert check_grant(catalog(), task(), agent(), "tickets-db-ro", now=NOW).path == "database/creds/tickets-ro"

    def test_other_agent(self) -> None:
        """Another agent, even one the role would accept, is not this task's agent."""
        with pytest.raises(NotTaskAgent):
            check_grant(catalog(), task(), agent("spiffe://example.org/agent/support-2"), "tickets-db-ro", now=NOW)

    @pytest.mark.parametrize("kw", [{"state": "ended"}, {"state": "revoked"}, {"expires_at": NOW}])
    def test_inactive_task(self, kw: dict[str, object]) -> None:
        """An ended, revoked or expired task grants nothing."""
        with pytest.raises(Gone):
            check_grant(catalog(), task(**kw), agent(), "tickets-db-ro", now=NOW)

    def test_grant_outside_role(self) -> None:
        """A grant name the role does not hold is refused."""
        with pytest.raises(GrantNotInRole):
            check_grant(catalog(), task(), agent(), "tickets-db-rw", now=NOW)

    def test_role_removed_from_catalog(self) -> None:
        """A task whose role left the catalog grants nothing."""
        with pytest.raises(GrantNotInRole):
            check_grant(catalog(), task(role="retired"), agent(), "tickets-db-ro", now=NOW)


class TestCapTtl:
    @pytest.mark.parametrize(("requested", "remaining", "expected"), [
        (None, 600, 600), (60, 600, 60), (3600, 600, 600), (None, 90, 90), (3600, 1.5, 1),
    ])
    def test_cap(self, requested: int | None, remaining: float, expected: int) -> None:
        """The TTL is the least of the request, the grant's max (600 s) and the task's remaining time."""
        c = catalog()
        grant = c.roles["support-triage"].grants["tickets-db-ro"]
        assert cap_ttl(grant, task(expires_at=NOW + remaining), requested, now=NOW) == expected

    def test_no_time_left(self) -> None:
        """Under a second left is no time at all."""
        grant = catalog().roles["support-triage"].grants["tickets-db-ro"]
        with pytest.raises(Gone):
            cap_ttl(grant, task(expires_at=NOW + 0.5), None, now=NOW)


class TestCatalog:
    def test_grant_longer_than_role_is_a_config_error(self) -> None:
        """A grant may not outlive the role's max TTL."""
        with pytest.raises(ConfigError):
            catalog(max_ttl="5m", grants=[{"name": "g", "path": "database/creds/x", "max_ttl": "10m"}])

    @pytest.mark.parametrize("path", ["database/../sys/raw", "/database/creds/x", "database//x", "a/b?c=d"])
    def test_unsafe_vault_paths_are_config_errors(self, path: str) -> None:
        """Vault paths are checked when the catalog loads."""
        with pytest.raises(ConfigError):
            catalog(grants=[{"name": "g", "path": path, "max_ttl": "1m"}])

    def test_methods(self) -> None:
        """Grants with params are written (POST); others are read (GET)."""
        roles = catalog().roles["support-triage"]
        assert roles.grants["tickets-db-ro"].method == "GET"
        assert roles.grants["cert"].method == "POST"

    def test_params_substitute_task_values_literally(self) -> None:
        """Placeholders take the task's values, and a value holding a placeholder is not expanded again."""
        grant = catalog().roles["support-triage"].grants["cert"]
        body = grant.request_params(task="{user}", agent="a", user="u", tenant="t", role="r", ttl=60)
        assert body == {"common_name": "{user}.x", "ttl": "60s"}

    @pytest.mark.parametrize("text", ["", "team:x", "group:"])
    def test_principal_syntax(self, text: str) -> None:
        """Principals are user:NAME, group:NAME or a bare user name."""
        with pytest.raises(ConfigError):
            Principal.parse(text)


class TestPrincipals:
    """``user:`` principals name a person by id or by a *trusted* email; never by a name a token chooses."""

    def test_email_principal_needs_a_trusted_email(self) -> None:
        """user:EMAIL matches the address only when the IdP vouched for it (any case)."""
        p = Principal.parse("user:Carol@Example.com")
        assert p.includes(user("carol@example.com"))
        assert not p.includes(user("carol@example.com", email_trusted=False))

    def test_person_id_principal_is_exact(self) -> None:
        """user:<issuer>#<sub> matches that pair only: not the same sub at another issuer, not the email."""
        p = Principal.parse("user:https://idp#carol@example.com")
        assert p.includes(user("carol@example.com"))
        assert not p.includes(user("carol@example.com", issuer="https://idp2"))
        assert not Principal.parse("user:https://idp#carol").includes(user("carol@example.com"))

    def test_user_placeholders(self) -> None:
        """{user_id} is the person id, {user_email} their trusted email, which a grant naming it requires."""
        grant = catalog(grants=[{"name": "cert", "path": "pki/issue/agents", "max_ttl": "5m",
                                 "params": {"common_name": "{user_email}", "alt": "{user_id}"}}]
                        ).roles["support-triage"].grants["cert"]
        body = grant.request_params(task="t", agent="a", user="Alice", user_id="https://idp#u1",
                                    user_email="alice@example.com", tenant="x", role="r", ttl=60)
        assert (body["common_name"], body["alt"]) == ("alice@example.com", "https://idp#u1")
        with pytest.raises(Denied):
            grant.request_params(task="t", agent="a", user="u1", user_id="https://idp#u1", user_email=None,
                                 tenant="x", role="r", ttl=60)
