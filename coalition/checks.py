"""The checks both ends make on a signed envelope header, after its signature verified.

One function, ``check_header``, so the broker (before it stores a message) and a node
(before it stores a delivery it does not trust the broker about) apply the same rules with
the same reason codes. The broker keeps what only it can judge (policy, rate); the node
keeps what only it can judge (routed versus signed label/topic/precedence, recipients).
Pure: no I/O; the clock is the caller's ``now_ms``.
"""

from __future__ import annotations

from collections.abc import Callable

from coalition.labels import Label, LabelError, label_from_proto, valid_precedence
from coalition.topics import TopicError, validate_topic
from coalition.v1 import envelope_pb2, label_pb2

__all__ = ["HeaderProblem", "check_header", "clock_skew_problem"]


class HeaderProblem(Exception):
    """A header that fails a shared check; ``code`` is the reason code both ends use.

    Codes: bad_label, bad_topic, bad_precedence, clock_skew, originator_mismatch.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def clock_skew_problem(created_ms: int, now_ms: int, window_ms: int, whose: str) -> str | None:
    """A sentence when created_ms is more than window_ms from now_ms on ``whose`` clock."""
    if abs(created_ms - now_ms) <= window_ms:
        return None
    return (
        f"created time is {(created_ms - now_ms) / 1000:+.1f} s from {whose} clock; "
        f"the window is ±{window_ms / 1000:.0f} s"
    )


def check_header(
    header: envelope_pb2.Header,
    sender: str,
    *,
    now_ms: int | None = None,
    clock_skew_ms: int = 0,
    whose_clock: str = "this host's",
    parse_label: Callable[[label_pb2.Label], Label] = label_from_proto,
) -> Label:
    """The signed label, once the header passes every shared check, in this order:

    the label parses and is valid (bad_label); the topic is a valid topic (bad_topic); the
    precedence is ROUTINE..FLASH (bad_precedence); with ``now_ms``, the created time is
    within ``clock_skew_ms`` of it (clock_skew); a label naming an originator names
    ``sender`` (originator_mismatch). Raises HeaderProblem.
    """
    try:
        label = parse_label(header.label)
    except LabelError as exc:
        raise HeaderProblem("bad_label", str(exc)) from None
    try:
        validate_topic(header.topic)
    except TopicError as exc:
        raise HeaderProblem("bad_topic", str(exc)) from None
    if not valid_precedence(header.precedence):
        raise HeaderProblem("bad_precedence", "precedence must be ROUTINE..FLASH")
    if now_ms is not None:
        skew = clock_skew_problem(header.created_ms, now_ms, clock_skew_ms, whose_clock)
        if skew is not None:
            raise HeaderProblem("clock_skew", skew)
    if label.originator and label.originator != sender:
        raise HeaderProblem(
            "originator_mismatch",
            f"label originator {label.originator!r} is not the sender {sender!r}",
        )
    return label
