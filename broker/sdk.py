"""Agent-side client of the broker (and the user calls a demo or a test needs).

Imports only ``broker.client`` (the one HTTP client to the broker), ``broker.models`` and
``broker.errors``, plus ``broker.connectors`` and ``broker.endpoints`` for the "use, don't hold" helpers
(their drivers are imported when first used), so an agent can vendor it with those five. Its public
surface, ``__all__``, is a contract with agents and is pinned by a test.

    async with AgentClient(url, svid=lambda: read_svid()) as agent:
        async with agent.task(task_id) as task:           # ends the task on exit
            cred = await task.credential("tickets-db-ro")
            ... cred.data["username"], cred.data["password"] ...

Or use a grant without ever holding its secret ("use, don't hold"): the grant's catalog ``endpoint``
says where to connect, and the helpers hand out a connection, not a password:

        async with agent.task(task_id) as task:
            async with task.postgres("tickets-db-ro") as conn:       # a psycopg AsyncConnection
                rows = await (await conn.execute("SELECT count(*) FROM tickets")).fetchall()
            async with task.http("tickets-api") as http:              # an aiohttp session, to allowed hosts only
                async with http.get("/v1/tickets") as resp: ...

A helper reuses the credential it obtained while it has time left (renewing it when it can) and asks
for a new one near its end. ``task.mysql`` and ``task.redis`` do the same for MySQL and Redis grants.

The SVID is asked for on every request (a callable), so a rotating SVID from the SPIFFE Workload API
is always fresh. Errors arrive as the broker's own ``BrokerError`` subclasses, chosen by problem code
(``broker.client.decode_problem``); a broker that cannot be reached is ``broker.client.Unreachable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from broker import connectors, errors
from broker.client import BrokerClient, TokenSource
from broker.endpoints import Endpoint, EndpointKind, HostAllowList
from broker.models import ApprovalOut, CredentialOut, EndOut, GrantOut, RenewOut, TaskGrants, TaskOut

if TYPE_CHECKING:
    import psycopg
    import redis.asyncio

__all__ = ["AgentClient", "ApprovalPending", "TaskSession", "TokenSource", "UserClient"]


# Raised by ``AgentClient.credential`` for a 202 (a pending approval); defined with the other errors.
ApprovalPending = errors.ApprovalPending


class AgentClient(BrokerClient):
    """Calls made by an agent, authenticated with its JWT-SVID (or, in Kubernetes, its projected
    service-account token: a callable that reads the file the kubelet keeps fresh)."""

    async def start_delegated_task(self, delegation_token: str, *, role: str, ttl: int | str, reason: str,
                                   tenant: str | None = None) -> TaskOut:
        """Start a task for the user its IdP says delegated ``role`` to this agent (RFC 8693 token exchange).

        ``delegation_token``: the IdP's token-exchange result (``sub`` the user, ``act.sub`` this agent's
        SPIFFE ID, ``scope`` holding ``task:<role>``). The broker accepts each one once: get a new one for
        each task.

        Raises:
            InvalidIdentity: either token was refused (a replay, another agent's delegation, a role not in
                the scope or not the user's to delegate...); the broker's log says which.
            BrokerError subclasses: as the broker answered.
        """
        body: dict[str, Any] = {"role": role, "ttl": ttl, "reason": reason}
        if tenant is not None:
            body["tenant"] = tenant
        return TaskOut.model_validate(await self.call("POST", "/v1/tasks", body=body,
                                                      headers={"X-Delegation-Token": delegation_token}))

    async def credential(self, task_id: str, grant: str, *, ttl: int | None = None, approval_id: str | None = None,
                         wait_for_approval: float = 0, public_key: str | None = None) -> CredentialOut:
        """The grant's credential for the task.

        A high-risk grant is answered with a pending approval. With ``wait_for_approval`` > 0 the client
        long-polls it for up to that many seconds and, once approved, repeats the request with it (the
        approval covers this exact request, once). ``public_key`` is the OpenSSH public key an SSH grant
        signs, where the grant does not fix one (the only thing an agent chooses).

        Raises:
            ApprovalPending: the approval is not (yet) approved; ``approval_id`` and ``state`` say which.
            BrokerError subclasses: as the broker answered.
        """
        body: dict[str, Any] = {"grant": grant}
        if ttl is not None:
            body["ttl"] = ttl
        if approval_id is not None:
            body["approval_id"] = approval_id
        if public_key is not None:
            body["public_key"] = public_key
        payload = await self.call("POST", f"/v1/tasks/{task_id}/credentials", body=body)
        if "approval_id" not in payload:
            return CredentialOut.model_validate(payload)
        pending = ApprovalPending(payload["approval_id"], "pending")
        if wait_for_approval <= 0:
            raise pending
        approval = await self.wait_for_approval(pending.approval_id, timeout=wait_for_approval)
        if approval.state != "approved":
            raise ApprovalPending(approval.id, approval.state)
        return await self.credential(task_id, grant, ttl=ttl, approval_id=approval.id, public_key=public_key)

    async def wait_for_approval(self, approval_id: str, *, timeout: float = 300) -> ApprovalOut:
        """Long-poll an approval until it leaves ``pending`` or ``timeout`` seconds pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            wait = min(30.0, max(0.0, deadline - loop.time()))
            approval = ApprovalOut.model_validate(await self.call("GET", f"/v1/approvals/{approval_id}?wait={wait:g}"))
            if approval.state != "pending" or loop.time() >= deadline:
                return approval

    async def renew(self, lease_id: str, *, increment: int | None = None) -> RenewOut:
        body = {} if increment is None else {"increment": increment}
        return RenewOut.model_validate(await self.call("POST", f"/v1/leases/{lease_id}/renew", body=body))

    async def end_task(self, task_id: str, *, wait: float = 0) -> EndOut:
        """End the task; see ``_end_task`` (202 ``revoke_pending`` is an answer, not an error)."""
        return await _end_task(self, task_id, wait=wait)

    async def get_task(self, task_id: str) -> TaskOut:
        return TaskOut.model_validate(await self.call("GET", f"/v1/tasks/{task_id}"))

    async def task_grants(self, task_id: str) -> TaskGrants:
        """The task's state and its grants: risk, how each ends, where each is used (``endpoint``)."""
        return TaskGrants.model_validate(await self.call("GET", f"/v1/tasks/{task_id}/grants"))

    async def approval(self, approval_id: str) -> ApprovalOut:
        return ApprovalOut.model_validate(await self.call("GET", f"/v1/approvals/{approval_id}"))

    def task(self, task_id: str, *, end_on_exit: bool = True, clock: Callable[[], float] = time.time) -> TaskSession:
        return TaskSession(self, task_id, end_on_exit=end_on_exit, clock=clock)


class TaskSession:
    """One task seen from its agent: fetch and renew credentials; end the task on leaving the block."""

    # A held credential is renewed, or replaced, once less than this share of its life (and at least
    # RENEW_MIN_SECONDS) is left: a connection opened with it must not die in the middle of a query.
    RENEW_SHARE = 0.2
    RENEW_MIN_SECONDS = 15.0

    def __init__(self, client: AgentClient, task_id: str, *, end_on_exit: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.task_id = task_id
        self._end_on_exit = end_on_exit
        self._clock = clock
        self.ended: EndOut | None = None
        # grant -> (credential, when it was obtained or last renewed); approvals asked for, by grant.
        self._held: dict[str, tuple[CredentialOut, float]] = {}
        self._pending: dict[str, str] = {}
        # Every secret this session ever held, to scrub from anything shown (tool results, errors, logs).
        self.redactor = connectors.Redactor()

    async def __aenter__(self) -> TaskSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: types.TracebackType | None) -> None:
        if self._end_on_exit:
            self.ended = await self.client.end_task(self.task_id)
            self.forget()

    async def credential(self, grant: str, *, ttl: int | None = None, wait_for_approval: float = 0,
                         public_key: str | None = None) -> CredentialOut:
        return await self.client.credential(self.task_id, grant, ttl=ttl, wait_for_approval=wait_for_approval,
                                            public_key=public_key)

    async def renew(self, lease_id: str, *, increment: int | None = None) -> RenewOut:
        return await self.client.renew(lease_id, increment=increment)

    # -- use, don't hold ------------------------------------------------------------------------------

    async def grants(self) -> TaskGrants:
        """The task's state and grants, asked for now.

        Raises:
            Gone: the task has ended, was revoked or expired; everything held has been dropped.
        """
        view = await self.client.task_grants(self.task_id)
        if view.state != "active" or view.expires_at <= self._clock():
            self.forget()
            msg = f"the task is {view.state if view.state != 'active' else 'expired'}"
            raise errors.Gone(msg)
        return view

    async def grant(self, name: str, *, kind: EndpointKind | tuple[EndpointKind, ...] | None = None,
                    view: TaskGrants | None = None) -> GrantOut:
        """The task's grant ``name`` as the catalog describes it (from ``view``, else asked for now).

        Raises:
            Gone: the task is no longer active.
            ToolRefused: no such grant in the task's role, or its endpoint is not of ``kind``.
        """
        view = view if view is not None else await self.grants()
        found = next((g for g in view.grants if g.name == name), None)
        if found is None:
            msg = f"the task's role has no grant {name!r}"
            raise errors.ToolRefused(msg)
        kinds = (kind,) if isinstance(kind, str) else kind
        if kinds is not None and found.kind not in kinds:
            msg = f"grant {name!r} is not a {' or '.join(kinds)} grant (its endpoint: {found.endpoint or 'none'})"
            raise errors.ToolRefused(msg)
        return found

    async def held(self, grant: str, *, approval_id: str | None = None) -> CredentialOut:
        """The grant's credential, for use here: the one already held while it has time left, renewed when
        it is renewable and near its end, else a new one.

        A high-risk grant asks for an approval once and then checks that approval on each later call
        (``approval_id`` names one explicitly); it never waits here.

        Raises:
            ApprovalPending: the approval is pending (or was just asked for); ``approval_id`` says which.
            Denied: the approval was denied or expired (the next call asks for a new one).
            BrokerError subclasses: as the broker answered (``Gone`` once the task has ended).
        """
        now = self._clock()
        kept = self._held.get(grant)
        if kept is not None:
            cred, since = kept
            if cred.expires_at - now > self._margin(cred, since):
                return cred
            if cred.renewable:
                with contextlib.suppress(errors.Conflict, errors.NotFound):
                    renewed = await self.client.renew(cred.lease_id)
                    cred = cred.model_copy(update={"expires_at": renewed.expires_at})
                    if cred.expires_at - now > self._margin(cred, now):
                        self._held[grant] = (cred, now)
                        return cred
            del self._held[grant]
        cred = await self._obtain(grant, approval_id or self._pending.get(grant))
        self.redactor.add(*connectors.secrets_of(cred.data))
        self._held[grant] = (cred, self._clock())
        return cred

    def _margin(self, cred: CredentialOut, since: float) -> float:
        return max(self.RENEW_MIN_SECONDS, (cred.expires_at - since) * self.RENEW_SHARE)

    async def _obtain(self, grant: str, approval_id: str | None) -> CredentialOut:
        if approval_id is not None:
            approval = await self.client.approval(approval_id)
            if approval.state == "pending":
                self._pending[grant] = approval_id
                raise ApprovalPending(approval_id, "pending")
            self._pending.pop(grant, None)
            if approval.state != "approved":
                msg = f"approval {approval_id} is {approval.state}; the next call asks for a new one"
                raise errors.Denied(msg)
        try:
            return await self.client.credential(self.task_id, grant, approval_id=approval_id)
        except ApprovalPending as exc:
            self._pending[grant] = exc.approval_id
            raise

    @property
    def holding(self) -> int:
        """How many credentials this session holds for use."""
        return len(self._held)

    def forget(self) -> None:
        """Drop every credential held and every approval asked for (the task ended, or the caller is done)."""
        self._held.clear()
        self._pending.clear()
        self.redactor.clear()

    @contextlib.asynccontextmanager
    async def postgres(self, grant: str, *, statement_timeout: float | None = None,
                       timeout: float = 10.0) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A PostgreSQL connection (psycopg, autocommit) as the grant's user, closed on leaving the block.

        Raises:
            As ``grant`` and ``held``; UpstreamFailed: the database refused the connection.
        """
        _, endpoint, cred = await self._use(grant, "postgresql")
        conn = await connectors.postgres(endpoint, cred.data, timeout=timeout, statement_timeout=statement_timeout)
        try:
            yield conn
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def mysql(self, grant: str, *, timeout: float = 10.0) -> AsyncIterator[Any]:
        """A MySQL/MariaDB connection (aiomysql, autocommit) as the grant's user, closed on leaving the block."""
        _, endpoint, cred = await self._use(grant, "mysql")
        conn = await connectors.mysql(endpoint, cred.data, timeout=timeout)
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.asynccontextmanager
    async def redis(self, grant: str, *, timeout: float = 10.0) -> AsyncIterator[redis.asyncio.Redis]:
        """A Redis client (redis-py asyncio) as the grant's ACL user, closed on leaving the block."""
        _, endpoint, cred = await self._use(grant, "redis")
        client = connectors.redis_client(endpoint, cred.data, timeout=timeout)
        try:
            yield client
        finally:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def http(self, grant: str, *, timeout: float = 30.0,
                   ca_file: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
        """An aiohttp session that carries the grant's token or client certificate to its allowed hosts only.

        Relative URLs are joined to the grant's endpoint; a request to any other host raises ``HostNotAllowed``.
        """
        view, endpoint, cred = await self._use(grant, "http")
        session = connectors.http_session(endpoint, HostAllowList.parse(view.allowed_hosts, default=endpoint.host),
                                          cred.data, http_auth=view.http_auth, timeout=timeout, ca_file=ca_file)
        try:
            yield session
        finally:
            await session.close()

    async def _use(self, grant: str, kind: EndpointKind) -> tuple[GrantOut, Endpoint, CredentialOut]:
        view = await self.grant(grant, kind=kind)
        assert view.endpoint is not None  # a kind implies an endpoint
        return view, Endpoint.parse(view.endpoint), await self.held(grant)


async def _end_task(client: BrokerClient, task_id: str, *, wait: float = 0) -> EndOut:
    """``POST /v1/tasks/{id}/end``; with ``wait`` > 0, follow a ``revoke_pending`` answer (202) for up to that
    many seconds, until Vault has confirmed everything gone (``revocation == "revoked"``).

    A 202 is not an error: the task is ended (nothing new can be issued for it) and the broker keeps
    confirming. What comes back says where it stands when this returns.

    Raises:
        VaultUnavailable: Vault did not answer the revocation (503); the broker keeps retrying.
        BrokerError subclasses: as the broker answered.
    """
    ended = EndOut.model_validate(await client.call("POST", f"/v1/tasks/{task_id}/end", body={}))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.2
    while ended.revocation == "revoke_pending" and loop.time() < deadline:
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, 2.0)
        task = TaskOut.model_validate(await client.call("GET", f"/v1/tasks/{task_id}"))
        done = task.revocation == "revoked"
        pending = 0 if done else sum(x.state == "revoke_pending" for x in task.leases or [])
        ended = EndOut(id=ended.id, state=ended.state, revoked=ended.revoked, pending=pending,
                       revocation="revoked" if done else "revoke_pending")
    return ended


class UserClient(BrokerClient):
    """Calls made by a person, authenticated with an OIDC ID token."""

    async def start_task(self, *, agent: str, role: str, ttl: int | str, reason: str,
                         tenant: str | None = None) -> TaskOut:
        body: dict[str, Any] = {"agent": agent, "role": role, "ttl": ttl, "reason": reason}
        if tenant is not None:
            body["tenant"] = tenant
        return TaskOut.model_validate(await self.call("POST", "/v1/tasks", body=body))

    async def get_task(self, task_id: str) -> TaskOut:
        return TaskOut.model_validate(await self.call("GET", f"/v1/tasks/{task_id}"))

    async def end_task(self, task_id: str, *, wait: float = 0) -> EndOut:
        """End the task; see ``_end_task`` (202 ``revoke_pending`` is an answer, not an error)."""
        return await _end_task(self, task_id, wait=wait)

    async def audit(self, **filters: str | float) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(filters)
        page = await self.call("GET", "/v1/audit" + (f"?{query}" if query else ""))
        return list(page["records"])
