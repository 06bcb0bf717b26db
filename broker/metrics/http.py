"""A minimal HTTP/1.1 server on the event loop that answers ``GET /metrics``.

An asyncio server rather than prometheus_client's own server thread: the collectors
then read the broker's in-memory state on the loop that changes it (no locks, no
half-updated dicts), and the store queries behind a scrape run on the stores' reader
threads through ``BrokerCollector.refresh``. No other framework is needed for one GET.

Bounded: a request head larger than 8 KiB or slower than 5 s is dropped, one request
per connection (``Connection: close``), at most 16 connections served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("coalition.broker")

MAX_HEAD = 8 * 1024
READ_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16
# The text format every Prometheus version scrapes (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsHttp:
    """Serve render() at /metrics on host:port (port 0 picks one: see ``port``)."""

    def __init__(self, render: Callable[[], Awaitable[bytes]]) -> None:
        self._render = render
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()  # too many scrapers at once: drop this one
            return
        async with self._slots:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
                await self._answer(head, writer)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            except (ConnectionError, OSError):
                pass
            except Exception:
                log.exception("metrics request failed")
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _send(writer, 400, b"bad request\n", "text/plain; charset=utf-8")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != "/metrics":
            await _send(writer, 404, b"only /metrics is served here\n", "text/plain")
            return
        if method not in ("GET", "HEAD"):
            await _send(writer, 405, b"GET /metrics\n", "text/plain", allow="GET, HEAD")
            return
        body = await self._render()
        await _send(writer, 200, body, CONTENT_TYPE, head_only=method == "HEAD")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    *,
    allow: str = "",
    head_only: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()
