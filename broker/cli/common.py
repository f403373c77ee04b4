"""What the ``broker`` commands share: their options, the settings and token they read, how a failure ends.

Rules this file keeps (for every command):

- Settings are read here, once per command (``load_settings(os.environ, path)``), and passed down.
  No other module reads the environment.
- The token is never printed and never part of an error line. There is deliberately no ``--token``
  option: a token on the command line is visible to every user of the machine through ``ps``.
- Every failure ends as one line on stderr and an exit code, never a traceback with a token in it.
- Exit codes: 0 done; 1 an error; 2 not authenticated or not allowed (401/403), or bad usage (click's
  own 2); 3 a revocation still has leases Vault has not confirmed (``broker revoke``); 130 Ctrl-C.
- The commands that talk to a running broker do so through ``broker.client`` only; this file turns
  what that client raises into the error line (``failure``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from broker.client import (
    BadResponse,
    ProblemResponse,
    Unreachable,
    decode_problem,
    problem_of,
)
from broker.config import Settings, load_settings
from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.logs import LogFormat

DEFAULT_URL = "http://127.0.0.1:8400"

EXIT_ERROR = 1
EXIT_DENIED = 2
EXIT_PENDING = 3
EXIT_INTERRUPTED = 130

EXISTING_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


# -- settings and logging -----------------------------------------------------------------------------


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    """Logs on stderr: text lines, or one JSON object per line (``broker.logs``)."""
    from broker.logs import setup_logging as setup

    setup(level, fmt)


def settings_from(config: Path | None, *, vault_setup: bool = False) -> Settings:
    """The broker's settings from the environment and ``config`` (``vault_setup``: see ``load_settings``).

    Raises:
        click.ClickException: the configuration is invalid (exit 1).
    """
    try:
        return load_settings(os.environ, config, vault_setup=vault_setup)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc


# -- the token and the shared options ---------------------------------------------------------------------


def read_token(token_file: Path | None) -> str:
    """The caller's token: ``--token-file`` first, then ``BROKER_TOKEN``.

    Raises:
        click.UsageError: neither is set, or the file cannot be read or is empty (exit 2).
    """
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            msg = f"cannot read the token file {token_file}: {exc.strerror}"
            raise click.UsageError(msg) from exc
        if not token:
            msg = f"the token file {token_file} is empty"
            raise click.UsageError(msg)
        return token
    token = os.environ.get("BROKER_TOKEN", "").strip()
    if not token:
        raise click.UsageError("no token: set BROKER_TOKEN or pass --token-file (your OIDC ID token)")
    return token


def connection_options(f: F) -> F:
    """``--url`` and ``--token-file``: which broker, and who asks."""
    f = click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), envvar="BROKER_TOKEN_FILE",
                     help="File holding your OIDC ID token (else env BROKER_TOKEN).")(f)
    f = click.option("--url", envvar="BROKER_URL", default=DEFAULT_URL, show_default=True,
                     help="The broker's base URL (env BROKER_URL).")(f)
    return f


def iso_option(f: F) -> F:
    """``--iso``: times as ISO 8601 with offset (``broker.timefmt.format_time``)."""
    return click.option("--iso", is_flag=True, help="Times as ISO 8601 with offset instead of local HH:MM:SS.")(f)


def output_options(f: F) -> F:
    """``--json`` and ``--iso``."""
    f = iso_option(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine output: the API's JSON on stdout.")(f)
    return f


def print_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2))


# -- failures (pure) ------------------------------------------------------------------------------------


def problem_line(problem: ProblemResponse) -> str:
    """``error: <title>: <detail> (code)``, falling back on the reason phrase and status without a problem body."""
    title = problem.title or problem.reason or f"HTTP {problem.status}"
    return f"error: {title}: {problem.detail or title} ({problem.code or 'http_error'})"


def error_line(status: int, payload: object, reason: str = "") -> str:
    """The error line for an error answer's status, decoded body and reason phrase."""
    return problem_line(decode_problem(status, payload, reason=reason))


def exit_code_for(status: int) -> int:
    """2 when the broker does not know or does not allow the caller (401/403), else 1."""
    return EXIT_DENIED if status in (401, 403) else EXIT_ERROR


def redact(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` replaced: the last guard before anything is printed."""
    return text.replace(secret, "<redacted>") if secret else text


@dataclass(frozen=True)
class Failure:
    """A client failure ready to print: ``line`` for stderr, ``exit_code`` for the process.

    ``status`` is the HTTP status (0: no answer); ``retry_after`` the broker's Retry-After in seconds.
    """

    line: str
    exit_code: int
    status: int = 0
    retry_after: float | None = None


def failure(exc: BrokerError, token: str) -> Failure:
    """What ``broker.client`` raised, as the line and exit code a command ends with; ``token`` never shows."""
    problem = problem_of(exc)
    if problem is not None:
        return Failure(redact(problem_line(problem), token), exit_code_for(problem.status), problem.status,
                       problem.retry_after)
    if isinstance(exc, Unreachable):
        line = f"error: cannot reach the broker at {exc.url}: {exc.reason} (unreachable)"
        return Failure(redact(line, token), EXIT_ERROR)
    if isinstance(exc, BadResponse):
        return Failure(redact(f"error: unexpected answer from the broker: {exc} (bad_response)", token), EXIT_ERROR,
                       exc.status)
    return Failure(redact(f"error: {exc} ({exc.code})", token), EXIT_ERROR)


def run(coro: Coroutine[Any, Any, T], *, token: str) -> T:
    """Run the command's coroutine; a ``BrokerError`` ends the process with its line on stderr and exit code."""
    try:
        return asyncio.run(coro)
    except BrokerError as exc:
        end = failure(exc, token)
        click.echo(end.line, err=True)
        sys.exit(end.exit_code)

