"""``broker mcp``: the Model Context Protocol server for one task (``broker.mcp``), as an MCP host starts it.

    broker mcp --url https://broker.internal:8400 --task TASK_ID --svid-file /run/spiffe/svid.jwt

The agent's identity is its JWT-SVID: from a file that something else rotates (``--svid-file``), or from
the SPIFFE Workload API (``--spiffe-socket``). Nothing secret is taken on the command line. On stdio,
stdout is the protocol and the log goes to stderr.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Literal

import click

from broker.config import ServerSettings
from broker.errors import BrokerError
from broker.mcp.bounds import Limits

__all__ = ["mcp"]


@click.command("mcp")
@click.option("--url", required=True, envvar="BROKER_URL", help="The broker's base URL.")
@click.option("--task", "task_id", required=True, help="The task whose grants the tools use.")
@click.option("--svid-file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file holding the agent's JWT-SVID, re-read whenever it changes.")
@click.option("--spiffe-socket", help="The SPIFFE Workload API socket (unix:///run/spire/agent.sock) instead.")
@click.option("--audience", default="agent-broker", show_default=True,
              help="The audience of SVIDs fetched from the Workload API (the broker's [server].audience).")
@click.option("--transport", type=click.Choice(["stdio", "streamable-http"]), default="stdio", show_default=True)
@click.option("--listen", default="127.0.0.1:8765", show_default=True,
              help="HOST:PORT for streamable HTTP (a loopback address only).")
@click.option("--max-rows", type=click.IntRange(1, 100_000), default=Limits.max_rows, show_default=True)
@click.option("--max-bytes", type=click.IntRange(1024, 16 * 1024 * 1024), default=Limits.max_bytes,
              show_default=True, help="Bytes of JSON a result may hold.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=Limits.timeout, show_default=True,
              help="Seconds one statement, command or request may run.")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True),
              help="CA certificates that https endpoints are verified against (default: the system's).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def mcp(url: str, task_id: str, svid_file: Path | None, spiffe_socket: str | None, audience: str,
        transport: Literal["stdio", "streamable-http"], listen: str, max_rows: int, max_bytes: int, timeout: float,
        ca_file: str | None, log_level: str) -> None:
    """Serve MCP tools that use one task's credentials and never show them."""
    if (svid_file is None) == (spiffe_socket is None):
        raise click.UsageError("give exactly one of --svid-file and --spiffe-socket")
    try:
        host, port = ServerSettings(listen=listen, audience=audience).host_port
    except ValueError as exc:
        raise click.BadParameter("must be HOST:PORT", param_hint="--listen") from exc
    limits = Limits(max_rows=max_rows, max_bytes=max_bytes, timeout=timeout)
    try:
        asyncio.run(_serve(url, task_id, svid_file, spiffe_socket, audience, transport, host, port, limits, ca_file,
                           getattr(logging, log_level.upper())))
    except BrokerError as exc:
        raise click.ClickException(f"{exc.code}: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


async def _serve(url: str, task_id: str, svid_file: Path | None, spiffe_socket: str | None, audience: str,
                 transport: Literal["stdio", "streamable-http"], host: str, port: int, limits: Limits,
                 ca_file: str | None, level: int) -> None:
    from broker.mcp.server import configure_logging, serve
    from broker.mcp.svid import SvidFile, WorkloadApiSvid
    from broker.mcp.tools import TaskTools
    from broker.sdk import AgentClient

    source = SvidFile(svid_file) if svid_file is not None else WorkloadApiSvid.connect(str(spiffe_socket), audience)

    async def svid() -> str:
        token = await source()
        tools.redactor.add(token)  # the SVID is a bearer token for the broker: never shown either
        return token

    await source()  # fail at start, not at the first tool call, when there is no SVID to be had
    async with AgentClient(url, svid) as agent:
        tools = TaskTools(agent.task(task_id, end_on_exit=False), limits, ca_file=ca_file)
        configure_logging(tools.redactor, level=level)
        logging.getLogger(__name__).info("broker mcp for task %s on %s", task_id, transport)
        try:
            await serve(tools, transport=transport, host=host, port=port)
        finally:
            if isinstance(source, WorkloadApiSvid):
                source.close()
