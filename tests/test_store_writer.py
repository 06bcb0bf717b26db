"""The group-commit writer's held jobs (submit_with_next): a job that may wait commits with
the next transaction another job starts, alone only after its linger, and at close at
once; it is durable when its caller hears back, and a job of it that fails fails alone.
The SQLite store settles acknowledgements this way."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.store import SqliteMessageStore
from broker.store.writer import GroupCommitWriter, open_write_connection
from tests.test_store import MiB, message

SCHEMA = "CREATE TABLE IF NOT EXISTS t (v INTEGER NOT NULL);"
NEVER = 3600.0  # a linger no test waits out


def _error(exc: BaseException) -> Exception:
    return RuntimeError(f"storage: {exc}")


def _writer(path: Path, linger: float) -> GroupCommitWriter:
    return GroupCommitWriter(
        open_write_connection(path, SCHEMA), name="test", map_error=_error, linger=linger
    )


def _insert(v: int) -> Callable[[sqlite3.Connection], int]:
    def job(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO t (v) VALUES (?)", (v,))
        return v

    return job


def _rows(path: Path) -> list[int]:
    with sqlite3.connect(path) as raw:
        return [int(v) for (v,) in raw.execute("SELECT v FROM t ORDER BY v")]


async def _settled_in(task: asyncio.Task[Any], seconds: float) -> bool:
    """Whether task is done after seconds (it is never cancelled)."""
    await asyncio.wait([task], timeout=seconds)
    return task.done()


async def test_a_held_job_rides_the_next_commit(tmp_path: Path) -> None:
    w = _writer(tmp_path / "w.db", NEVER)
    try:
        held = asyncio.create_task(w.submit_with_next(_insert(1)))
        # It waits for another transaction: none of its own, however long that takes.
        assert not await _settled_in(held, 0.2)
        assert w.commits == 0 and _rows(tmp_path / "w.db") == []
        assert await w.submit(_insert(2)) == 2
        assert await held == 1
        assert w.commits == 1 and w.jobs == 2  # one transaction carried both
        assert _rows(tmp_path / "w.db") == [1, 2]
    finally:
        await w.close()


async def test_a_held_job_alone_commits_after_its_linger(tmp_path: Path) -> None:
    w = _writer(tmp_path / "w.db", 0.01)
    try:
        assert await w.submit_with_next(_insert(1)) == 1
        assert w.commits == 1 and _rows(tmp_path / "w.db") == [1]  # durable on return
        # Several held together share their one transaction.
        both = await asyncio.gather(
            w.submit_with_next(_insert(2)),
            w.submit_with_next(_insert(3)),
        )
        assert list(both) == [2, 3] and w.commits == 2
    finally:
        await w.close()


async def test_close_commits_held_jobs_at_once(tmp_path: Path) -> None:
    w = _writer(tmp_path / "w.db", NEVER)
    held = asyncio.create_task(w.submit_with_next(_insert(7)))
    assert not await _settled_in(held, 0.05)
    await w.close()
    assert await held == 7
    assert _rows(tmp_path / "w.db") == [7]
    with pytest.raises(RuntimeError, match="closed"):
        await w.submit_with_next(_insert(8))


async def test_a_held_job_that_fails_fails_alone(tmp_path: Path) -> None:
    w = _writer(tmp_path / "w.db", NEVER)

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (v) VALUES (99)")
        raise ValueError("refused")

    try:
        held = asyncio.create_task(w.submit_with_next(bad))
        assert not await _settled_in(held, 0.05)
        assert await w.submit(_insert(1)) == 1
        with pytest.raises(ValueError, match="refused"):
            await held
        assert _rows(tmp_path / "w.db") == [1]  # its insert undone, the other's kept
    finally:
        await w.close()


async def test_settle_commits_with_the_next_append(tmp_path: Path) -> None:
    store = await SqliteMessageStore.open(tmp_path / "s.db", max_bytes=64 * MiB)
    try:
        await store.append([message(sequence=1), message(sequence=2)], now_ms=1)
        assert await store.ensure_cursor("USA", 0) == 0
        assert await store.settle("USA", [1]) == 1  # alone: after the linger
        store._writer._linger = NEVER  # now only a write that commits anyway takes it
        before = store.commits
        settling = asyncio.create_task(store.settle("USA", [2]))
        assert not await _settled_in(settling, 0.2)
        await store.append([message(sequence=3)], now_ms=2)
        assert await settling == 2
        assert store.commits == before + 1  # the acknowledgement cost no commit
        assert await store.cursor("USA") == 2
    finally:
        await store.close()
