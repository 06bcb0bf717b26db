"""Acknowledgements the store cannot settle (its cursor is gone, as after a long election
a StoreError says): the delivery stream ends UNAVAILABLE with a sentence a person
understands, rather than staying open and stuck; once the store answers again the
subscriber reconnects and the message it acknowledged is delivered again (the cursor did
not move past it). Both backends, a real broker and a real partner client."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc
import pytest

from broker.jetstream import codec
from broker.jetstream.store import JetStreamMessageStore
from broker.server import Broker
from clients.sdk import ClientError
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2
from tests.helpers import admit, partner, policy, running_broker

pytestmark = pytest.mark.asyncio

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")


class CursorRemoved:
    """Take USA's cursor out of the broker's store, then put it back as it was."""

    def __init__(self, broker: Broker, data: Path) -> None:
        self.broker, self.data = broker, data
        self.saved: object = None

    async def __aenter__(self) -> None:
        store = self.broker.store
        if isinstance(store, JetStreamMessageStore):
            kv = store._cursors._kv
            self.saved = (await kv.get(codec.token("USA"))).value
            await kv.delete(codec.token("USA"))
        else:
            with sqlite3.connect(self.data / "messages.db") as db:
                self.saved = db.execute(
                    "SELECT cursor FROM cursors WHERE subscriber='USA'"
                ).fetchone()
                db.execute("DELETE FROM cursors WHERE subscriber = 'USA'")

    async def __aexit__(self, *_: object) -> None:
        store = self.broker.store
        if isinstance(store, JetStreamMessageStore):
            assert isinstance(self.saved, bytes)
            await store._cursors._kv.put(codec.token("USA"), self.saved)
        else:
            assert isinstance(self.saved, tuple)
            with sqlite3.connect(self.data / "messages.db") as db:
                db.execute("INSERT INTO cursors VALUES ('USA', ?)", self.saved)


async def test_acknowledgements_the_store_cannot_settle_end_the_stream_unavailable(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    data = tmp_path / "b"
    broker = await running_broker(pki, data, **backend)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, broker.port, policy(code))
        kor, usa = partner(pki, "KOR", broker.port), partner(pki, "USA", broker.port)
        try:
            for c in (kor, usa):
                await c.register_keys()
            sealed = await kor.seal(b"acknowledged once", topic="intel.ground", label=LABEL)
            [res] = await kor.publish([sealed.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED
            sub = usa.subscribe(["intel.>"])
            it = aiter(sub)
            d = await asyncio.wait_for(anext(it), 10)
            async with CursorRemoved(broker, data):
                await sub.ack([d.offset])
                with pytest.raises(ClientError) as info:
                    await asyncio.wait_for(anext(it), 15)
            assert info.value.status == grpc.StatusCode.UNAVAILABLE
            assert "acknowledgements" in info.value.message
            assert "reconnect" in info.value.message
            again = usa.subscribe(["intel.>"])
            d2 = await asyncio.wait_for(anext(aiter(again)), 10)
            assert d2.offset == d.offset
            assert (await usa.open(d2)).plaintext == b"acknowledged once"
            await again.aclose()
        finally:
            await kor.close()
            await usa.close()
    finally:
        await broker.stop(grace=1)
