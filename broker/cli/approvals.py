"""``broker approvals list|approve|deny``: the approver's commands, over the HTTP API.

Each sends the approver's own OIDC ID token (``--token-file`` or ``BROKER_TOKEN``, never an option: see
``broker.cli.common``). The broker decides whether that sign-in is fresh enough
(``people.approval_max_auth_age``), exactly as for the API and the console: this command never judges it
itself. When the broker asks for a fresher sign-in (401 ``insufficient_user_authentication``), the
command says so in words and how old the sign-in may be, and exits 2.

A table for people (stdout; counts on stderr), ``--json`` for machines (the API's JSON on stdout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from broker.cli.common import (
    EXIT_DENIED,
    connection_options,
    failure,
    output_options,
    print_json,
    read_token,
    redact,
)
from broker.cli.ops import Column, plural, render_summary_pairs, render_table
from broker.client import BrokerClient
from broker.errors import BrokerError, InsufficientAuthentication
from broker.timefmt import format_time

__all__ = ["APPROVAL_COLUMNS", "approvals", "fresh_sign_in_message", "render_approval"]

APPROVAL_COLUMNS = (
    Column("APPROVAL", "id"), Column("STATE", "state"), Column("GRANT", "grant"), Column("TENANT", "tenant"),
    Column("USER", "user_name", width=32, fallback="user"), Column("AGENT", "agent", width=40, keep_tail=True),
    Column("TTL", "ttl", "count"), Column("VOTES", "votes_cell", "count"), Column("EXPIRES", "expires_at", "time"),
    Column("WHY", "task_reason", width=30),
)
_STATES = ("pending", "approved", "denied", "expired", "consumed")


def _rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**a, "votes_cell": f"{sum(v.get('decision') == 'approve' for v in a.get('votes') or [])}/"
                                f"{a.get('required', 1)}"} for a in items]


def render_approval(a: dict[str, Any], *, iso: bool = False) -> str:
    """One approval as aligned ``name  value`` lines: what the approver decides on."""
    pairs = [("approval", str(a.get("id"))), ("state", str(a.get("state"))), ("grant", f"{a.get('grant')} "
             f"({a.get('path')}, ttl {a.get('ttl')}s)"), ("task", f"{a.get('task')} ({a.get('tenant')})"),
             ("user", str(a.get("user_name") or a.get("user"))), ("agent", str(a.get("agent"))),
             ("why", str(a.get("task_reason") or "-")), ("expires", format_time(a.get("expires_at"), iso=iso))]
    for v in a.get("votes") or []:
        pairs.append(("vote", f"{v.get('decision')} by {v.get('approver_name') or v.get('approver')}: "
                              f"{v.get('reason')}"))
    return render_summary_pairs(pairs)


def fresh_sign_in_message(max_age: int | None) -> str:
    """What an approver reads when the broker wants a fresher sign-in (the API's rule, stated, not applied here)."""
    age = f"no more than {max_age} s ago" if max_age else "recently"
    return (f"error: approving needs a fresh sign-in: sign in to your identity provider again (the ID token's "
            f"auth_time must be {age}) and pass the new token with --token-file "
            "(insufficient_user_authentication)")


def _fail(exc: BrokerError, token: str) -> None:
    """End the command on a client error: a stale sign-in in words, anything else as the shared error line."""
    if isinstance(exc, InsufficientAuthentication):
        # The broker's WWW-Authenticate max_age, decoded by broker.client onto the error.
        click.echo(redact(fresh_sign_in_message(getattr(exc, "max_age", None)), token), err=True)
        raise SystemExit(EXIT_DENIED)
    end = failure(exc, token)
    click.echo(end.line, err=True)
    raise SystemExit(end.exit_code)


async def _call(url: str, token: str, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, str] | None = None) -> dict[str, Any]:
    async with BrokerClient(url, token) as broker:
        return await broker.call(method, path, body=body, query=query)


def _run(url: str, token: str, method: str, path: str, *, body: dict[str, Any] | None = None,
         query: dict[str, str] | None = None) -> dict[str, Any]:
    import asyncio

    try:
        return asyncio.run(_call(url, token, method, path, body, query))
    except BrokerError as exc:
        _fail(exc, token)
        raise AssertionError("unreachable") from exc


@click.group("approvals")
def approvals() -> None:
    """High-risk grants waiting for people: list them, approve or deny (approvers, with a fresh sign-in)."""


@approvals.command("list")
@click.option("--state", type=click.Choice(_STATES), default="pending", show_default=True,
              help="Which approvals (pending: the queue).")
@click.option("--all", "show_all", is_flag=True, help="Every approval, whatever its state.")
@output_options
@connection_options
def list_cmd(state: str, show_all: bool, as_json: bool, iso: bool, url: str, token_file: Path | None) -> None:
    """The approvals queue, with what each would unlock (approvers and auditors)."""
    token = read_token(token_file)
    payload = _run(url, token, "GET", "/v1/approvals", query=None if show_all else {"state": state})
    if as_json:
        print_json(payload)
        return
    items = list(payload.get("approvals") or [])
    click.echo(render_table(APPROVAL_COLUMNS, _rows(items), iso=iso))
    click.echo(plural(len(items), "approval" if show_all else f"{state} approval"), err=True)


def _decide(decision: str, approval_id: str, reason: str, as_json: bool, iso: bool, url: str,
            token_file: Path | None) -> None:
    token = read_token(token_file)
    payload = _run(url, token, "POST", f"/v1/approvals/{approval_id}",
                   body={"decision": decision, "reason": reason})
    if as_json:
        print_json(payload)
        return
    click.echo(render_approval(payload, iso=iso))


@approvals.command("approve")
@click.argument("approval_id")
@click.option("--reason", required=True, help="Why, for the audit trail.")
@output_options
@connection_options
def approve(approval_id: str, reason: str, as_json: bool, iso: bool, url: str, token_file: Path | None) -> None:
    """Approve APPROVAL_ID (your vote; N-of-M grants need more than one approver)."""
    _decide("approve", approval_id, reason, as_json, iso, url, token_file)


@approvals.command("deny")
@click.argument("approval_id")
@click.option("--reason", required=True, help="Why, for the audit trail.")
@output_options
@connection_options
def deny(approval_id: str, reason: str, as_json: bool, iso: bool, url: str, token_file: Path | None) -> None:
    """Deny APPROVAL_ID (one denial decides)."""
    _decide("deny", approval_id, reason, as_json, iso, url, token_file)
