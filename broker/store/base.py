"""The MessageStore interface every backend implements, its value types and its errors."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

PRECEDENCES = (4, 3, 2, 1)  # FLASH, IMMEDIATE, PRIORITY, ROUTINE: delivery order of a backlog


@dataclass(frozen=True)
class NewMessage:
    """A verified message the broker wants stored; the envelope is opaque to the store."""

    message_id: str
    sender: str
    sequence: int
    topic: str
    precedence: int  # 1..4, FLASH = 4 highest
    classification: int
    label: bytes  # serialized coalition.v1 Label
    created_ms: int
    expiry_ms: int  # 0 = none
    envelope: bytes  # serialized coalition.v1 Envelope
    digest: bytes  # SHA-256 of envelope, recorded for tamper detection


@dataclass(frozen=True)
class StoredMessage:
    """A message as stored, with the offset the store assigned and when it was stored."""

    offset: int
    stored_ms: int
    message_id: str
    sender: str
    sequence: int
    topic: str
    precedence: int
    classification: int
    label: bytes
    created_ms: int
    expiry_ms: int
    envelope: bytes
    digest: bytes


@dataclass(frozen=True)
class Appended:
    """The message is durably stored at this offset."""

    offset: int


RejectReason = Literal["duplicate_id", "sequence_not_increasing"]


@dataclass(frozen=True)
class Rejected:
    """The message was not stored, for a reason the publisher caused."""

    reason: RejectReason


@dataclass(frozen=True)
class StoreStats:
    """Size of the store, for operators and metrics."""

    messages: int
    bytes: int  # sum of envelope sizes
    head: int  # highest offset ever assigned, 0 if none
    file_bytes: int  # database file plus its write-ahead log
    commits: int  # transactions committed since open (group commit makes this << appends)


class StoreError(Exception):
    """The store could not do what was asked; str() says why in words a person understands."""


class StoreFull(StoreError):
    """The store's hard size limit, or the disk, would be exceeded; nothing was written."""


class MessageStore(Protocol):
    """Durable, ordered message log with per-subscriber cursors (see docs in each backend)."""

    async def append(
        self, messages: Sequence[NewMessage], now_ms: int, *, audited_through: int = 0
    ) -> list[Appended | Rejected]:
        """Store messages atomically and durably, one result per message; raises StoreFull.

        In the same transaction, mark_audited(audited_through).
        """
        ...

    async def last_sequence(self, sender: str) -> int:
        """Highest sequence ever stored for sender, 0 if none."""
        ...

    async def has_message(self, sender: str, message_id: str) -> bool:
        """Whether (sender, message_id) is currently stored."""
        ...

    async def get(self, offset: int) -> StoredMessage | None:
        """The message at offset, or None if never stored or already removed."""
        ...

    async def head(self) -> int:
        """Highest offset ever assigned, 0 if none."""
        ...

    async def ensure_cursor(self, subscriber: str, at_offset: int) -> int:
        """Create subscriber's cursor at at_offset if missing; return the cursor."""
        ...

    async def cursor(self, subscriber: str) -> int | None:
        """Subscriber's durable cursor, None if it has none."""
        ...

    async def pending(
        self, subscriber: str, limit: int, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        """Unsettled messages above the cursor (not in exclude), FLASH first then oldest first.

        Raises StoreError if the subscriber has no cursor.
        """
        ...

    async def pending_and_head(
        self, subscriber: str, limit: int, exclude: Collection[int] = ()
    ) -> tuple[list[StoredMessage], int]:
        """pending(), and the highest offset assigned, both read from one snapshot.

        Every message at or below that head is either in the list, excluded, settled, or
        (when the list is full) still pending; nothing above it was visible to the read.
        """
        ...

    async def settle(self, subscriber: str, offsets: Sequence[int]) -> int:
        """Mark offsets done for subscriber, advance its cursor; return it; raises StoreError."""
        ...

    async def backlog_count(self, subscriber: str) -> int:
        """Number of unsettled messages above subscriber's cursor; raises StoreError."""
        ...

    async def stats(self) -> StoreStats:
        """Counts and sizes of the store."""
        ...

    async def unaudited(self, limit: int = 10_000) -> list[StoredMessage]:
        """Stored messages above the audited mark, oldest first (at most limit)."""
        ...

    async def audited_through(self) -> int:
        """The audited mark: messages at or below it have their acceptance entries."""
        ...

    async def mark_audited(self, through: int) -> None:
        """Move the audited mark up to through (never back)."""
        ...

    async def enforce_retention(self, now_ms: int) -> int:
        """Remove messages too old, expired, or beyond the retention size; return the count."""
        ...

    async def verify_integrity(self) -> list[int]:
        """Offsets whose envelope no longer matches its recorded digest."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release the store's files."""
        ...
