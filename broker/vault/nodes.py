"""Which Vault node to ask next: pure decisions for a client of a cluster (integrated storage, N nodes).

A cluster has one active node. A standby forwards what it cannot serve to the active node, but while
the active node is dead or being elected a standby answers 500 "local node not active but active
cluster node not found"; a sealed node answers 503; a node that just restarted briefly answers 500
"no audit backend succeeded"; a dead node refuses the connection; a standby without request forwarding
answers 307 with the active node's address (never followed: the token would go along).

The one rule that matters for a secrets broker: **a request is sent again to another node only when it
certainly did not execute.** A credential read or a token create that reached the active node and then
lost its answer (a reset connection, a timeout, a proxy's 502, a 500) may have created the credential;
sending it again could create a second one for the same request. Such an answer is the caller's to
settle (``broker.leases`` abandons the intent and revokes the issuance token, which takes whatever it
read with it). Requests that change nothing, or change it the same way twice (lookups, renewals,
revocations), may go elsewhere after any failure.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

__all__ = ["Next", "NodeOrder", "after_status", "after_transport"]


class Next(Enum):
    """What a client does after one node's answer."""

    ANSWER = "answer"  # give this answer (success or error) to the caller
    ELSEWHERE = "elsewhere"  # the request did not execute here, or may safely run twice: try another node


# The node cannot take requests now; nothing was executed: standby (429), DR secondary (472), performance
# standby (473), not initialised (501), sealed (503).
_NOT_SERVING: Final = frozenset({429, 472, 473, 501, 503})
# Answers from in front of a node (a proxy, a load balancer): the request may or may not have reached it.
_MAYBE_REACHED: Final = frozenset({502, 504})
# 500s that a standby gives before it forwards anything: no active node to forward to.
_NO_LEADER: Final = ("local node not active", "active cluster node not found")
# A node that just restarted refuses requests until its audit devices are open: fail closed, but this
# text does not say whether the request or the response record failed, so only a safe request moves on.
_NO_AUDIT: Final = "no audit backend succeeded"


def after_status(status: int, errors: str, *, idempotent: bool) -> Next:
    """Decide after an HTTP answer ``status`` whose ``errors`` (Vault's, joined) are given."""
    if status < 300:
        return Next.ANSWER
    if status in _NOT_SERVING or 300 <= status < 400:
        return Next.ELSEWHERE
    if status == 500 and any(text in errors for text in _NO_LEADER):
        return Next.ELSEWHERE
    if idempotent and (status in _MAYBE_REACHED or (status == 500 and _NO_AUDIT in errors)):
        return Next.ELSEWHERE
    return Next.ANSWER


def after_transport(*, connected: bool, idempotent: bool, config_error: bool) -> Next:
    """Decide after a transport failure. ``connected``: a connection was made (the request may have been
    sent); ``config_error``: a TLS or URL problem, which another node does not fix (and must be seen)."""
    if config_error:
        return Next.ANSWER
    if not connected or idempotent:
        return Next.ELSEWHERE
    return Next.ANSWER


class NodeOrder:
    """The node to try first (the one last seen executing a request), and the one after a failed one."""

    def __init__(self, count: int) -> None:
        if count < 1:
            msg = "a Vault client needs at least one node"
            raise ValueError(msg)
        self._count = count
        self.active = 0

    def after(self, node: int) -> int:
        """The node to try after ``node`` failed to take a request."""
        return (node + 1) % self._count

    def answered(self, node: int) -> None:
        """``node`` executed a request: it is (or reaches) the active node; start there next time."""
        self.active = node
