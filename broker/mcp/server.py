"""The MCP server around ``TaskTools``: the official ``mcp`` SDK's ``MCPServer``, stdio or streamable HTTP.

Rules this file keeps:
- Every tool's answer, success or error, passes through the task session's ``Redactor`` before it leaves,
  and so does every log line (a formatter over the whole record, traceback included): the secrets it
  knows are every credential this process obtained and the SVID it authenticates with.
- A failure is an MCP tool error (``isError``) with the broker's error code and a message written for
  the model; anything unexpected is logged (redacted) and answered with its class name only.
- A high-risk grant answers "waiting for approval" with the approval id at once, never blocking.
- Logs go to stderr only: on stdio, stdout is the protocol.
- Streamable HTTP listens on a loopback address only: whoever reaches it uses the task's credentials.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from broker import errors
from broker.connectors import Redactor
from broker.endpoints import is_loopback
from broker.mcp.tools import TaskTools

__all__ = ["RedactingFormatter", "build_server", "configure_logging", "serve"]

log = logging.getLogger(__name__)

_INSTRUCTIONS = (
    "Tools for one task delegated to this agent by a person. They use the task's credentials inside this "
    "server and return results, never credentials. Call list_grants first: each grant names the tool that "
    "uses it. Results are cut at a row and byte limit (truncated: true). A high-risk grant answers "
    "'waiting for approval' with an approval id: ask the user to have it approved, then call again. "
    "Once the task has ended every tool answers an error."
)

GrantArg = Annotated[str, Field(description="A grant name from list_grants", max_length=63)]
ApprovalArg = Annotated[str | None, Field(default=None, max_length=64,
                                          description="The approval id a 'waiting for approval' answer gave")]


class RedactingFormatter(logging.Formatter):
    """Formats a record, traceback included, then removes every secret the redactor knows from the text."""

    def __init__(self, redactor: Redactor, fmt: str | None = None) -> None:
        super().__init__(fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor.text(super().format(record))


def configure_logging(redactor: Redactor, *, level: int = logging.INFO) -> None:
    """One stderr handler on the root logger with the redacting formatter (the SDK's own then adds none)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


async def _answer(tools: TaskTools, work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``work``'s result, redacted; every failure as a ``ToolError`` (an MCP ``isError`` result), redacted."""
    try:
        result = await work()
    except errors.ApprovalPending as exc:
        msg = (f"waiting for approval: approval_id {exc.approval_id} is {exc.state}. Ask the user to have "
               "an approver decide, then call this tool again (with approval_id).")
        raise ToolError(msg) from None
    except errors.BrokerError as exc:
        raise ToolError(tools.redactor.text(f"{exc.code}: {exc}")) from None
    except Exception as exc:
        log.exception("tool failed unexpectedly")
        raise ToolError(f"internal error ({type(exc).__name__}); see the server's log") from None
    redacted: dict[str, Any] = tools.redactor.value(result)
    return redacted


def build_server(tools: TaskTools) -> MCPServer[Any]:
    """An ``MCPServer`` with the four tools over ``tools``."""
    server: MCPServer[Any] = MCPServer("agent-broker", instructions=_INSTRUCTIONS, log_level="INFO")
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    acting = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)

    @server.tool(annotations=read_only)
    async def list_grants() -> dict[str, Any]:
        """The task's grants: name, risk (high = needs a person's approval), how its credential ends
        (revocable, expiry-only, static), where it is used, and which tool uses it."""
        return await _answer(tools, tools.list_grants)

    @server.tool(annotations=acting)
    async def sql_query(grant: GrantArg,
                        sql: Annotated[str, Field(description="One SQL statement", max_length=65536)],
                        approval_id: ApprovalArg = None) -> dict[str, Any]:
        """Run one SQL statement on a PostgreSQL or MySQL grant's database, as the grant's own user.
        Returns columns and rows (cut at the server's row and byte limits: truncated), or the status."""
        return await _answer(tools, lambda: tools.sql_query(grant, sql, approval_id))

    @server.tool(annotations=acting)
    async def redis_command(grant: GrantArg,
                            command: Annotated[str, Field(description="One Redis command line, shell-quoted, "
                                                                      "e.g. GET \"session:42\"", max_length=65536)],
                            approval_id: ApprovalArg = None) -> dict[str, Any]:
        """Run one Redis command on a Redis grant's server, as the grant's own ACL user."""
        return await _answer(tools, lambda: tools.redis_command(grant, command, approval_id))

    @server.tool(annotations=acting)
    async def http_request(grant: GrantArg,
                           method: Annotated[str, Field(description="GET, HEAD, POST, PUT, PATCH or DELETE")],
                           url: Annotated[str, Field(description="A path on the grant's endpoint (/v1/...) or a "
                                                                 "URL on one of its allowed hosts",
                                                     max_length=8192)],
                           body: Annotated[str | dict[str, Any] | list[Any] | None, Field(
                               default=None, description="The request body: text, or JSON (sent as "
                                                         "application/json)")] = None,
                           approval_id: ApprovalArg = None) -> dict[str, Any]:
        """Send one HTTP request with the grant's token or client certificate added by this server."""
        text = body if body is None or isinstance(body, str) else json.dumps(body)
        return await _answer(tools, lambda: tools.http_request(grant, method, url, text, approval_id))

    return server


async def serve(tools: TaskTools, *, transport: Literal["stdio", "streamable-http"] = "stdio",
                host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve until the host closes stdin (stdio) or the process is stopped; then close every connection.

    Raises:
        ConfigError: streamable HTTP on an address that is not loopback.
    """
    server = build_server(tools)
    try:
        if transport == "stdio":
            await server.run_stdio_async()
        else:
            if not is_loopback(host):
                msg = "broker mcp listens on a loopback address only (anyone who reaches it uses the task)"
                raise errors.ConfigError(msg)
            import uvicorn

            app = server.streamable_http_app(host=host)
            # log_config=None: uvicorn's records reach the root logger and its redacting formatter.
            config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False)
            await uvicorn.Server(config).serve()
    finally:
        await tools.close()
