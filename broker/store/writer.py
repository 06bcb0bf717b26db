"""Group commit: one thread owns a SQLite file's write connection and commits queued jobs together.

Each caller submits a job, a function of the write connection. The thread takes everything
queued, runs the jobs in one transaction (each inside its own SAVEPOINT, so a job that raises
leaves no trace and does not disturb the others), commits once, and only then resolves the
callers' futures. With ``synchronous=FULL`` the commit is an fsync of the write-ahead log, so
a resolved job is durable and a batch is never half-written: after a crash SQLite rolls back
any transaction whose commit did not finish.

If the storage itself fails mid-batch (disk full, I/O error), the batch is rolled back and its
jobs are retried one transaction each, so the job that cannot fit fails alone.

A rider (ride()) is housekeeping nobody waits for: it runs at the start of the next
transaction, whoever's it is, so it costs no commit of its own.

A job that may wait a little (submit_with_next()) is held until another job starts a
transaction and commits with it (held jobs run first in it); only if none comes within
the writer's linger does it get a transaction of its own. Its caller still learns of it
once it is durable, so it promises what submit() does, later; what it spares is a
commit (and an fsync) for work that is never in a hurry, such as moving a cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

T = TypeVar("T")
ErrorMap = Callable[[BaseException], Exception]

SQLITE_FULL = 13
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    """Whether exc is SQLite's SQLITE_FULL or the OS's ENOSPC/EDQUOT."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS


