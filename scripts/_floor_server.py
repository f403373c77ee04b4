"""The floor under the broker's cost per credential: what serving one credential costs with nothing of the
broker's own around it (``scripts/bench_issue.py --floor``).

An aiohttp server on uvloop, as ``broker serve`` runs (no access log, no middleware), with one route:
``POST /floor`` ``{"path", "method", "data"}`` and the task token in ``X-Task-Token``. It makes the Vault
call the broker makes (``VaultClient.read_credential``: the broker's own HTTP/1.1 transport) and answers
the secret's data as JSON, as the broker does. No identity check, store, journal, audit or metrics: the
broker's CPU per credential minus this one's is what the broker's own work costs.

Loopback only; never a server to keep running: it serves until SIGTERM.

    python scripts/_floor_server.py --vault http://127.0.0.1:8200 --port 8500
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from broker.vault import VaultClient

VAULT = web.AppKey("vault", VaultClient)


async def floor(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    secret = await request.app[VAULT].read_credential(body["path"], token=request.headers["X-Task-Token"],
                                                      method=body["method"], data=body.get("data"))
    return web.json_response({"lease_id": "lse_floor", "renewable": secret.renewable,
                              "data": {"token": secret.auth.client_token.reveal()} if secret.auth is not None
                              else secret.data})


async def main(vault_addr: str, port: int) -> None:
    async with aiohttp.ClientSession() as session:
        app = web.Application()
        app[VAULT] = VaultClient(session, vault_addr, timeout=30)
        app.router.add_post("/floor", floor)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vault", required=True, help="OpenBao's address (loopback)")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args.vault, args.port))
