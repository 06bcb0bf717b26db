"""Topics and NATS-style topic patterns (`*` one token, `>` one or more, last only)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

_TOKEN = re.compile(r"[a-z0-9_-]+")
_MAX_LEN = 255


class TopicError(ValueError):
    """A topic or pattern that is not well formed; the message names the bad part."""


def _tokens(text: str, what: str) -> list[str]:
    if not isinstance(text, str) or not text:
        raise TopicError(f"bad {what}: empty")
    if len(text) > _MAX_LEN:
        raise TopicError(f"bad {what}: longer than {_MAX_LEN} characters")
    return text.split(".")


def validate_topic(topic: str) -> str:
    """Return the topic if it is dot-separated `[a-z0-9_-]+` parts; raises TopicError."""
    for i, part in enumerate(_tokens(topic, "topic")):
        if not _TOKEN.fullmatch(part):
            raise TopicError(f'bad topic {topic!r}: part {i + 1} is "{part}", expected [a-z0-9_-]+')
    return topic


def validate_pattern(pattern: str) -> str:
    """Return the pattern if it is a topic with `*` parts and an optional final `>`."""
    parts = _tokens(pattern, "topic pattern")
    for i, part in enumerate(parts):
        if part == ">" and i == len(parts) - 1:
            continue
        if part != "*" and not _TOKEN.fullmatch(part):
            where = "only as the last part" if part == ">" else "[a-z0-9_-]+, * or a final >"
            raise TopicError(
                f'bad topic pattern {pattern!r}: part {i + 1} is "{part}", expected {where}'
            )
    return pattern


@functools.lru_cache(maxsize=1024)
def _pattern_parts(pattern: str) -> tuple[str, ...]:
    return tuple(validate_pattern(pattern).split("."))


@functools.lru_cache(maxsize=4096)
def _topic_parts(topic: str) -> tuple[str, ...]:
    return tuple(validate_topic(topic).split("."))


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether the pattern matches the topic; raises TopicError if either is malformed."""
    # Parsing is cached: routing asks the same few patterns and topics again and again.
    want = _pattern_parts(pattern)
    have = _topic_parts(topic)
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i  # ">" needs at least one part
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(want) == len(have)


def any_match(patterns: Iterable[str], topic: str) -> bool:
    """Whether any pattern matches the topic; raises TopicError if any is malformed."""
    return any(topic_matches(p, topic) for p in patterns)


class _Node:
    """One level of a PatternSet: the pattern tokens that may come next."""

    __slots__ = ("end", "literal", "rest", "star")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.rest = False  # a pattern ends with ">" here
        self.end = False  # a pattern ends here


class PatternSet:
    """Topic patterns held as a subject tree (a trie over tokens, as NATS's sublist).

    Matching a topic walks the tree token by token, following at most the literal
    child and the ``*`` child at each level, so its cost depends on the topic's
    tokens and the tree's branching, not on how many patterns there are. The tree is
    a tree: no node is reached twice, so the walk is also bounded by its size.
    Raises TopicError (from the constructor) if a pattern is malformed.
    """

    __slots__ = ("_root", "_size")

    def __init__(self, patterns: Iterable[str]) -> None:
        self._root = _Node()
        self._size = 0
        for p in patterns:
            node = self._root
            parts = validate_pattern(p).split(".")
            for part in parts[:-1]:
                node = _child(node, part)
            last = parts[-1]
            if last == ">":
                fresh = not node.rest
                node.rest = True
            else:
                node = _child(node, last)
                fresh = not node.end
                node.end = True
            self._size += fresh

    def __len__(self) -> int:
        """How many distinct patterns the set holds."""
        return self._size

    def matches(self, topic: str) -> bool:
        """Whether some pattern matches the topic; raises TopicError if it is malformed."""
        return _match(self._root, _topic_parts(topic), 0)

    def covers(self, pattern: str) -> bool:
        """Whether one pattern of the set matches every topic the pattern can match.

        A literal is covered by the same literal or ``*``, ``*`` only by ``*``, and the
        rest (``>`` or any tokens) by a ``>`` at that level. Raises TopicError if the
        pattern is malformed.
        """
        return _cover(self._root, _pattern_parts(pattern), 0)


def _child(node: _Node, part: str) -> _Node:
    if part == "*":
        if node.star is None:
            node.star = _Node()
        return node.star
    nxt = node.literal.get(part)
    if nxt is None:
        nxt = node.literal[part] = _Node()
    return nxt


def _match(node: _Node, have: tuple[str, ...], i: int) -> bool:
    # Iterative over the literal chain, recursive only where a "*" branches off.
    n = len(have)
    while True:
        if i == n:
            return node.end
        if node.rest:  # ">" takes the remaining (one or more) tokens
            return True
        if node.star is not None and _match(node.star, have, i + 1):
            return True
        nxt = node.literal.get(have[i])
        if nxt is None:
            return False
        node, i = nxt, i + 1


def _cover(node: _Node, want: tuple[str, ...], i: int) -> bool:
    n = len(want)
    while True:
        if i == n:
            return node.end
        if node.rest:  # the pattern still needs at least one token here: ">" takes it
            return True
        part = want[i]
        if part == ">":  # only a ">" covers any number of tokens
            return False
        if node.star is not None and _cover(node.star, want, i + 1):
            return True
        if part == "*":  # a literal does not cover every token
            return False
        nxt = node.literal.get(part)
        if nxt is None:
            return False
        node, i = nxt, i + 1
