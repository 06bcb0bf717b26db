"""Topics and NATS-style patterns."""

from __future__ import annotations

import pytest

from coalition.topics import TopicError, any_match, topic_matches, validate_pattern, validate_topic


@pytest.mark.parametrize("topic", ["intel", "intel.ground.kor", "a_b.c-d.0"])
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "named"),
    [
        ("", "empty"),
        ("Intel.ground", '"Intel"'),
        ("intel..kor", 'part 2 is ""'),
        ("intel.*", '"*"'),
        ("intel.>", '">"'),
        ("intel ground", '"intel ground"'),
        ("a." * 200, "longer than"),
    ],
)
def test_invalid_topics_name_the_part(topic: str, named: str) -> None:
    with pytest.raises(TopicError) as err:
        validate_topic(topic)
    assert named in str(err.value)


@pytest.mark.parametrize("pattern", [">", "*", "intel.>", "intel.*.kor", "*.*.>"])
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "named"),
    [("intel.>.kor", "only as the last part"), ("intel.k*", '"k*"'), ("", "empty"), (".", '""')],
)
def test_invalid_patterns(pattern: str, named: str) -> None:
    with pytest.raises(TopicError) as err:
        validate_pattern(pattern)
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("intel.ground.kor", "intel.ground.kor", True),
        ("intel.ground.kor", "intel.ground", False),
        ("intel.ground", "intel.ground.kor", False),
        ("intel.*", "intel.ground", True),
        ("intel.*", "intel.ground.kor", False),  # * is exactly one token
        ("intel.*", "intel", False),
        ("*.ground.*", "intel.ground.kor", True),
        ("intel.>", "intel.ground", True),
        ("intel.>", "intel.ground.kor.north", True),
        ("intel.>", "intel", False),  # > needs at least one token
        (">", "anything.at.all", True),
        ("intel.*.>", "intel.ground", False),
        ("intel.*.>", "intel.ground.kor", True),
        ("intel", "intelx", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_topic_matches_rejects_malformed_input() -> None:
    with pytest.raises(TopicError):
        topic_matches("intel.>", "INTEL.x")
    with pytest.raises(TopicError):
        topic_matches("intel.>.x", "intel.a.x")


def test_any_match() -> None:
    assert any_match(["ops.*", "intel.>"], "intel.air")
    assert not any_match(["ops.*", "intel.>"], "logistics.air")
    assert not any_match([], "intel.air")
