"""Where the broker listens, and the one-broker-per-port and per-data-directory rules.

``parse_listen`` accepts ``HOST:PORT`` and ``[IPv6]:PORT`` only: gRPC would take a bare
host and bind 443 without a word. ``refuse_taken`` binds the address once itself
before gRPC does, because gRPC binds with SO_REUSEPORT unless told otherwise (the
server sets ``grpc.so_reuseport`` to 0) and only says "Failed to bind". ``DataDirLock``
is an exclusive ``flock`` on ``DATA/broker.lock`` held for the process's life; the
kernel drops it when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "broker.lock"
_EXAMPLE = "e.g. 127.0.0.1:7443, 0.0.0.0:7443 or [::1]:7443"


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of a listen address; raises ValueError with a one-line reason.

    Port 0 is accepted (the system picks a free port; the tests and --port-file use it).
    """
    text = listen.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"listen address {listen!r} has no port: give [IPv6]:PORT, {_EXAMPLE}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"listen address {listen!r} has no port: give HOST:PORT, {_EXAMPLE}")
        if ":" in host:
            raise ValueError(
                f"listen address {listen!r}: put an IPv6 address in brackets, {_EXAMPLE}"
            )
    if not host:
        raise ValueError(f"listen address {listen!r} has no host: give HOST:PORT, {_EXAMPLE}")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f"listen address {listen!r}: the port must be a number from 0 to 65535, {_EXAMPLE}"
        )
    return host, int(port_text)


def refuse_taken(listen: str) -> None:
    """Raise OSError "address in use: ..." if another process listens on ``listen``."""
    host, port = parse_listen(listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {listen}: {host!r} does not resolve ({exc})") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            # As gRPC binds: SO_REUSEADDR (a restart need not wait out TIME_WAIT), no
            # SO_REUSEPORT (which would let two brokers share the port).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(
                        f"address in use: {listen} (another process, perhaps another broker, "
                        "listens there)"
                    ) from None
                raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None


class DataDirLock:
    """An exclusive lock on a broker data directory, recording the holder's pid."""

    def __init__(self, data: Path) -> None:
        self.path = data / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock or raise OSError "data directory ... in use by pid N"."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OSError(
                f"data directory {self.path.parent} in use by pid {holder} "
                f"(it holds {self.path}); stop that broker or give another --data"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; its pid is stale once nobody holds it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
