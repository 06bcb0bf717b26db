"""The subject tree (PatternSet) against the pattern-by-pattern matcher it replaces."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalition.topics import PatternSet, TopicError, any_match, topic_matches

# A small alphabet, so random patterns and topics overlap often.
WORDS = ("a", "b", "c")
word = st.sampled_from(WORDS)
topic_st = st.lists(word, min_size=1, max_size=6).map(".".join)
pattern_st = st.builds(
    lambda parts, tail: ".".join(parts + ([">"] if tail else [])),
    st.lists(st.sampled_from((*WORDS, "*")), min_size=1, max_size=5),
    st.booleans(),
) | st.just(">")
patterns_st = st.lists(pattern_st, max_size=12)


def _old_covers(a: list[str], p: list[str]) -> bool:
    """The coverage rule as it was before the tree (recursive, pattern by pattern)."""
    if not a:
        return not p
    if a[0] == ">":
        return bool(p)
    if not p or p[0] == ">":
        return False
    if a[0] != "*" and a[0] != p[0]:
        return False
    return _old_covers(a[1:], p[1:])


@settings(max_examples=500, deadline=None)
@given(patterns_st, st.lists(topic_st, min_size=1, max_size=8))
def test_tree_matches_exactly_what_any_match_matches(
    patterns: list[str], topics: list[str]
) -> None:
    tree = PatternSet(patterns)
    for t in topics:
        assert tree.matches(t) is any_match(patterns, t), (patterns, t)


@settings(max_examples=500, deadline=None)
@given(patterns_st, pattern_st)
def test_tree_covers_exactly_what_one_allowed_pattern_covers(
    allowed: list[str], pattern: str
) -> None:
    expected = any(a == pattern or _old_covers(a.split("."), pattern.split(".")) for a in allowed)
    assert PatternSet(allowed).covers(pattern) is expected


# Every topic of up to 5 tokens over a slightly larger alphabet: a finite stand-in for
# "every topic", enough to catch a coverage answer that lets a pattern reach further.
ALL_TOPICS = [
    ".".join(ts) for n in range(1, 6) for ts in itertools.product((*WORDS, "d"), repeat=n)
]


@settings(max_examples=200, deadline=None)
@given(patterns_st, pattern_st)
def test_covered_pattern_never_matches_an_unpermitted_topic(
    allowed: list[str], pattern: str
) -> None:
    if not PatternSet(allowed).covers(pattern):
        return
    for t in ALL_TOPICS:
        if topic_matches(pattern, t):
            assert any_match(allowed, t), (allowed, pattern, t)


def test_len_counts_distinct_patterns() -> None:
    assert len(PatternSet([])) == 0
    assert len(PatternSet(["a.>", "a.>", "a", "a.*", "*", ">"])) == 5


def test_malformed_input_is_refused() -> None:
    with pytest.raises(TopicError):
        PatternSet(["intel.>.x"])
    with pytest.raises(TopicError):
        PatternSet(["intel.>"]).matches("INTEL.x")
    with pytest.raises(TopicError):
        PatternSet(["intel.>"]).covers("intel.k*")


def test_deep_patterns_do_not_exhaust_the_stack() -> None:
    # 127 tokens, the most a 255-character pattern holds, every one a branch.
    deep = ".".join(["*"] * 127)
    tree = PatternSet([deep, ".".join(["a"] * 127), ".".join(["a"] * 126 + ["b"])])
    assert tree.matches(".".join(["c"] * 127))
    assert not tree.matches(".".join(["c"] * 126))
    assert tree.covers(deep)


def test_match_cost_does_not_grow_with_the_number_of_patterns() -> None:
    """100,000 patterns (the finding's scale): a miss walks two levels, not 100,000."""
    many = PatternSet(f"intel.p{i}.>" for i in range(100_000))
    assert len(many) == 100_000
    t0 = time.perf_counter()
    for i in range(1000):
        assert not many.matches(f"intel.new{i}.x")
        assert many.matches(f"intel.p{i * 97}.x")
    elapsed = time.perf_counter() - t0
    # any_match over the same patterns takes ~0.1 s per topic here, 200 s for these;
    # the tree takes a few ms in all. The bound is generous for a shared machine.
    assert elapsed < 5.0
