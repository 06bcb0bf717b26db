"""One delivery in, one decision out: store it, or quarantine it with the reason.

The checks a node makes because it does not trust the broker: the envelope verifies
and decrypts for us, and the label, topic and precedence the broker routed under are
the ones the sender signed.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from clients.node.content import ContentError, title_of
from clients.node.inbox import Entry, Inbox
from clients.node.parked import park
from clients.sdk import OPEN_ERRORS, Opened, claimed_header
from clients.sdk.opening import is_unknown_sender
from coalition.checks import HeaderProblem, check_header
from coalition.labels import LabelError, label_from_proto
from coalition.v1 import exchange_pb2, label_pb2

_SQLITE_MAX = 2**63 - 1

Opener = Callable[[exchange_pb2.Delivery], Awaitable[Opened]]
# Given the sender a header claims, a sentence when its key fails only for time by the
# node's clock (not yet valid, or expired), else None.
ClockProblem = Callable[[str], Awaitable[str | None]]


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    PARKED = "parked"  # held back: it fails only for time by the node's clock


@dataclass(frozen=True)
class Handled:
    """What happened to a delivery; ``entry`` is set when it was stored now."""

    outcome: Outcome
    reason: str = ""
    detail: str = ""
    entry: Entry | None = None
    gap: str = ""


class Refused(Exception):
    """A delivery this node will not accept; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


async def handle(
    delivery: exchange_pb2.Delivery,
    *,
    me: str,
    opener: Opener,
    inbox: Inbox,
    now_ms: int,
    hook: bool = False,
    clock_problem: ClockProblem | None = None,
) -> Handled:
    """Verify, check, and store, hold back or quarantine one delivery (the caller
    acknowledges after)."""
    try:
        opened = await opener(delivery)
        entry = _checked(delivery, opened, me, now_ms, "pending" if hook else None)
    except OPEN_ERRORS as exc:  # v1's or v2's refusal; reason.value names the step
        if is_unknown_sender(exc) and clock_problem is not None:
            held = await _hold_for_clock(delivery, inbox, clock_problem, now_ms)
            if held is not None:
                return held
        return _quarantine(delivery, inbox, exc.reason.value, str(exc), now_ms)
    except Refused as exc:
        return _quarantine(delivery, inbox, exc.reason, exc.detail, now_ms)
    stored = inbox.store(entry, opened.plaintext)
    if not stored.new:
        return Handled(Outcome.DUPLICATE)
    return Handled(Outcome.STORED, entry=entry, gap=stored.gap)


def _checked(
    d: exchange_pb2.Delivery, opened: Opened, me: str, now_ms: int, hook_status: str | None
) -> Entry:
    # The signed header (v2: its core); v1 and v2 are read through Opened alone.
    h = opened.header
    # open() checks this too; a node never trusts one check.
    if me not in opened.recipients or h.sender == me:
        raise Refused("not_a_recipient", f"no key is wrapped for {me}")
    try:  # the broker's own checks (coalition.checks): a node never trusts it made them
        signed = check_header(h, h.sender)
    except HeaderProblem as exc:
        raise Refused(exc.code, f"the signed header is invalid: {exc.message}") from None
    try:
        routed = label_from_proto(d.label)
    except LabelError:
        routed = None
    if routed != signed:
        raise Refused(
            "label_mismatch",
            f"delivered under {_human(d.label)} but signed as {signed.human()}",
        )
    if d.topic != h.topic:
        raise Refused("topic_mismatch", f"delivered on {d.topic!r} but signed for {h.topic!r}")
    if d.precedence != h.precedence:
        raise Refused("precedence_mismatch", "delivered precedence differs from the signed one")
    if h.sequence > _SQLITE_MAX or opened.recipient_sequence > _SQLITE_MAX:
        raise Refused("bad_sequence", "sequence number out of range")
    try:
        title = title_of(h.content_type, opened.plaintext)
    except ContentError as exc:
        raise Refused("bad_content", str(exc)) from None
    return Entry(
        message_id=h.message_id,
        sender=h.sender,
        sequence=h.sequence,
        recipient_sequence=opened.recipient_sequence,
        topic=h.topic,
        precedence=label_pb2.Precedence.Name(h.precedence),
        label=signed.human(),
        created_ms=h.created_ms,
        received_ms=now_ms,
        offset=d.offset,
        content_type=h.content_type,
        title=title,
        hook_status=hook_status,
    )


def _human(label: label_pb2.Label) -> str:
    try:
        return label_from_proto(label).human()
    except LabelError:
        return "an invalid label"


async def _hold_for_clock(
    d: exchange_pb2.Delivery, inbox: Inbox, clock_problem: ClockProblem, now_ms: int
) -> Handled | None:
    """Park a delivery whose sender's key fails only for time; never refuse it for that."""
    h = claimed_header(d.envelope)
    if h is None:
        return None
    detail = await clock_problem(h.sender)
    if detail is None:
        return None
    park(
        inbox.conn,
        d,
        sender=h.sender[:64],
        message_id=h.message_id[:64],
        detail=detail,
        now_ms=now_ms,
    )
    return Handled(Outcome.PARKED, reason="clock", detail=detail)


def _quarantine(
    d: exchange_pb2.Delivery, inbox: Inbox, reason: str, detail: str, now_ms: int
) -> Handled:
    # The header is unverified here: sender and id are kept as the broker's claim only.
    h = claimed_header(d.envelope)
    sender, message_id = ("", "") if h is None else (h.sender[:64], h.message_id[:64])
    inbox.quarantine(
        offset=d.offset,
        sender=sender,
        message_id=message_id,
        topic=d.topic[:256],
        reason=reason,
        detail=detail,
        envelope=d.envelope.SerializeToString(),
        now_ms=now_ms,
    )
    return Handled(Outcome.QUARANTINED, reason=reason, detail=detail)
