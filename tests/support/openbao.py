"""Test helpers around ``broker.dev.stack``: a dev OpenBao per test session, and CLI calls against it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from broker.dev.stack import DevOpenBao, find_bao_binary, start_dev_openbao


def start_test_openbao(workdir: Path) -> DevOpenBao:
    """Start a dev OpenBao (free port, random root token) in ``workdir``.

    Its device ``main`` writes accessors in plain text, as ``broker dev`` does; a second device (``hmac``,
    ``DevOpenBao.hmac_audit_log``) keeps Vault's default, for tests of a broker reading such a device.
    """
    return start_dev_openbao(workdir, startup_timeout=30, hmac_device=True)


async def bao_cli(server: DevOpenBao, *args: str, timeout: float = 30) -> str:
    """Run the real ``bao`` CLI against ``server`` with its root token; return stdout.

    Raises:
        RuntimeError: the command failed (stderr in the message).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["BAO_ADDR"] = server.addr
    env["BAO_TOKEN"] = server.root_token.reveal()
    proc = await asyncio.create_subprocess_exec(
        find_bao_binary(), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        msg = f"bao {' '.join(args)} failed: {err.decode(errors='replace')[-1000:]}"
        raise RuntimeError(msg)
    return out.decode()
