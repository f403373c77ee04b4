"""Agent-side client of the broker (and the user calls a demo or a test needs).

Imports only ``broker.client`` (the one HTTP client to the broker), ``broker.models`` and
``broker.errors``, so an agent can vendor it with those three. Its public surface, ``__all__``, is a
contract with agents and is pinned by a test.

    async with AgentClient(url, svid=lambda: read_svid()) as agent:
        async with agent.task(task_id) as task:           # ends the task on exit
            cred = await task.credential("tickets-db-ro")
            ... cred.data["username"], cred.data["password"] ...

The SVID is asked for on every request (a callable), so a rotating SVID from the SPIFFE Workload API
is always fresh. Errors arrive as the broker's own ``BrokerError`` subclasses, chosen by problem code
(``broker.client.decode_problem``); a broker that cannot be reached is ``broker.client.Unreachable``.
"""

from __future__ import annotations

import asyncio
import types
import urllib.parse
from typing import Any

from broker import errors
from broker.client import BrokerClient, TokenSource
from broker.models import ApprovalOut, CredentialOut, EndOut, RenewOut, TaskOut

__all__ = ["AgentClient", "ApprovalPending", "TaskSession", "TokenSource", "UserClient"]


# Raised by ``AgentClient.credential`` for a 202 (a pending approval); defined with the other errors.
ApprovalPending = errors.ApprovalPending


class AgentClient(BrokerClient):
    """Calls made by an agent, authenticated with its JWT-SVID."""

    async def credential(self, task_id: str, grant: str, *, ttl: int | None = None, approval_id: str | None = None,
                         wait_for_approval: float = 0) -> CredentialOut:
        """The grant's credential for the task.

        A high-risk grant is answered with a pending approval. With ``wait_for_approval`` > 0 the client
        long-polls it for up to that many seconds and, once approved, repeats the request with it (the
        approval covers this exact request, once).

        Raises:
            ApprovalPending: the approval is not (yet) approved; ``approval_id`` and ``state`` say which.
            BrokerError subclasses: as the broker answered.
        """
        body: dict[str, Any] = {"grant": grant}
        if ttl is not None:
            body["ttl"] = ttl
        if approval_id is not None:
            body["approval_id"] = approval_id
        payload = await self.call("POST", f"/v1/tasks/{task_id}/credentials", body=body)
        if "approval_id" not in payload:
            return CredentialOut.model_validate(payload)
        pending = ApprovalPending(payload["approval_id"], "pending")
        if wait_for_approval <= 0:
            raise pending
        approval = await self.wait_for_approval(pending.approval_id, timeout=wait_for_approval)
        if approval.state != "approved":
            raise ApprovalPending(approval.id, approval.state)
        return await self.credential(task_id, grant, ttl=ttl, approval_id=approval.id)

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

    def task(self, task_id: str, *, end_on_exit: bool = True) -> TaskSession:
        return TaskSession(self, task_id, end_on_exit=end_on_exit)


class TaskSession:
    """One task seen from its agent: fetch and renew credentials; end the task on leaving the block."""

    def __init__(self, client: AgentClient, task_id: str, *, end_on_exit: bool) -> None:
        self.client = client
        self.task_id = task_id
        self._end_on_exit = end_on_exit
        self.ended: EndOut | None = None

    async def __aenter__(self) -> TaskSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: types.TracebackType | None) -> None:
        if self._end_on_exit:
            self.ended = await self.client.end_task(self.task_id)

    async def credential(self, grant: str, *, ttl: int | None = None, wait_for_approval: float = 0) -> CredentialOut:
        return await self.client.credential(self.task_id, grant, ttl=ttl, wait_for_approval=wait_for_approval)

    async def renew(self, lease_id: str, *, increment: int | None = None) -> RenewOut:
        return await self.client.renew(lease_id, increment=increment)


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
