"""A 3-node OpenBao cluster on integrated storage (raft), on loopback, for tests: init, unseal, join, kill, restart.

Each node has its own config (``storage "raft"`` with its ``node_id``, its listener and cluster ports) and
its own file audit device, named after the node (``node1``...): devices declared in config land in the
cluster's shared audit table, and a second node declaring the same name with another file refuses to
become active (shared/openbao-notes.md). Joined nodes are non-voters until autopilot promotes them;
``start`` shortens that (``server_stabilization_time``) and waits until all three vote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from broker.dev.stack import _free_port_pair, _hcl_string, _http, find_bao_binary
from broker.vault import Sensitive


@dataclass
class RaftNode:
    name: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    @property
    def config(self) -> Path:
        return self.workdir / "openbao.hcl"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self) -> None:
        data = self.workdir / "raft"
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        cluster = f"127.0.0.1:{self.port + 1}"
        self.config.write_text(
            f'storage "raft" {{\n  path = {_hcl_string(str(data))}\n  node_id = "{self.name}"\n'
            "  performance_multiplier = 1\n}\n"
            f'listener "tcp" {{\n  address = {_hcl_string(f"127.0.0.1:{self.port}")}\n'
            f"  cluster_address = {_hcl_string(cluster)}\n  tls_disable = true\n}}\n"
            f"api_addr = {_hcl_string(self.addr)}\n"
            f"cluster_addr = {_hcl_string('https://' + cluster)}\n"
            f'audit "file" "{self.name}" {{\n  options {{\n    file_path = {_hcl_string(str(self.audit_log))}\n'
            "  }\n}\n",
            encoding="utf-8",
        )

    def spawn(self, binary: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        self._log = (self.workdir / "openbao.log").open("ab")
        self.process = subprocess.Popen(
            [binary, "server", f"-config={self.config}"], stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=self.workdir, env=env, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            if _http("GET", self.addr + "/v1/sys/health", timeout=1)[0]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def health(self) -> int:
        """``sys/health``'s status: 200 active, 429 standby, 503 sealed, 0 unreachable."""
        return _http("GET", self.addr + "/v1/sys/health", timeout=1)[0]

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "openbao.log").read_text(errors="replace")[-1500:]
        return ""


@dataclass
class RaftCluster:
    nodes: list[RaftNode]
    binary: str
    root_token: Sensitive = field(default_factory=lambda: Sensitive(""))
    unseal_key: Sensitive = field(default_factory=lambda: Sensitive(""))

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def active(self, timeout: float = 30) -> RaftNode:
        """The node answering ``sys/health`` 200 (waits for an election)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.nodes:
                if n.running and n.health() == 200:
                    return n
            time.sleep(0.1)
        raise RuntimeError("no active node")

    def unseal(self, node: RaftNode, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = _http("PUT", node.addr + "/v1/sys/unseal", body={"key": self.unseal_key.reveal()}, timeout=5)
            if status == 200 and node.health() in (200, 429):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{node.name} did not unseal: {node.log_tail()}")

    def voters(self) -> dict[str, bool]:
        status, body = _http("GET", self.active().addr + "/v1/sys/storage/raft/configuration",
                             token=self.root_token.reveal(), timeout=5)
        if status != 200 or not isinstance(body, dict):
            return {}
        servers: list[dict[str, Any]] = body["data"]["config"]["servers"]
        return {str(s["node_id"]): bool(s["voter"]) for s in servers}

    def restart(self, node: RaftNode) -> None:
        """Start a killed node on its data and port, unseal it; it rejoins as a standby."""
        node.spawn(self.binary)
        self.unseal(node)

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


def start_raft_cluster(workdir: Path, *, size: int = 3, timeout: float = 90) -> RaftCluster:
    """Start ``size`` nodes, init and unseal the first, join and unseal the others, wait until all vote."""
    binary = find_bao_binary()
    nodes = [RaftNode(f"node{i}", _free_port_pair(), workdir / f"node{i}") for i in range(1, size + 1)]
    cluster = RaftCluster(nodes, binary)
    try:
        for n in nodes:
            n.write_config()
            n.spawn(binary)
        first = nodes[0]
        status, body = _http("PUT", first.addr + "/v1/sys/init", body={"secret_shares": 1, "secret_threshold": 1},
                             timeout=30)
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"init failed: {status} {first.log_tail()}")
        cluster.unseal_key = Sensitive(str(body["keys_base64"][0]))
        cluster.root_token = Sensitive(str(body["root_token"]))
        cluster.unseal(first)
        cluster.active()
        # Promote joined nodes to voters after 2 s of health instead of autopilot's default 10 s.
        _http("POST", first.addr + "/v1/sys/storage/raft/autopilot/configuration",
              body={"server_stabilization_time": "2s", "cleanup_dead_servers": False},
              token=cluster.root_token.reveal(), timeout=5)
        for n in nodes[1:]:
            deadline = time.monotonic() + 30
            while True:
                status, body = _http("PUT", n.addr + "/v1/sys/storage/raft/join",
                                     body={"leader_api_addr": first.addr}, timeout=10)
                if status == 200 and isinstance(body, dict) and body.get("joined"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n.name} did not join: {status} {json.dumps(body)[:300]}")
                time.sleep(0.5)
            cluster.unseal(n)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = cluster.voters()
            if len(v) == size and all(v.values()):
                return cluster
            time.sleep(0.5)
        raise RuntimeError(f"not every node votes: {cluster.voters()}")
    except BaseException:
        cluster.stop()
        raise
