"""The shared header checks (coalition.checks): one rule, one reason code, broker and node."""

from __future__ import annotations

import pytest

from coalition.checks import HeaderProblem, check_header, clock_skew_problem
from coalition.labels import Precedence, label_to_proto, parse_label, valid_precedence
from coalition.v1 import envelope_pb2, label_pb2

NOW = 1_800_000_000_000


def _header(**kw: object) -> envelope_pb2.Header:
    base: dict[str, object] = {
        "sender": "KOR",
        "topic": "intel.ground",
        "precedence": int(Precedence.FLASH),
        "created_ms": NOW,
        "label": label_to_proto(parse_label("NATO SECRET // REL TO KOR, USA", originator="KOR")),
    }
    base.update(kw)
    return envelope_pb2.Header(**base)  # type: ignore[arg-type]


def _code(h: envelope_pb2.Header, sender: str = "KOR", **kw: object) -> str:
    with pytest.raises(HeaderProblem) as exc:
        check_header(h, sender, **kw)  # type: ignore[arg-type]
    return exc.value.code


def test_a_good_header_gives_its_label() -> None:
    label = check_header(_header(), "KOR", now_ms=NOW + 1000, clock_skew_ms=5000)
    assert label.originator == "KOR" and label.releasable_to == ("KOR", "USA")


def test_each_rule_has_its_code() -> None:
    assert _code(_header(label=label_pb2.Label(policy="NATO"))) == "bad_label"
    assert _code(_header(topic="intel..x")) == "bad_topic"
    assert _code(_header(precedence=0)) == "bad_precedence"
    assert _code(_header(precedence=9)) == "bad_precedence"
    assert _code(_header(), "GBR") == "originator_mismatch"
    assert _code(_header(created_ms=NOW - 10_000), now_ms=NOW, clock_skew_ms=5000) == "clock_skew"


def test_clock_skew_is_checked_only_when_a_clock_is_given() -> None:
    """A node receives old messages legitimately: it passes no now_ms."""
    check_header(_header(created_ms=NOW - 86_400_000), "KOR")
    why = clock_skew_problem(NOW + 7_500, NOW, 5_000, "the broker's")
    assert why == "created time is +7.5 s from the broker's clock; the window is ±5 s"
    assert clock_skew_problem(NOW + 5_000, NOW, 5_000, "x") is None


def test_the_first_failing_rule_wins() -> None:
    h = _header(topic="intel..x", precedence=0)
    assert _code(h) == "bad_topic"


def test_valid_precedence_is_the_enum() -> None:
    assert [p for p in range(-1, 7) if valid_precedence(p)] == [1, 2, 3, 4]
