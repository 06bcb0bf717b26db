"""Helpers for node tests: configs, running `coalition-node` as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

NODE = [sys.executable, "-m", "clients.node.cli"]
REPO = Path(__file__).resolve().parent.parent


def write_config(
    path: Path, pki: Path, code: str, port: int, *, extra: str = "", topics: str = '["intel.>"]'
) -> Path:
    """A node config for partner code against a broker on 127.0.0.1:port."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'broker = "127.0.0.1:{port}"\n'
        f'identity = "{pki / "partners" / code}"\n'
        f'inbox = "{code.lower()}-inbox.db"\n'
        f"topics = {topics}\n"
        "window = 16\n" + extra
    )
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str


async def node(*args: str, stdin: bytes = b"", timeout: float = 30.0) -> Result:
    """Run `coalition-node ARGS` to completion without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *NODE,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def start_daemon(
    config: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`coalition-node run` in the background, stderr to a log file; env adds variables."""
    with log.open("ab") as f:
        return await asyncio.create_subprocess_exec(
            *NODE,
            "run",
            "--config",
            str(config),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=f,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
        )


async def stop(proc: asyncio.subprocess.Process, timeout: float = 15.0) -> int:
    """SIGTERM and wait; SIGKILL if it does not exit in time (then the test fails)."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("process did not stop on SIGTERM") from None
    assert proc.returncode is not None
    return proc.returncode


def free_port() -> int:
    """A port free now, so a restarted broker can bind the same one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
