"""Reading and deleting the store stream's entries by sequence, and creating the stream.

Envelopes are not kept in the view: they are read from the stream by sequence (from
the stream's leader, not a possibly lagging follower), with a cache of recent messages
bounded by bytes (a message just appended is usually delivered at once). Deletion is
housekeeping only (the state already says what is gone, see view); it never deletes
the last entry the view has read, so the stream's last entry always exists (see feed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from broker.jetstream import codec
from broker.jetstream.connect import placed
from broker.jetstream.view import StoreView
from broker.store.base import StoredMessage, StoreError

CACHE_BYTES = 32 << 20
_PARALLEL = 32
ELECTION_S = 60.0  # how long a read or a cursor change waits for a leader

T = TypeVar("T")
# What a request answers while a stream or the cluster elects a leader.
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    TimeoutError,
)


async def through_elections(call: Callable[[], Awaitable[T]], what: str) -> T:
    """call(), again while the cluster answers that it has no leader (up to ELECTION_S);
    then StoreError naming what could not be done. call must be safe to repeat."""
    deadline = time.monotonic() + ELECTION_S
    while True:
        try:
            return await call()
        except TRANSIENT as exc:
            if time.monotonic() > deadline:
                raise StoreError(
                    f"message store failed: could not {what}: the cluster did not answer "
                    f"within {ELECTION_S:.0f} s ({type(exc).__name__})"
                ) from exc
            await asyncio.sleep(0.25)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or check that the existing one can hold the store."""
    name = config.name
    assert name is not None
    try:
        info = await through_elections(lambda: js.stream_info(name), "read the stream")
    except nats.js.errors.NotFoundError:
        await through_elections(
            lambda: placed(lambda: js.add_stream(config), f"stream {name}"), "create the stream"
        )
        return
    if not info.config.allow_atomic:
        raise StoreError(
            f"stream {config.name} exists without atomic batches (allow_atomic); "
            "the message store needs them to commit a message with its audit records"
        )


class Envelopes:
    """Stored messages by offset (cache, then the stream); deletions of stale entries."""

    def __init__(self, js: JetStreamContext, stream: str, view: StoreView) -> None:
        self._js = js
        self._stream = stream
        self._view = view
        self._cache: OrderedDict[int, StoredMessage] = OrderedDict()
        self._cached_bytes = 0

    def remember(self, m: StoredMessage) -> None:
        """Keep m for later reads, evicting the oldest past CACHE_BYTES."""
        if m.offset in self._cache:
            return
        self._cache[m.offset] = m
        self._cached_bytes += len(m.envelope)
        while self._cached_bytes > CACHE_BYTES and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old.envelope)

    async def get(self, offset: int, *, cached: bool = True) -> StoredMessage | None:
        """The message at offset, None if the stream no longer holds one there."""
        if cached and offset in self._cache:
            return self._cache[offset]
        try:
            raw = await through_elections(
                lambda: self._js.get_msg(self._stream, seq=offset), f"read offset {offset}"
            )
        except nats.js.errors.NotFoundError:
            return None
        subject = raw.subject or ""
        if self._view.subjects.kind(subject) != "msg":
            return None
        try:
            return codec.message_from(offset, raw.headers or {}, raw.data or b"")
        except (KeyError, ValueError):
            return None

    async def get_many(
        self, offsets: Sequence[int], *, cached: bool = True
    ) -> list[StoredMessage | None]:
        """get() for each offset, in order, a bounded number at a time."""
        out: list[StoredMessage | None] = []
        for i in range(0, len(offsets), _PARALLEL):
            part = offsets[i : i + _PARALLEL]
            out += await asyncio.gather(*(self.get(o, cached=cached) for o in part))
        return out

    async def stream_bytes(self) -> int:
        """Bytes the stream holds (one replica's worth), 0 if the leader does not answer."""
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            return int((await self._js.stream_info(self._stream)).state.bytes)
        return 0

    async def purge_outbox(self, subject: str, through: int) -> None:
        """Delete the outbox entries up to through, but never the last entry read."""
        cut = min(through, self._view.applied - 1)
        if cut < 1:
            return
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await self._js.purge_stream(self._stream, seq=cut + 1, subject=subject)

    async def delete(self, seqs: Iterable[int]) -> set[int]:
        """Delete these entries (below the last one read); return those now gone."""
        wanted = sorted(s for s in seqs if s < self._view.applied)
        gone: set[int] = set()

        async def one(seq: int) -> None:
            try:
                await self._js.delete_msg(self._stream, seq)
            except nats.js.errors.NotFoundError:
                pass
            except nats.js.errors.APIError as exc:
                if "no message found" not in str(exc).lower():
                    return
            except (nats.errors.Error, TimeoutError):
                return
            gone.add(seq)

        for i in range(0, len(wanted), _PARALLEL):
            await asyncio.gather(*(one(s) for s in wanted[i : i + _PARALLEL]))
        for seq in gone:
            self._cache.pop(seq, None)
        return gone
