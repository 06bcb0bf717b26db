"""A small pool of read-only SQLite connections used from worker threads (asyncio.to_thread)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ErrorMap = Callable[[BaseException], Exception]


class ReaderPool:
    """Read-only connections; each run() sees one consistent snapshot (one read transaction)."""

    def __init__(self, conns: list[sqlite3.Connection], *, map_error: ErrorMap) -> None:
        self._idle = conns
        self._size = len(conns)
        self._slots = asyncio.Semaphore(len(conns))
        self._map_error = map_error
        self._closed = False

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, map_error: ErrorMap, size: int = 4
    ) -> ReaderPool:
        """Open size read-only connections to an existing WAL database; raises map_error(...)."""

        def connect_all() -> list[sqlite3.Connection]:
            uri = Path(path).absolute().as_uri() + "?mode=ro"
            conns = []
            try:
                for _ in range(size):
                    conn = sqlite3.connect(
                        uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30
                    )
                    conns.append(conn)
                    conn.execute("PRAGMA query_only=ON")
            except BaseException:
                for conn in conns:
                    conn.close()
                raise
            return conns

        try:
            return cls(await asyncio.to_thread(connect_all), map_error=map_error)
        except (sqlite3.Error, OSError) as exc:
            raise map_error(exc) from exc

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) in a worker thread inside one read transaction; raises map_error(...)."""
        if self._closed:
            raise RuntimeError("reader pool is closed")
        await self._slots.acquire()
        conn = self._idle.pop()
        task = asyncio.ensure_future(asyncio.to_thread(_in_snapshot, conn, fn))

        def give_back(done: asyncio.Future[T]) -> None:
            # Only once the thread is finished may another read use this connection.
            if not done.cancelled():
                done.exception()  # a cancelled caller's error is retrieved here, not lost
            self._idle.append(conn)
            self._slots.release()

        task.add_done_callback(give_back)
        try:
            return await asyncio.shield(task)
        except (sqlite3.Error, OSError) as exc:
            raise self._map_error(exc) from exc

    async def close(self) -> None:
        """Wait for reads in progress, then close every connection."""
        if self._closed:
            return
        self._closed = True
        for _ in range(self._size):
            await self._slots.acquire()
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _in_snapshot(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        conn.execute("COMMIT")
