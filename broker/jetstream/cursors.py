"""Subscribers' cursors in a JetStream key-value bucket, changed by compare-and-set.

Why a KV bucket and not one durable pull consumer per partner and precedence: the store
interface promises more than a consumer's ack floor can say. A cursor moves only over
the contiguous prefix of settled offsets, a settled mark above it is kept until the
cursor passes it, ``pending_and_head`` may exclude offsets in flight and must read
FLASH first across the whole backlog, and ``backlog_count`` and retention's notices ask
which offsets a subscriber has settled. One key per subscriber holds exactly that state
(the cursor and the settled marks above it), so every question is answered from one
read, the same on every broker; and every change is a compare-and-set on the key's
revision, so two brokers settling for one subscriber at once both land (the loser reads
again and re-applies its marks) and neither undoes the other. Reads go to the bucket's
stream leader (no direct gets from followers), so a broker never acts on a stale cursor.

The bucket keeps one revision per key (history 1), replicated like the messages.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from broker.jetstream import codec
from broker.jetstream.connect import ClusterSettings, placed
from broker.jetstream.reading import through_elections
from broker.store.base import StoreError

_RETRIES = 100


@dataclass(frozen=True)
class CursorState:
    """A subscriber's cursor, the offsets it settled above it, and the key's revision."""

    cursor: int
    settled: frozenset[int]
    revision: int


def _encode(cursor: int, settled: frozenset[int]) -> bytes:
    return json.dumps({"c": cursor, "s": sorted(settled)}, separators=(",", ":")).encode()


def _decode(data: bytes | None, revision: int) -> CursorState:
    value = json.loads(data or b"{}")
    return CursorState(int(value["c"]), frozenset(int(o) for o in value["s"]), revision)


def no_cursor(subscriber: str) -> StoreError:
    return StoreError(f"subscriber {subscriber!r} has no cursor; call ensure_cursor first")


class Cursors:
    """The cursor bucket of one deployment; open with ``await Cursors.open(js, settings)``."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, settings: ClusterSettings) -> Cursors:
        bucket = settings.name("CURSORS")
        config = KeyValueConfig(
            bucket=bucket,
            history=1,
            replicas=settings.replicas,
            storage=StorageType.FILE,
            direct=False,
        )
        try:
            kv = await through_elections(lambda: js.key_value(bucket), "open the cursors")
        except nats.js.errors.BucketNotFoundError:
            kv = await through_elections(
                lambda: placed(lambda: js.create_key_value(config), f"bucket {bucket}"),
                "create the cursors' bucket",
            )
        return cls(kv)

    async def get(self, subscriber: str) -> CursorState | None:
        """The subscriber's state, None if it has no cursor."""
        try:
            entry = await through_elections(
                lambda: self._kv.get(codec.token(subscriber)), f"read the cursor of {subscriber!r}"
            )
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return _decode(entry.value, int(entry.revision or 0))

    async def require(self, subscriber: str) -> CursorState:
        """The subscriber's state; raises StoreError if it has no cursor."""
        state = await self.get(subscriber)
        if state is None:
            raise no_cursor(subscriber)
        return state

    async def ensure(self, subscriber: str, at_offset: int) -> int:
        """Create the cursor at at_offset unless one exists; return the cursor."""
        for _ in range(_RETRIES):
            state = await self.get(subscriber)
            if state is not None:
                return state.cursor
            try:
                value = _encode(at_offset, frozenset())
                await through_elections(
                    functools.partial(self._kv.create, codec.token(subscriber), value),
                    f"create the cursor of {subscriber!r}",
                )
                return at_offset
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another broker created it first: read theirs
        raise StoreError(f"message store failed: could not create the cursor of {subscriber!r}")

    async def change(
        self, state: CursorState, subscriber: str, cursor: int, settled: frozenset[int]
    ) -> bool:
        """Write the new state if the key is still at state's revision; False if it moved."""
        if cursor == state.cursor and settled == state.settled:
            return True
        try:
            value = _encode(cursor, settled)
            await through_elections(
                lambda: self._kv.update(codec.token(subscriber), value, last=state.revision),
                f"move the cursor of {subscriber!r}",
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def all(self) -> dict[str, CursorState]:
        """Every subscriber's state (for retention's notices)."""
        try:
            keys = await through_elections(self._kv.keys, "list the cursors")
        except nats.js.errors.NoKeysError:
            return {}
        out: dict[str, CursorState] = {}
        for key in keys:
            try:
                entry = await through_elections(
                    functools.partial(self._kv.get, key),
                    f"read the cursor {key}",
                )
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            out[codec.untoken(key)] = _decode(entry.value, int(entry.revision or 0))
        return out
