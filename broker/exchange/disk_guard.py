"""The disk guard of the publish path: refuse new messages before the disk is full.

The free-space reserve (``min_free_bytes``) is what keeps the audit log writable: a
publish that would eat into it is refused ``store_full`` before anything is stored.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from broker.config import BrokerConfig
from broker.errors import Exhausted

# Disk a publish request takes beyond twice its envelope bytes (see DiskGuard.too_full).
_DISK_PER_REQUEST = 64 * 1024


class DiskGuard:
    """Estimates the disk a publish takes and compares what is left with the reserve."""

    def __init__(self, cfg: BrokerConfig, clock: Callable[[], int]) -> None:
        self.cfg = cfg
        self.clock = clock
        self._disk_free = (0, 0)  # (checked at ms, free bytes then)

    def too_full(self, incoming: int) -> Exhausted | None:
        """A refusal if storing incoming envelope bytes would eat into the free-space reserve.

        A request takes more disk than its bytes at first: SQLite writes them to the WAL
        and later into the database file, and every commit rewrites the B-tree and index
        pages it touches in both the store and the audit log. So the estimate is twice
        the bytes plus a fixed cost per request; counting only the bytes let fast
        publishers fill the disk between two free-space checks, and then the audit log
        could not record its entries.

        The WAL files count as spent too: a checkpoint copies their pages into the
        database files, which the free space does not show until it happens. Their size
        is an upper bound of what is still to come. The free space is asked of the
        system at most every 100 ms, sooner when the margin looks thin; in between, each
        request's estimate is taken off the last answer. If the system cannot tell (an
        OSError), nothing is refused.
        """
        if self.cfg.min_free_bytes <= 0 or self.cfg.store_backend != "sqlite":
            return None  # on JetStream the cluster's limits refuse (store_full), not this disk
        need = 2 * incoming + _DISK_PER_REQUEST
        now = self.clock()
        at, free = self._disk_free
        if now - at > 100 or free - need < 2 * self.cfg.min_free_bytes:
            try:
                free = shutil.disk_usage(self.cfg.data_dir).free - _wal_bytes(self.cfg.data_dir)
            except OSError:
                return None
            self._disk_free = (now, free)
        else:
            self._disk_free = (at, free - need)
        if free - need >= self.cfg.min_free_bytes:
            return None
        return Exhausted(
            "store_full",
            f"the broker's disk is nearly full ({free / 1048576:.1f} MiB free, "
            f"{self.cfg.min_free_bytes / 1048576:.1f} MiB kept in reserve); "
            "refusing new messages until space is freed",
        )


def _wal_bytes(data_dir: Path) -> int:
    """The size of the SQLite WAL files in data_dir (not yet copied into their databases)."""
    total = 0
    for wal in Path(data_dir).glob("*.db-wal"):
        with contextlib.suppress(OSError):  # gone between listing and stat: nothing owed
            total += wal.stat().st_size
    return total
