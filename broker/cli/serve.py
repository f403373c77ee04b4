"""``broker serve``: the HTTP API on ``[server].listen``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import click

from broker.cli.common import EXISTING_FILE, settings_from, setup_logging
from broker.errors import BrokerError

__all__ = ["serve"]


@click.command("serve")
@click.option("--config", "config", type=EXISTING_FILE, required=True, help="The broker's TOML configuration.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="text lines, or one JSON object per line (default: [server].log_format, else text).")
def serve(config: Path, log_level: str, log_format: Literal["text", "json"] | None) -> None:
    """Serve the HTTP API on [server].listen."""
    from broker.app import make_app

    settings = settings_from(config)
    setup_logging(log_level, log_format or settings.server.log_format)
    host, port = settings.server.host_port
    try:
        # broker.server: the access log names method, path (never the query string), status and time, and
        # requests the HTTP parser refuses are answered as problems without repeating their bytes.
        from broker.faults import from_environ
        from broker.server import serve as serve_app

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve_app(make_app(settings, crash=from_environ(os.environ)), host, port))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (a dependency on every platform but Windows): it spends less CPU
    per request than asyncio's own, most where requests come one at a time. None: asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
