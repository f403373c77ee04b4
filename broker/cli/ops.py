"""The operator's commands: ``broker revoke``, ``unlock``, ``revocations``, ``leases``, ``tasks``.

They talk to a running broker over its HTTP API (never to the store or to Vault), through
``broker.client``, authenticated with the operator's OIDC ID token from ``--token-file`` or
``BROKER_TOKEN``. The file has two parts:

1. rendering: pure functions from wire payloads to text (tables, the progress line, the summary),
   unit-tested without a server;
2. the click commands, which glue the client and the rendering together and choose the exit code.

The rules every command keeps (the token never printed, one line on stderr per failure, the exit
codes) are in ``broker.cli.common``, with the shared options. Here in addition: tables go to stdout,
progress and notes to stderr, so ``broker leases --json | jq`` stays clean; exit 3 when a revocation
still has leases Vault has not confirmed after ``--timeout``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Any, Literal

import click

from broker.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_PENDING,
    connection_options,
    error_line,
    exit_code_for,
    failure,
    output_options,
    print_json,
    read_token,
    redact,
    run,
)
from broker.client import BrokerClient
from broker.errors import BrokerError
from broker.timefmt import format_time

__all__ = ["LEASE_COLUMNS", "REVOCATION_COLUMNS", "SELECTORS", "TASK_COLUMNS", "Column", "error_line",
           "exit_code_for", "format_time", "is_complete", "leases", "pending_message", "plural", "progress_line",
           "redact", "render_summary", "render_summary_pairs", "render_table", "revocation_rows", "revocations",
           "revoke", "tasks", "unlock"]

SELECTORS = ("user", "agent", "task", "tenant")

# The first POST asks the server to wait this long for Vault: short, so the operator sees progress
# from the polls instead of a silent terminal while a large revocation runs.
_FIRST_WAIT = 2.0
_POLL_FIRST = 0.25
_POLL_MAX = 2.0
_RETRY_AFTER_MAX = 10.0
# While following, these mean "busy or briefly away" (0: no answer, e.g. a replica restarting): poll again.
_TRANSIENT = frozenset({0, 429, 502, 503, 504})
_PAGE = 500
_REQUEST_TIMEOUT = 30.0

Payload = Mapping[str, Any]


# -- rendering (pure) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column: its header, the payload key it shows, and how.

    ``width`` caps the column (None: never cut, used for ids an operator copies). ``keep_tail`` cuts
    from the left, for SPIFFE IDs whose informative part is the end.
    """

    header: str
    key: str
    kind: Literal["text", "time", "count"] = "text"
    width: int | None = None
    keep_tail: bool = False
    # Shown when ``key`` is empty: a person's display name falls back to their id (older rows have none).
    fallback: str | None = None


LEASE_COLUMNS = (
    Column("LEASE", "id"), Column("TASK", "task"), Column("USER", "user_name", width=32, fallback="user"),
    Column("AGENT", "agent", width=40, keep_tail=True), Column("TENANT", "tenant"), Column("GRANT", "grant"),
    Column("STATE", "state"), Column("ENDS", "revocation"), Column("ISSUED", "issued_at", "time"),
    Column("EXPIRES", "expires_at", "time"), Column("REVOKED", "revoked_at", "time"),
)
TASK_COLUMNS = (
    Column("TASK", "id"), Column("USER", "user_name", width=32, fallback="user"),
    Column("AGENT", "agent", width=40, keep_tail=True),
    Column("ROLE", "role"), Column("TENANT", "tenant"), Column("STATE", "state"),
    Column("CREATED", "created_at", "time"), Column("EXPIRES", "expires_at", "time"),
    Column("ENDED", "ended_at", "time"), Column("REASON", "reason", width=30),
)
REVOCATION_COLUMNS = (
    Column("REVOCATION", "id"), Column("KIND", "kind"), Column("VALUE", "value", width=40, keep_tail=True),
    Column("LOCK", "lock"), Column("STATE", "state"), Column("REVOKED", "progress", "count"),
    Column("PENDING", "pending", "count"), Column("CREATED", "created_at", "time"),
    Column("BY", "created_by_name", width=32, fallback="created_by"), Column("REASON", "reason", width=30),
)


def _cut(text: str, width: int | None, keep_tail: bool) -> str:
    if width is None or len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if keep_tail else text[:width - 1] + "…"


