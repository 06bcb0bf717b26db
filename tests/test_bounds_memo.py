"""The bounds checks remember what they found within bounds (a wire label by its bytes, a
recipient's partner and key id), so a label or recipient repeated from message to
message is checked once; what they remember never lets anything else through."""

from __future__ import annotations

import pytest

from coalition import envelope as env
from coalition import labels
from coalition.labels import label_bounds_problem, label_to_proto, parse_label
from coalition.v1 import envelope_pb2

GOOD = label_to_proto(parse_label("NATO SECRET // REL TO GBR, UKR, NATO"))


def _header() -> envelope_pb2.Header:
    h = envelope_pb2.Header(message_id="m-1", sender="KOR", topic="t.x", sequence=1)
    h.label.CopyFrom(GOOD)
    return h


def test_a_label_within_bounds_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    labels._WITHIN_BOUNDS.clear()
    checks: list[object] = []
    wire_bounds = labels._wire_bounds

    def counting(msg: object) -> object:
        checks.append(msg)
        return wire_bounds(msg)  # type: ignore[arg-type]

    monkeypatch.setattr(labels, "_wire_bounds", counting)
    assert label_bounds_problem(GOOD) is None
    assert label_bounds_problem(GOOD) is None
    assert len(checks) == 1
    over = label_to_proto(parse_label("NATO SECRET // REL TO GBR, UKR, NATO"))
    over.originator = "X" * 65
    for _ in range(2):  # a label over a bound is never remembered
        assert label_bounds_problem(over) == (
            "label field originator has 65 characters, expected at most 64 characters"
        )
    assert len(checks) == 3


def test_the_remembered_set_stays_bounded() -> None:
    labels._WITHIN_BOUNDS.clear()
    for i in range(labels._WITHIN_BOUNDS_MAX + 10):
        msg = label_to_proto(parse_label("NATO SECRET // REL TO GBR"))
        msg.origination_time_ms = i + 1
        assert label_bounds_problem(msg) is None
    assert len(labels._WITHIN_BOUNDS) <= labels._WITHIN_BOUNDS_MAX


def test_a_remembered_recipient_still_has_its_sequence_and_count_checked() -> None:
    env._VALID_RECIPIENTS.clear()
    ok = [("GBR", "k-1", 1), ("UKR", "k-2", 2)]
    assert env.recipients_bounds_problem(_header(), ok) is None
    assert ("GBR", "k-1") in env._VALID_RECIPIENTS
    assert env.recipients_bounds_problem(_header(), [("GBR", "k-1", env.MAX_SEQUENCE + 1)]) == (
        f"wrapped_keys[0].sequence {env.MAX_SEQUENCE + 1} is above the limit {env.MAX_SEQUENCE}"
    )
    bad = env.recipients_bounds_problem(_header(), [*ok, ("GBR", "k 1", 3)])
    assert bad is not None and bad.startswith("wrapped_keys[2].key_id")
    assert ("GBR", "k 1") not in env._VALID_RECIPIENTS
    many = [("GBR", "k-1", 1)] * (env.MAX_RECIPIENTS + 1)
    assert env.recipients_bounds_problem(_header(), many) == (
        f"header wraps {env.MAX_RECIPIENTS + 1} keys; the limit is {env.MAX_RECIPIENTS} recipients"
    )
