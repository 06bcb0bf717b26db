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
