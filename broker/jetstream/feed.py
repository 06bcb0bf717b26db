"""The store stream, read in order into the view: what other brokers wrote reaches this one.

An ordered push consumer (ephemeral, recreated by the client from the next sequence when
a heartbeat is missed or a gap seen, so a dead server only delays it) delivers every
entry of the store's stream; each is folded into the view. ``wait_for(seq)`` returns
once the view has read up to seq: the writer uses it after another broker committed
first, reads use it for an offset the view has not reached yet.

The stream's last entry is never deleted (the store deletes only entries below the last
one its view has read), so a view has read every live entry up to the stream's last
sequence exactly when its ``applied`` reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from broker.jetstream.reading import through_elections
from broker.jetstream.view import StoreView
from broker.store.base import StoredMessage

HEARTBEAT_S = 1.0


class Feed:
    """Folds the stream into a view; see the module docstring."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subject: str,
        view: StoreView,
        on_message: Callable[[StoredMessage], None],
    ) -> None:
        self._js = js
        self._stream = stream
        self._subject = subject
        self._view = view
        self._on_message = on_message
        self._moved = asyncio.Event()
        self._sub: JetStreamContext.PushSubscription | None = None

    async def start(self) -> None:
        """Subscribe from the first entry, and wait until the view read the whole stream."""
        self._sub = await through_elections(
            lambda: self._js.subscribe(
                self._subject,
                stream=self._stream,
                cb=self._deliver,
                ordered_consumer=True,
                idle_heartbeat=HEARTBEAT_S,
                deliver_policy=DeliverPolicy.ALL,
            ),
            "read the stream",
        )
        await self.wait_for(await self.last_sequence(), timeout=120)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _deliver(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        stored = self._view.apply(seq, msg.subject, msg.headers or {}, msg.data)
        if stored is not None:
            self._on_message(stored)
        self._moved.set()

    async def wait_for(self, seq: int, timeout: float) -> None:
        """Return once the view has read every entry up to seq; raises TimeoutError."""
        async with asyncio.timeout(timeout):
            while self._view.applied < seq:
                self._moved.clear()
                await self._moved.wait()

    async def last_sequence(self) -> int:
        """The stream's last sequence, asked of its leader (waiting through an election);
        raises StoreError when no leader answers."""
        info = await through_elections(
            lambda: self._js.stream_info(self._stream), "read the stream's last sequence"
        )
        return int(info.state.last_seq)

    async def wait_for_head(self, head: Callable[[], int], offset: int, timeout: float) -> bool:
        """Wait until head() reaches offset (or timeout); return whether it did."""
        try:
            async with asyncio.timeout(timeout):
                while head() < offset:
                    self._moved.clear()
                    await self._moved.wait()
        except TimeoutError:
            return False
        return True