def _cell(row: Payload, col: Column, *, iso: bool, tz: tzinfo | None) -> str:
    value = row.get(col.key)
    if value is None and col.fallback is not None:
        value = row.get(col.fallback)
    if col.kind == "time":
        return format_time(value, iso=iso, tz=tz)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # Control characters could redraw the operator's terminal: a reason is free text from a person.
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return _cut(text, col.width, col.keep_tail)


def render_table(columns: Sequence[Column], rows: Iterable[Payload], *, iso: bool = False,
                 tz: tzinfo | None = None) -> str:
    """Fixed-width columns, two spaces apart, header first; counts right-aligned. No trailing spaces."""
    cells = [[_cell(row, col, iso=iso, tz=tz) for col in columns] for row in rows]
    widths = [max([len(col.header)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if c.kind == "count" else v.ljust(w)
                 for v, w, c in zip(values, widths, columns, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line([c.header for c in columns])] + [line(v) for v in cells])


def plural(n: int, noun: str) -> str:
    """``1 lease``, ``3 leases``, ``1 active revocation``: nouns here all take a plain ``s``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _lock_cell(rev: Payload) -> str:
    if rev.get("lifted_at") is not None:
        return "lifted"
    return "yes" if rev.get("lock") else "no"


def revocation_rows(revocations: Iterable[Payload]) -> list[dict[str, Any]]:
    """Revocations as the table shows them: ``progress`` is ``revoked/leases``, ``lock`` is yes/lifted/no."""
    return [{**r, "progress": f"{r.get('revoked', 0)}/{r.get('leases', 0)}", "lock": _lock_cell(r)}
            for r in revocations]


def progress_line(rev: Payload) -> str:
    """The one-line counter shown while a revocation runs: ``revoked 812/1000 leases (3 pending)``."""
    return f"revoked {rev.get('revoked', 0)}/{rev.get('leases', 0)} leases ({rev.get('pending', 0)} pending)"


def _lock_text(rev: Payload, *, iso: bool, tz: tzinfo | None) -> str:
    if rev.get("lifted_at") is not None:
        return f"lifted at {format_time(rev['lifted_at'], iso=iso, tz=tz)} by {rev.get('lifted_by') or '-'}"
    if rev.get("lock"):
        return f"on: new issuance is blocked until `broker unlock {rev.get('id')}`"
    return "none"


def render_summary(rev: Payload, *, iso: bool = False, tz: tzinfo | None = None) -> str:
    """A revocation as aligned ``name  value`` lines, for the end of ``revoke`` and for ``unlock``."""
    pairs = [
        ("revocation", str(rev.get("id"))),
        ("selector", f"{rev.get('kind')} {rev.get('value')}"),
        ("reason", str(rev.get("reason"))),
        ("by", f"{rev.get('created_by')} at {format_time(rev.get('created_at'), iso=iso, tz=tz)}"),
        ("state", str(rev.get("state"))),
        ("tasks", str(rev.get("tasks", 0))),
        ("leases", f"{rev.get('leases', 0)} live when it started"),
        ("revoked", f"{rev.get('revoked', 0)} confirmed by Vault"),
        ("pending", f"{rev.get('pending', 0)} not yet confirmed"),
        ("lock", _lock_text(rev, iso=iso, tz=tz)),
    ]
    return render_summary_pairs(pairs)


def render_summary_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    """``name  value`` lines, names padded to one width; control characters in values shown as ``?``."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {''.join(ch if ch.isprintable() else '?' for ch in value)}"
                     for name, value in pairs)


def is_complete(rev: Payload) -> bool:
    """True once the broker says done and no lease waits for Vault's confirmation."""
    return rev.get("state") == "done" and not rev.get("pending")


def pending_message(rev: Payload, waited: float) -> str:
    """What the operator reads when ``revoke`` gives up waiting (exit 3): the work is not lost."""
    total = plural(rev.get("leases", 0), "lease")
    return (f"{rev.get('pending', 0)} of {total} not yet confirmed revoked by Vault after {waited:g}s; "
            "the broker keeps retrying them with backoff (revoke_pending). "
            f"Follow with: broker revocations {rev.get('id')}")


# -- glue ----------------------------------------------------------------------------------------------


def _show(rev: Payload, *, as_json: bool, iso: bool) -> None:
    """One revocation on stdout: the API's JSON, or the summary."""
    if as_json:
        print_json(rev)
    else:
        click.echo(render_summary(rev, iso=iso))


class _Progress:
    """The live counter on stderr: redrawn in place on a terminal, one line per change otherwise (logs)."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = ""

    def show(self, rev: Payload) -> None:
        line = progress_line(rev)
        if line == self._last:
            return
        self._last = line
        click.echo(f"\r{line}\x1b[K" if self._tty else line, err=True, nl=not self._tty)

    def close(self) -> None:
        if self._tty and self._last:
            click.echo("", err=True)


async def _follow(client: BrokerClient, rev: dict[str, Any], timeout: float, progress: _Progress,
                  seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Poll ``GET /v1/revocations/{id}`` until complete or ``timeout`` seconds pass; the last state seen.

    A busy or briefly unreachable broker (``_TRANSIENT``) is not a failure: wait (Retry-After) and poll
    again; the revocation goes on in the broker regardless.

    Raises:
        BrokerError: any other failure (as ``broker.client`` raises it).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = _POLL_FIRST
    while not is_complete(rev) and loop.time() < deadline:
        await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
        try:
            rev = await client.call("GET", f"/v1/revocations/{rev['id']}")
        except BrokerError as exc:
            answer = failure(exc, token="")  # only its status and Retry-After are used: the line is never shown
            if answer.status not in _TRANSIENT:
                raise
            delay = min(answer.retry_after or delay, _RETRY_AFTER_MAX)
            continue
        seen.append(rev)
        progress.show(rev)
        delay = min(delay * 1.5, _POLL_MAX)
    return rev


async def _revoke(client: BrokerClient, selector: tuple[str, str], reason: str, *, wait: bool, timeout: float,
                  seen: list[dict[str, Any]]) -> dict[str, Any]:
    """POST the revocation, then (unless ``wait`` is off) follow it; the last state seen.

    Every state received is appended to ``seen`` so that Ctrl-C can still name the revocation.

    Raises:
        BrokerError: the broker refused or could not be reached (as ``broker.client`` raises it).
    """
    progress = _Progress()
    server_wait = min(_FIRST_WAIT, timeout) if wait else 0
    body = {selector[0]: selector[1], "reason": reason, "wait": server_wait}
    try:
        async with client:
            rev = await client.call("POST", "/v1/revocations", body=body, timeout=_REQUEST_TIMEOUT + server_wait)
            seen.append(rev)
            progress.show(rev)
            if wait:
                rev = await _follow(client, rev, timeout, progress, seen)
            return rev
    finally:
        progress.close()


def _selector(values: Mapping[str, str | None]) -> tuple[str, str]:
    """The one ``--user/--agent/--task/--tenant`` given.

    Raises:
        click.UsageError: none or several.
    """
    given = [(k, v) for k, v in values.items() if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --user, --agent, --task, --tenant")
    kind, value = given[0]
    if not value.strip():
        msg = f"--{kind} must not be empty"
        raise click.UsageError(msg)
    return kind, value


# -- commands -------------------------------------------------------------------------------------------


@click.command("revoke")
@click.option("--user", help="Revoke every task this user delegated, and lock the user.")
@click.option("--agent", help="Revoke every task of this agent (SPIFFE ID), and lock the agent.")
@click.option("--task", help="Revoke this one task.")
@click.option("--tenant", help="Revoke every task in this tenant, and lock the tenant.")
@click.option("--reason", required=True, help="Why, for the audit trail.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow until Vault confirms every lease; --no-wait returns once the broker accepted it.")
@click.option("--timeout", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds to follow before giving up with exit 3 (the broker keeps going).")
@output_options
@connection_options
def revoke(user: str | None, agent: str | None, task: str | None, tenant: str | None, reason: str, wait: bool,
           timeout: float, as_json: bool, iso: bool, url: str, token_file: Path | None) -> None:
    """Revoke everything of a user, agent, task or tenant, and follow until Vault confirms it.

    Exit 0 when every lease is confirmed revoked, 3 when some are still pending after --timeout (the
    broker keeps retrying them), 2 when you are not an operator, 130 on Ctrl-C (the revocation goes on).
    """
    selector = _selector({"user": user, "agent": agent, "task": task, "tenant": tenant})
    token = read_token(token_file)
    seen: list[dict[str, Any]] = []
    try:
        rev = run(_revoke(BrokerClient(url, token, timeout=_REQUEST_TIMEOUT), selector, reason, wait=wait,
                          timeout=timeout, seen=seen), token=token)
    except KeyboardInterrupt:
        where = f": follow with `broker revocations {seen[-1]['id']}`" if seen else ""
        click.echo(f"interrupted; the broker carries on with the revocation{where}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    _show(rev, as_json=as_json, iso=iso)
    if not wait:
        if not is_complete(rev):
            click.echo(f"accepted; follow with: broker revocations {rev['id']}", err=True)
        return
    if not is_complete(rev):
        click.echo(pending_message(rev, timeout), err=True)
        sys.exit(EXIT_PENDING)


@click.command("unlock")
@click.argument("revocation_id")
@click.option("--reason", required=True, help="Why the lock is lifted, for the audit trail.")
@output_options
@connection_options
def unlock(revocation_id: str, reason: str, as_json: bool, iso: bool, url: str, token_file: Path | None) -> None:
    """Lift the lock a revocation put on a user, agent or tenant, so new tasks may be issued again."""
    token = read_token(token_file)

    async def go() -> dict[str, Any]:
        async with BrokerClient(url, token, timeout=_REQUEST_TIMEOUT) as client:
            return await client.call("DELETE", f"/v1/revocations/{revocation_id}", body={"reason": reason})

    _show(run(go(), token=token), as_json=as_json, iso=iso)


@click.command("revocations")
@click.argument("revocation_id", required=False)
@click.option("--all", "show_all", is_flag=True, help="Also lifted locks and finished task revocations.")
@output_options
@connection_options
def revocations(revocation_id: str | None, show_all: bool, as_json: bool, iso: bool, url: str,
                token_file: Path | None) -> None:
    """The active revocations (the locks in force) as a table, or one revocation in detail."""
    token = read_token(token_file)

    async def go() -> dict[str, Any]:
        async with BrokerClient(url, token, timeout=_REQUEST_TIMEOUT) as client:
            if revocation_id is not None:
                return await client.call("GET", f"/v1/revocations/{revocation_id}")
            return await client.call("GET", "/v1/revocations", query=None if show_all else {"active": "true"})

    payload = run(go(), token=token)
    if as_json:
        print_json(payload)
    elif revocation_id is not None:
        click.echo(render_summary(payload, iso=iso))
    else:
        rows = revocation_rows(payload.get("revocations") or [])
        click.echo(render_table(REVOCATION_COLUMNS, rows, iso=iso))
        click.echo(plural(len(rows), "revocation" if show_all else "active revocation"), err=True)


def _list_command(name: str, key: str, columns: Sequence[Column], states: Sequence[str],
                  selectors: Sequence[str], doc: str) -> click.Command:
    """``broker leases`` and ``broker tasks``: filters, pages up to --limit, a table or --json."""

    def command(limit: int, page_size: int, state: str | None, as_json: bool, iso: bool, url: str,
                token_file: Path | None, **chosen: str | None) -> None:
        token = read_token(token_file)

        async def go() -> tuple[list[dict[str, Any]], str | None]:
            async with BrokerClient(url, token, timeout=_REQUEST_TIMEOUT) as client:
                return await client.pages(f"/v1/{key}", key, {**chosen, "state": state}, limit, page_size)

        items, after = run(go(), token=token)
        if as_json:
            print_json({key: items, "next_after": after})
            return
        click.echo(render_table(columns, items, iso=iso))
        more = f" (more after {after}: raise --limit)" if after is not None and len(items) >= limit else ""
        click.echo(plural(len(items), key.rstrip("s")) + more, err=True)

    command.__doc__ = doc
    command = connection_options(output_options(command))
    # Hidden: lets the tests walk several pages without creating hundreds of leases.
    command = click.option("--page-size", type=click.IntRange(1, 1000), default=_PAGE, hidden=True)(command)
    command = click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
                           help="At most this many rows (pages are followed).")(command)
    command = click.option("--state", type=click.Choice(states), help="Only this state.")(command)
    for selector in reversed(selectors):
        command = click.option(f"--{selector}", selector, help=f"Only this {selector}.")(command)
    return click.command(name)(command)


leases = _list_command("leases", "leases", LEASE_COLUMNS,
                       ("active", "revoke_pending", "revoked", "expired", "released"), SELECTORS,
                       "Leases, live and past, oldest first.")
tasks = _list_command("tasks", "tasks", TASK_COLUMNS, ("active", "ended", "expired", "revoked"),
                      ("user", "agent", "tenant"), "Tasks, live and past, oldest first.")

