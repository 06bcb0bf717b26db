"""One atomic batch (ADR-50), pinned to the stream's tail: all entries stored, or none.

The first entry carries ``Nats-Expected-Last-Sequence``: the server stores the batch
only if the stream's last sequence is still the one the batch was planned on, so the
sequences its entries get are known before it is sent (an acceptance record can name
its message's offset), and two brokers can never both commit on the same state.

The entries go out back to back: the first (a request: the server answers it with an
empty acknowledgement or an error), the others, and the commit (a request: the server
answers it with the pub ack), and only then does the writer wait, for both answers at
once. NATS keeps a connection's messages in order, so the server sees the batch whole;
waiting for the first answer before sending the rest would add one round trip to every
commit, and the commit's round trip is the window in which another broker's commit
makes this one's pin fail.

Outcomes: the last sequence stored; ``WrongLastSequence`` (someone else committed
first: nothing was stored); ``OutcomeUnknown`` (no answer: the caller must find out
whether the batch is in the stream, by its ``Coalition-Batch`` header); ``StoreFull``
or ``StoreError`` when the server refused it (nothing stored).
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.store.base import StoreError, StoreFull

MAX_ENTRIES = 1000  # the server's limit on entries per atomic batch

_WRONG_LAST = 10071
_NOT_STORED = {10176}  # incomplete batch: abandoned by the server, nothing stored
_FULL = {10023, 10047, 10054, 10028}  # insufficient resources, maximum bytes/messages
_LAST = re.compile(r"wrong last sequence: (\d+)")


@dataclass(frozen=True)
class Entry:
    """One entry to store: its subject, headers and payload."""

    subject: str
    headers: dict[str, str]
    data: bytes


class WrongLastSequence(Exception):
    """The stream moved on since the batch was planned; ``last`` is where it is now."""

    def __init__(self, last: int) -> None:
        super().__init__(f"the stream's last sequence is {last}")
        self.last = last


class OutcomeUnknown(Exception):
    """No answer from the cluster: the batch may or may not be stored."""


class NotStored(Exception):
    """The server abandoned the batch (nothing stored); sending it again is safe."""


_NO_RESPONDERS = "503"


def _check(reply: Msg, *, final: bool) -> int:
    if reply.headers and reply.headers.get("Status") == _NO_RESPONDERS:
        raise NotStored("no stream leader answered")
    if not reply.data:
        if final:
            raise OutcomeUnknown("the cluster sent an empty acknowledgement")
        return 0
    answer = json.loads(reply.data)
    error = answer.get("error")
    if error:
        code = int(error.get("err_code", 0))
        text = str(error.get("description", "unknown error"))
        if code == _WRONG_LAST:
            found = _LAST.search(text)
            if found:
                raise WrongLastSequence(int(found.group(1)))
            raise NotStored(text)
        if code in _NOT_STORED:
            raise NotStored(text)
        if code in _FULL:
            raise StoreFull(f"message store is full: the cluster refused the write ({text})")
        raise StoreError(f"message store failed: the cluster refused the write ({text})")
    return int(answer.get("seq", 0))


class _Replies:
    """One inbox subscription per connection that routes the batches' answers to the
    futures waiting for them (nats-py's request() sends and waits in one call)."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._next = 0
        self._ready: asyncio.Lock = asyncio.Lock()

    async def expect(self) -> tuple[str, asyncio.Future[Msg]]:
        """A fresh reply subject and the future its answer resolves."""
        if not self._prefix:
            async with self._ready:
                if not self._prefix:
                    prefix = self._nc.new_inbox()
                    await self._nc.subscribe(f"{prefix}.*", cb=self._answer)
                    self._prefix = prefix
        self._next += 1
        subject = f"{self._prefix}.{self._next}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[subject] = future
        return subject, future

    def forget(self, subject: str) -> None:
        self._waiting.pop(subject, None)

    async def _answer(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject, None)
        if future is not None and not future.done():
            future.set_result(msg)


_REPLIES: weakref.WeakKeyDictionary[Client, _Replies] = weakref.WeakKeyDictionary()


async def publish(
    nc: Client, entries: Sequence[Entry], *, expected_last: int, batch_id: str, timeout: float
) -> int:
    """Store entries as one atomic batch after stream sequence expected_last; return the
    last sequence stored. Raises WrongLastSequence, OutcomeUnknown, NotStored, StoreFull,
    StoreError (see the module docstring)."""
    if not entries or len(entries) > MAX_ENTRIES:
        raise ValueError(f"a batch holds 1 to {MAX_ENTRIES} entries, not {len(entries)}")
    n = len(entries)
    replies = _REPLIES.get(nc)
    if replies is None:
        replies = _REPLIES[nc] = _Replies(nc)
    inboxes: list[str] = []
    try:
        first_inbox, first = await replies.expect()
        inboxes.append(first_inbox)
        if n > 1:
            last_inbox, last = await replies.expect()
            inboxes.append(last_inbox)
        else:
            last_inbox, last = first_inbox, first
        for i, e in enumerate(entries, 1):
            headers = {**e.headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            reply = ""
            if i == 1:
                headers["Nats-Expected-Last-Sequence"] = str(expected_last)
                reply = first_inbox
            if i == n:
                headers["Nats-Batch-Commit"] = "1"
                reply = last_inbox
            await nc.publish(e.subject, e.data, reply=reply, headers=headers)
        async with asyncio.timeout(timeout):
            if n > 1:
                _check(await first, final=False)
            return _check(await last, final=True)
    except TimeoutError as exc:
        raise OutcomeUnknown("the cluster did not answer (TimeoutError)") from exc
    except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError, OSError) as exc:
        raise OutcomeUnknown(f"the cluster did not answer ({type(exc).__name__})") from exc
    except nats.errors.Error as exc:
        raise OutcomeUnknown(f"the cluster did not answer ({exc})") from exc
    finally:
        for inbox in inboxes:
            replies.forget(inbox)
