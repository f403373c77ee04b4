"""``--log-format json``: one JSON object per line, with the request's fields, and never a secret.

The broker is served as ``broker serve`` serves it (``broker.server.BrokerRunner``: its access log), its
log records formatted by ``broker.logs.JsonFormatter`` into a buffer. Canaries (a token in the query
string, a password in a body, tokens in headers) and the real secrets of a real flow (the agent's SVID,
the user's ID token, the database password Vault issued) must never appear in that output.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from broker.config import load_settings
from broker.logs import JsonFormatter
from tests.api.test_opscli import REPO, serve
from tests.conftest import USER, BrokerSite, bearer

TOKEN_CANARY = "eyJcanaryTOKEN.c2VjcmV0LXRva2Vu.Q0FOQVJZ"
PASSWORD_CANARY = "pw-CANARY-hunter2-7f3a"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Every record of the process, formatted as ``--log-format json`` formats it."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    out = []
    for line in buffer.getvalue().splitlines():
        parsed = json.loads(line)  # every line is one JSON object
        assert isinstance(parsed, dict), line
        out.append(parsed)
    return out


class TestJsonLogs:
    async def test_access_lines_carry_the_request_fields(self, site: BrokerSite, json_log: io.StringIO) -> None:
        """A task start and a credential are two access lines naming route, status, task, agent, user and time."""
        user_token = site.ids.user(USER, ("support",))
        async with serve(site, site.settings) as live, aiohttp.ClientSession() as http:
            resp = await http.post(f"{live.url}/v1/tasks", headers=bearer(user_token),
                                   json={"agent": "spiffe://example.org/agent/support-1", "role": "support-triage",
                                         "ttl": "10m", "reason": "ticket 7"})
            assert resp.status == 201, await resp.text()
            task = await resp.json()
            resp = await http.post(f"{live.url}/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                   headers=bearer(site.ids.agent()))
            assert resp.status == 200
            password = (await resp.json())["data"]["password"]
        access = [x for x in lines(json_log) if x["logger"] == "aiohttp.access"]
        start = next(x for x in access if x["route"] == "/v1/tasks")
        assert start["status"] == 201 and start["user"] == USER and start["task"] == task["id"]
        assert isinstance(start["request_id"], str) and len(start["request_id"]) == 16
        assert isinstance(start["duration_ms"], float) and start["duration_ms"] > 0
        issue = next(x for x in access if x["route"] == "/v1/tasks/{task_id}/credentials")
        assert issue["status"] == 200 and issue["task"] == task["id"]
        assert issue["agent"] == "spiffe://example.org/agent/support-1" and "user" not in issue
        text = json_log.getvalue()
        assert password not in text and user_token not in text

    async def test_no_canary_reaches_the_log(self, site: BrokerSite, json_log: io.StringIO) -> None:
        """A token in the query string, a password in a body and tokens in headers never appear in a log line."""
        settings = load_settings({"BROKER_STORE_URL": site.settings.store.url, "BROKER_SERVER_LOG_FORMAT": "json"},
                                 site.root / "broker.toml")
        assert settings.server.log_format == "json"
        async with serve(site, settings) as live, aiohttp.ClientSession() as http:
            await http.get(f"{live.url}/v1/health?token={TOKEN_CANARY}&password={PASSWORD_CANARY}")
            await http.get(f"{live.url}/v1/tasks/{TOKEN_CANARY}", headers=bearer(TOKEN_CANARY))
            await http.post(f"{live.url}/v1/tasks?access_token={TOKEN_CANARY}",
                            json={"agent": "a", "role": "r", "ttl": 60, "reason": "x", "password": PASSWORD_CANARY},
                            headers={**bearer(site.ids.user()), "X-Vault-Token": TOKEN_CANARY})
            await http.post(f"{live.url}/v1/tasks", data=f"password={PASSWORD_CANARY}",
                            headers={"Content-Type": "application/x-www-form-urlencoded",
                                     "Cookie": f"broker_session={TOKEN_CANARY}"})
            await http.get(f"{live.url}/console/login?token={TOKEN_CANARY}")
        records = lines(json_log)
        access = [x for x in records if x["logger"] == "aiohttp.access"]
        assert len(access) >= 5
        assert {"/v1/health", "/v1/tasks/{task_id}", "/v1/tasks", "/console/login"} <= {x["route"] for x in access}
        # The path segment was not a task id: the line names no task.
        assert all("task" not in x for x in access if x["route"] == "/v1/tasks/{task_id}")
        text = json_log.getvalue()
        for canary in (TOKEN_CANARY, PASSWORD_CANARY, "c2VjcmV0LXRva2Vu", "hunter2"):
            assert canary not in text

    def test_a_newline_in_a_message_stays_in_its_line(self) -> None:
        """A CR-LF in a logged value is escaped: one record, one line, one object."""
        record = logging.LogRecord("broker.x", logging.WARNING, __file__, 1, "bad %s", ("a\r\nforged",), None)
        out = JsonFormatter().format(record)
        assert "\n" not in out and json.loads(out)["message"] == "bad a\r\nforged"


class TestServeCommand:
    async def test_broker_serve_log_format_json(self, site: BrokerSite, tmp_path: Path) -> None:
        """`broker serve --log-format json`: every stderr line is one JSON object, the access line among them."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(BROKER_SERVER_LISTEN=f"127.0.0.1:{port}", BROKER_STORE_URL=f"sqlite:///{tmp_path / 'b.db'}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "serve", "--config", str(site.root / "broker.toml"), "--log-format", "json",
            env=env, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/v1/health?token={TOKEN_CANARY}") as resp:
                            assert resp.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
                else:
                    raise AssertionError("broker serve did not start")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        records = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
        assert any(r.get("route") == "/v1/health" and r.get("status") == 200 for r in records), records
        assert TOKEN_CANARY not in err.decode()
