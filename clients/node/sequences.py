"""Durable send-side sequence numbers, shared by every process using one node database."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from clients.node.db import connect, transaction
from clients.sdk import Allocation

_HEADER = ""  # scope of the per-sender header sequence; recipients use their partner code


def _clock_us() -> int:
    return time.time_ns() // 1000


class DurableSequencer:
    """Allocates numbers in one SQLite transaction, so concurrent publishers never collide.

    The header sequence is ``max(last + 1, now in microseconds)``: strictly increasing
    across restarts and processes, and still above what the broker saw if this
    database is lost. Per-recipient numbers are contiguous from 1, so a recipient can
    tell a withheld message from a quiet sender.
    """

    def __init__(self, path: Path, *, clock_us: Callable[[], int] = _clock_us) -> None:
        self.conn = connect(path)
        self.clock_us = clock_us

    def close(self) -> None:
        self.conn.close()

    def next(self) -> int:
        """The next header sequence alone (no recipient numbers)."""
        return self.allocate([]).sequence

    def allocate(self, recipients: Sequence[str]) -> Allocation:
        """Take the next header sequence and each recipient's next number."""
        with transaction(self.conn) as c:
            seq = max(_last(c, _HEADER) + 1, self.clock_us())
            _set(c, _HEADER, seq)
            per = {}
            for r in recipients:
                row = c.execute("SELECT MIN(n) FROM tx_free WHERE scope = ?", (r,)).fetchone()
                if row[0] is not None:
                    per[r] = int(row[0])
                    c.execute("DELETE FROM tx_free WHERE scope = ? AND n = ?", (r, per[r]))
                else:
                    per[r] = _last(c, r) + 1
                    _set(c, r, per[r])
        return Allocation(seq, per)

    def release(self, allocation: Allocation) -> None:
        """Give back the numbers of a refused (never stored) envelope: the last is taken
        back, one below it is kept free and taken first by the next envelope to that
        recipient, so the recipient's hole fills rather than looking withheld."""
        with transaction(self.conn) as c:
            for r, n in allocation.per_recipient.items():
                c.execute("INSERT OR IGNORE INTO tx_free (scope, n) VALUES (?, ?)", (r, n))
                last = _last(c, r)
                while c.execute(
                    "DELETE FROM tx_free WHERE scope = ? AND n = ?", (r, last)
                ).rowcount:
                    last -= 1
                _set(c, r, last)

    def last(self, scope: str = _HEADER) -> int:
        return _last(self.conn, scope)


def _last(c: sqlite3.Connection, scope: str) -> int:
    row = c.execute("SELECT last FROM tx_sequences WHERE scope = ?", (scope,)).fetchone()
    return 0 if row is None else int(row[0])


def _set(c: sqlite3.Connection, scope: str, value: int) -> None:
    c.execute(
        "INSERT INTO tx_sequences (scope, last) VALUES (?, ?) "
        "ON CONFLICT (scope) DO UPDATE SET last = excluded.last",
        (scope, value),
    )
