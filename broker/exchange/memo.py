"""Memo: the one bounded cache type of the exchange.

Every cache of the exchange (parsed labels, policy decisions, parsed stored headers,
a subscription's topic matches, certified signing keys) is a Memo, so each is bounded
and they all forget the same way.

Eviction rule: least recently used. A hit (get) makes the key the most recently used;
put adds or replaces a key as the most recently used and, when that takes the memo over
its size, drops the least recently used key. A Memo never holds more than ``size`` keys.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """At most ``size`` keys (size >= 1), least recently used evicted first."""

    __slots__ = ("_items", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a memo holds at least one key, not {size}")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value remembered for key (now the most recently used), or None."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: K, value: V) -> None:
        """Remember value for key, evicting the least recently used key past size."""
        items = self._items
        items[key] = value
        items.move_to_end(key)
        if len(items) > self.size:
            items.popitem(last=False)

    def discard(self, key: K) -> None:
        """Forget key if it is remembered."""
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
