"""The MessageStore interface every backend implements, its value types and its errors."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
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
    # Forwarded by a peer nation's gateway (broker.federation): only what that nation
    # released crosses, so its sender's sequences may have gaps and arrive out of order;
    # the store does not require them to increase (duplicates are still refused).
    forwarded: bool = False


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


def stored_message(msg: NewMessage, offset: int, stored_ms: int) -> StoredMessage:
    """The message as the store holds it at offset (what a read of offset returns)."""
    return StoredMessage(
        offset=offset,
        stored_ms=stored_ms,
        message_id=msg.message_id,
        sender=msg.sender,
        sequence=msg.sequence,
        topic=msg.topic,
        precedence=msg.precedence,
        classification=msg.classification,
        label=msg.label,
        created_ms=msg.created_ms,
        expiry_ms=msg.expiry_ms,
        envelope=msg.envelope,
        digest=msg.digest,
    )


@dataclass(frozen=True)
class Appended:
    """The message is durably stored at this offset."""

    offset: int


RejectReason = Literal["duplicate_id", "sequence_not_increasing", "quota_exceeded"]


@dataclass(frozen=True)
class Rejected:
    """The message was not stored, for a reason the publisher caused.

    For ``quota_exceeded``: the sender's stored bytes (``used``) and its quota (``limit``).
    """

    reason: RejectReason
    used: int = 0
    limit: int = 0


ExpiryReason = Literal["retention_age", "retention_size"]


@dataclass(frozen=True)
class Notice:
    """A message retention removed before one of its eligible recipients had it.

    Kept in the store per (subscriber, offset) until the subscriber acknowledges it; its
    audit record is written in the sweep's own commit, so every notice is audited.
    """

    subscriber: str
    offset: int
    sender: str
    message_id: str
    sequence: int  # the sender's header sequence
    recipient_sequence: int  # the sender's number for this subscriber (0 = not numbered)
    topic: str
    reason: ExpiryReason
    stored_ms: int
    removed_ms: int


# Who should be told if a message is removed unread: eligible partner -> the sender's
# sequence number for that partner (0 if it numbers none). Called by the store's writer
# thread for each removed message some subscriber had not settled; it must be pure.
Eligibility = Callable[[StoredMessage], Mapping[str, int]]


@dataclass(frozen=True)
class Sweep:
    """What a retention sweep did: messages removed, and the notices it recorded."""

    removed: int
    by_reason: Mapping[str, int]
    notices: Sequence[Notice]


@dataclass(frozen=True)
class OutboxRow:
    """One audit record waiting in an outbox: its id (ascending, never reused), the time
    of the commit that wrote it, and the record as its writer encoded it (opaque here)."""

    id: int
    time_ms: int
    record: str


# The audit records of the messages an append stores: called once per append, in the
# writer, with the messages stored (offsets assigned), inside the transaction that
# stores them; it must be pure and fast. Its records are written in that transaction.
AcceptanceRecords = Callable[[Sequence[StoredMessage]], Sequence[str]]
# The same for the notices a retention sweep records.
NoticeRecords = Callable[[Sequence[Notice]], Sequence[str]]


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
    """Durable, ordered message log with per-subscriber cursors and retention.

    The audit contract: **a commit carries its audit records.** Every write that makes
    a decision (append, record, sweep) writes the decision's audit records into the
    store's outbox in the same atomic, durable commit as the decision itself: when the
    call returns, both are durable, and a crash leaves both or neither. So a message is
    never stored (or delivered) without its acceptance record, and a record is never
    written for something that did not happen. Each record gets an outbox id above every
    earlier one (never reused) and the commit's time. The broker's audit drainer
    (broker.audit.drainer, through the backend's read_outbox/forget_outbox) appends the
    records to the audit log in id order and then lets the backend forget them; a
    backend must keep every record until forget_outbox covers it. Records are opaque
    text to the store. A backend that cannot write a message and its records atomically
    (a JetStream cluster puts both in one atomic batch) cannot implement this interface.
    """

    async def append(
        self,
        messages: Sequence[NewMessage],
        now_ms: int,
        *,
        records: AcceptanceRecords | None = None,
        also: Sequence[str] = (),
    ) -> list[Appended | Rejected]:
        """Store messages atomically and durably, one result per message; raises StoreFull
        (then nothing is written, records included).

        In the same commit, the outbox gets records(the messages stored) and then also
        (records of other decisions the caller made for the same request).
        """
        ...

    async def record(self, records: Sequence[str], now_ms: int) -> None:
        """Write audit records alone into the outbox, durably (sharing a commit with other
        writes queued at the same time); raises StoreFull, StoreError."""
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

    async def pending_and_head(
        self, subscriber: str, limit: int, exclude: Collection[int] = ()
    ) -> tuple[list[StoredMessage], int]:
        """Unsettled messages above the cursor (not in exclude), FLASH first then oldest
        first, and the highest offset assigned, both read from one snapshot.

        Every message at or below that head is either in the list, excluded, settled, or
        (when the list is full) still pending; nothing above it was visible to the read.
        Raises StoreError if the subscriber has no cursor.
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

    async def sweep(
        self,
        now_ms: int,
        eligible: Eligibility | None = None,
        records: NoticeRecords | None = None,
    ) -> Sweep:
        """Remove messages too old, expired, or beyond the retention size, recording a
        Notice for each eligible subscriber that had not settled a removed message, and
        records(those notices) in the outbox, all in one commit."""
        ...

    async def usage(self) -> dict[str, int]:
        """Stored envelope bytes per sender (senders holding none are left out)."""
        ...

    async def notices(self, subscriber: str, limit: int, *, after: int = 0) -> list[Notice]:
        """Subscriber's notices not yet acknowledged above offset after, by offset."""
        ...

    async def drop_notices(self, subscriber: str, offsets: Sequence[int]) -> int:
        """The subscriber acknowledged these notices; forget them, return how many."""
        ...

    async def trim_notices(self, keep: int) -> int:
        """Forget each subscriber's oldest notices beyond keep; return how many."""
        ...

    async def notice_subscribers(self) -> set[str]:
        """Subscribers holding notices not yet acknowledged."""
        ...

    async def verify_integrity(self) -> list[int]:
        """Offsets whose envelope no longer matches its recorded digest."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release the store's files."""
        ...
