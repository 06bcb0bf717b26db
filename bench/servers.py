"""Server processes the harness starts: each row's server runs alone in its own process
so that its CPU time and peak RSS can be read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol


@dataclass
class ServerProcess:
    """A running server: its process, its address, and where its log goes."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Server(Protocol):
    """What the harness needs of a row's server: one process or a cluster of them."""

    @property
    def pid(self) -> int: ...

    @property
    def pids(self) -> list[int]: ...

    @property
    def target(self) -> str: ...

    def stop(self, timeout: float = 10.0) -> int | None: ...


@dataclass
class ServerGroup:
    """Several processes measured as one row's server (a cluster): CPU and memory are
    summed over ``pids``; ``target`` lists every client address, comma-separated."""

    name: str
    pids: list[int]
    targets: list[str]
    stopper: Callable[[], int | None]
    kinds: list[str] = field(default_factory=list)  # each pid's kind: "broker", "nats-server"

    @property
    def pid(self) -> int:
        return self.pids[0]

    @property
    def target(self) -> str:
        return ",".join(self.targets)

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.stopper()


ROOT = Path(__file__).resolve().parent.parent


def spawn(name: str, argv: list[str], workdir: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start a server with its output in workdir/<name>.log (``python -m bench...`` works)."""
    log = (workdir / f"{name}.log").open("wb")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    return proc, log


async def wait_port_file(
    proc: subprocess.Popen[bytes], path: Path, log: Path, timeout: float = 30.0
) -> int:
    """Wait until a server wrote its bound port to ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text().strip())  # noqa: ASYNC240 - a few bytes, polled
        await asyncio.sleep(0.05)
    raise TimeoutError(f"server did not write {path} in {timeout} s: {_tail(log)}")


async def wait_listening(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30.0
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s: {_tail(log)}")


def _tail(log: Path, n: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