def open_write_connection(path: str | os.PathLike[str], schema: str) -> sqlite3.Connection:
    """Open path in WAL mode with fsync on every commit and apply schema; raises sqlite3.Error."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{path}: could not switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA fullfsync=ON")  # macOS: F_FULLFSYNC, else fsync is not durable
        conn.executescript(f"BEGIN IMMEDIATE;\n{schema}\nCOMMIT;")
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass
class _Job:
    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Outcome:
    result: Any = None
    error: BaseException | None = None


_STOP = object()
_NUDGE = object()  # held jobs arrived while the thread was idle: start their linger
LINGER_S = 0.010  # how long a held job waits for another transaction to ride


class GroupCommitWriter:
    """The single writer of one SQLite file; see the module docstring."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        name: str,
        map_error: ErrorMap,
        max_batch: int = 1024,
        linger: float = LINGER_S,
    ) -> None:
        self._conn = conn
        self._name = name
        self._map_error = map_error
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._closed = False
        self._rider: Callable[[sqlite3.Connection], object] | None = None
        self._rider_lock = threading.Lock()
        self._linger = linger
        # submit_with_next()'s jobs, the time the oldest must be committed by, and
        # whether the thread waits without a timeout (then the first held job nudges it).
        self._held: list[_Job] = []
        self._held_until = 0.0
        self._idle = False
        self.commits = 0  # transactions committed
        self.jobs = 0  # jobs committed
        # Called on the writer thread with each commit's seconds (broker.metrics).
        self.on_commit: Callable[[float], None] | None = None
        self._thread = threading.Thread(target=self._loop, name=f"{name}-writer", daemon=True)
        self._thread.start()

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, schema: str, name: str, map_error: ErrorMap
    ) -> GroupCommitWriter:
        """Open path, apply schema and start the writer thread; raises map_error(...)."""
        try:
            conn = await asyncio.to_thread(open_write_connection, path, schema)
        except (sqlite3.Error, OSError) as exc:
            raise map_error(exc) from exc
        return cls(conn, name=name, map_error=map_error)

    async def submit(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run job in the next group transaction and return its result once committed.

        Raises what job raised (its writes undone), map_error(...) for storage failures,
        RuntimeError after close(). A cancelled caller's job still runs.
        """
        if self._closed:
            raise RuntimeError(f"{self._name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(job, future, loop))
        return cast(T, await future)

    async def submit_with_next(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """submit(job), committed with the next transaction another job starts, or alone
        once it has waited the writer's linger (default LINGER_S) for one.

        Durable on return, like submit(); raises what submit() raises. close() commits a
        held job at once.
        """
        if self._closed:
            raise RuntimeError(f"{self._name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._rider_lock:
            if not self._held:
                self._held_until = time.monotonic() + self._linger
            self._held.append(_Job(job, future, loop))
            nudge, self._idle = self._idle, False
        if nudge:
            self._queue.put(_NUDGE)
        return cast(T, await future)

    def ride(self, job: Callable[[sqlite3.Connection], object]) -> None:
        """Run job at the start of the next transaction, in place of a rider not yet run.

        Nobody waits for it: it is undone with its transaction if the storage fails, and
        an error it raises itself is ignored. close() runs a rider still pending.
        """
        with self._rider_lock:
            self._rider = job

    async def close(self) -> None:
        """Commit everything already submitted (held jobs and a pending rider too),
        checkpoint the WAL and close the connection."""
        if self._closed:
            return
        if self._rider is not None:
            with contextlib.suppress(Exception):
                await self.submit(lambda conn: None)
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # -- writer thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            with self._rider_lock:
                # Held jobs wait for another job until their time is up; with none held
                # the thread sleeps until a job (or the first held one's nudge) arrives.
                wait = max(0.0, self._held_until - time.monotonic()) if self._held else None
                self._idle = wait is None
            try:
                first: object = self._queue.get(timeout=wait)
            except queue.Empty:
                first = None  # the held jobs waited long enough: commit them alone
            with self._rider_lock:
                self._idle = False
            if first is _NUDGE:
                continue
            batch: list[_Job] = []
            item = first
            while item is not None:
                if item is _STOP:
                    stopping = True
                    break
                if item is not _NUDGE:
                    batch.append(cast(_Job, item))
                if len(batch) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            with self._rider_lock:
                held, self._held = self._held, []
            if held or batch:
                self._commit_batch(held + batch)
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _commit_batch(self, batch: list[_Job]) -> None:
        try:
            outcomes = self._transaction(batch)
        except Exception as exc:
            self._rollback()
            if len(batch) == 1:
                outcomes = [_Outcome(error=self._map_error(exc))]
            else:
                outcomes = [self._alone(job) for job in batch]
        for job, outcome in zip(batch, outcomes, strict=True):
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                job.loop.call_soon_threadsafe(_resolve, job.future, outcome)

    def _alone(self, job: _Job) -> _Outcome:
        try:
            return self._transaction([job])[0]
        except Exception as exc:
            self._rollback()
            return _Outcome(error=self._map_error(exc))

    def _transaction(self, batch: list[_Job]) -> list[_Outcome]:
        conn = self._conn
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        with self._rider_lock:
            rider, self._rider = self._rider, None
        if rider is not None:
            conn.execute("SAVEPOINT rider")
            try:
                rider(conn)
            except (sqlite3.Error, OSError):
                raise
            except Exception:
                conn.execute("ROLLBACK TO rider")
            conn.execute("RELEASE rider")
        outcomes: list[_Outcome] = []
        for job in batch:
            conn.execute("SAVEPOINT job")
            try:
                result = job.run(conn)
            except (sqlite3.Error, OSError):
                raise  # the storage failed, not the job: the whole transaction is suspect
            except Exception as exc:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                outcomes.append(_Outcome(error=exc))
            else:
                conn.execute("RELEASE job")
                outcomes.append(_Outcome(result=result))
        if all(o.error is not None for o in outcomes):
            conn.execute("ROLLBACK")
            return outcomes
        conn.execute("COMMIT")
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        self.commits += 1
        self.jobs += sum(1 for o in outcomes if o.error is None)
        return outcomes

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")


class WriterOwner:
    """What a class owning one GroupCommitWriter (as ``_writer``) reports about it."""

    _writer: GroupCommitWriter

    @property
    def commits(self) -> int:
        """Transactions committed since open (for tests and metrics)."""
        return self._writer.commits

    def time_commits(self, hook: Callable[[float], None] | None) -> None:
        """Call hook with each commit's duration in seconds (None: stop)."""
        self._writer.on_commit = hook


def _resolve(future: asyncio.Future[Any], outcome: _Outcome) -> None:
    if future.done():
        return
    if outcome.error is not None:
        future.set_exception(outcome.error)
    else:
        future.set_result(outcome.result)
