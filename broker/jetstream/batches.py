"""One atomic batch (ADR-50), pinned to the stream's tail: all entries stored, or none.

The first entry carries ``Nats-Expected-Last-Sequence``: the server stores the batch
only if the stream's last sequence is still the one the batch was planned on, so the
sequences its entries get are known before it is sent (an acceptance record can name
its message's offset), and two brokers can never both commit on the same state.

Outcomes: the last sequence stored; ``WrongLastSequence`` (someone else committed
first: nothing was stored); ``OutcomeUnknown`` (no answer: the caller must find out
whether the batch is in the stream, by its ``Coalition-Batch`` header); ``StoreFull``
or ``StoreError`` when the server refused it (nothing stored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client

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


def _check(reply: bytes, *, final: bool) -> int:
    if not reply:
        if final:
            raise OutcomeUnknown("the cluster sent an empty acknowledgement")
        return 0
    answer = json.loads(reply)
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


async def publish(
    nc: Client, entries: Sequence[Entry], *, expected_last: int, batch_id: str, timeout: float
) -> int:
    """Store entries as one atomic batch after stream sequence expected_last; return the
    last sequence stored. Raises WrongLastSequence, OutcomeUnknown, NotStored, StoreFull,
    StoreError (see the module docstring)."""
    if not entries or len(entries) > MAX_ENTRIES:
        raise ValueError(f"a batch holds 1 to {MAX_ENTRIES} entries, not {len(entries)}")
    n = len(entries)
    try:
        for i, e in enumerate(entries, 1):
            headers = {**e.headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            if i == 1:
                headers["Nats-Expected-Last-Sequence"] = str(expected_last)
            if i == n:
                headers["Nats-Batch-Commit"] = "1"
                reply = await nc.request(e.subject, e.data, timeout=timeout, headers=headers)
                return _check(reply.data, final=True)
            if i == 1:
                reply = await nc.request(e.subject, e.data, timeout=timeout, headers=headers)
                _check(reply.data, final=False)
            else:
                await nc.publish(e.subject, e.data, headers=headers)
    except nats.errors.NoRespondersError as exc:
        raise NotStored("no stream leader answered") from exc
    except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError, OSError) as exc:
        raise OutcomeUnknown(f"the cluster did not answer ({type(exc).__name__})") from exc
    except nats.errors.Error as exc:
        raise OutcomeUnknown(f"the cluster did not answer ({exc})") from exc
    raise AssertionError("unreachable")
