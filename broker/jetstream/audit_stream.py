"""The audit stream itself: creating it, appending a block only onto the block it was
chained after, and reading blocks back. Every call retries through a leader election
until its deadline, then raises AuditError.

Appends carry ``Nats-Expected-Last-Sequence`` (the stream sequence of the block the new
one is chained after) and ``Nats-Msg-Id`` (the block's id). A publish whose answer was
lost is sent again unchanged: if the first copy was stored, the server's duplicate
window answers with its sequence; if another block was stored first, the server refuses
it (wrong last sequence) and the caller reads the new head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from broker.audit.log import AuditError
from broker.jetstream.audit_blocks import Block, BlockError, Head, decode, encode
from broker.jetstream.connect import ClusterSettings, placed

log = logging.getLogger("coalition.broker.audit")

T = TypeVar("T")

_WRONG_LAST_SEQUENCE = 10071
_STREAM_NAME_IN_USE = 10058
_LAST_SEQ = re.compile(r"wrong last sequence: (\d+)")
# Errors after which the request may or may not have been carried out: ask again.
_UNCERTAIN = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    NoStreamResponseError,  # no stream leader answered (being elected)
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)
_RETRY_STATUS = {503, 408}  # no quorum yet / the leader is being elected
_DUPLICATE_IN_PROCESS = 10158  # the first copy of a message id is still being stored


@dataclass(frozen=True)
class Conflict:
    """The stream holds another block where one was expected: its last sequence now, and
    whether the refused block may have been stored all the same (an answer was lost and
    it was sent again)."""

    last_seq: int
    uncertain: bool


class AuditStream:
    """One deployment's audit stream; see the module docstring."""

    def __init__(self, js: JetStreamContext, settings: ClusterSettings, timeout_s: float) -> None:
        self.js = js
        self.name = settings.name("AUDIT")
        self.subject = settings.subject("audit", "chain")
        self.timeout_s = timeout_s
        self._settings = settings

    def _config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            subjects=[self._settings.subject("audit", ">")],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self._settings.replicas,
            deny_delete=True,
            deny_purge=True,
            allow_direct=False,  # reads go to the leader, never a lagging replica
            duplicate_window=120.0,
        )

    async def create(self) -> None:
        """Create the stream, or check the one there: it must deny delete and purge, and
        keep as many replicas as configured (fewer only with allow_data_loss)."""
        try:
            await self._retry(
                lambda: placed(lambda: self.js.add_stream(self._config()), f"stream {self.name}")
            )
            return
        except APIError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise AuditError(f"cannot create the audit stream {self.name}: {exc}") from exc
        try:
            info = await self._retry(lambda: self.js.stream_info(self.name))
        except APIError as exc:
            raise AuditError(f"cannot read the audit stream {self.name}: {exc}") from exc
        cfg = info.config
        if not (cfg.deny_delete and cfg.deny_purge):
            raise AuditError(f"the audit stream {self.name} allows deleting or purging entries")
        if (cfg.num_replicas or 1) < self._settings.replicas and not self._settings.allow_data_loss:
            raise AuditError(
                f"the audit stream {self.name} keeps {cfg.num_replicas} replicas,"
                f" fewer than the {self._settings.replicas} configured"
            )

    async def append(
        self, block: Block, expected: int, on_commit: Callable[[float], None] | None = None
    ) -> int | Conflict:
        """Store block right after stream sequence expected: its sequence, or Conflict."""
        payload = encode(block)
        headers = {"Nats-Msg-Id": block.id, "Nats-Expected-Last-Sequence": str(expected)}
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts = 0

        def publish() -> Awaitable[PubAck]:
            nonlocal attempts
            attempts += 1
            return self.js.publish(self.subject, payload, timeout=5, headers=headers)

        try:
            ack = await self._retry(publish)
        except APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                found = _LAST_SEQ.search(exc.description or "")
                last = int(found.group(1)) if found else await self.last_seq()
                return Conflict(last, uncertain=attempts > 1)
            raise AuditError(f"audit log failed: {exc}") from exc
        if on_commit is not None:
            on_commit(loop.time() - started)
        return ack.seq

    async def last_seq(self) -> int:
        """The stream's last sequence as the leader reports it now."""
        try:
            info = await self._retry(lambda: self.js.stream_info(self.name))
        except APIError as exc:
            raise AuditError(f"cannot read the audit stream {self.name}: {exc}") from exc
        return int(info.state.last_seq)

    async def read(self, seq: int) -> Block | None:
        """The block at stream sequence seq; None if that message is not a block (it is
        logged: the chain's verification reports what it broke).

        A sequence the leader has just given out may not be readable yet (proposed, not
        yet applied): a missing message is asked for again for a few seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.timeout_s, 5.0)
        while True:
            try:
                msg = await self._retry(lambda: self.js.get_msg(self.name, seq))
                break
            except NotFoundError as exc:
                if loop.time() > deadline:
                    raise AuditError(f"audit stream message {seq} is missing") from exc
                await asyncio.sleep(0.02)
            except APIError as exc:
                raise AuditError(f"cannot read the audit stream {self.name}: {exc}") from exc
        try:
            return decode(msg.data or b"")
        except BlockError as exc:
            log.error("audit stream message %d is not an audit block: %s", seq, exc)
            return None

    async def follow(self, first: int, last: int) -> AsyncGenerator[tuple[int, Block | None], None]:
        """(sequence, block) for the messages first..last, in order, through an ordered
        consumer (one stream of messages instead of one request each). Raises nats
        errors, AuditError if the consumer stalls: the caller reads the rest one by one."""
        if first > last:
            return
        sub = await self.js.subscribe(
            self._settings.subject("audit", ">"),
            stream=self.name,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=first),
            inactive_threshold=60.0,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=5)
                except nats.errors.TimeoutError as exc:
                    raise AuditError("the audit stream stopped delivering") from exc
                seq = msg.metadata.sequence.stream
                try:
                    block: Block | None = decode(msg.data)
                except BlockError as exc:
                    log.error("audit stream message %d is not an audit block: %s", seq, exc)
                    block = None
                yield seq, block
                if seq >= last:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def head(
        self, known: Head, last_seq: int | None = None, look_for: str = ""
    ) -> tuple[Head, bool]:
        """The head at the stream's last block (at or after last_seq when given), and
        whether the block with id look_for was stored after known (then every block since
        known is read to find out)."""
        last = max(last_seq if last_seq is not None else await self.last_seq(), known.stream_seq)
        head: Head | None = None
        found = False
        for seq in range(last, known.stream_seq, -1):
            block = await self.read(seq)
            if block is None:
                continue
            if head is None:
                # The chain's head is in the last block; later messages that are not
                # blocks only move the stream position.
                head = replace(known.after(block, seq), stream_seq=last)
            found = bool(look_for) and block.id == look_for
            if found or not look_for:
                break
        return (head or replace(known, stream_seq=last)), found

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """call, again after a lost answer or an election, until the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        delay = 0.1
        while True:
            try:
                return await call()
            except _UNCERTAIN as exc:
                problem: Exception = exc
            except APIError as exc:
                if exc.code not in _RETRY_STATUS and exc.err_code != _DUPLICATE_IN_PROCESS:
                    raise
                problem = exc
            except nats.errors.Error as exc:
                raise AuditError(f"the audit stream {self.name} failed: {exc}") from exc
            if loop.time() + delay > deadline:
                raise AuditError(
                    f"the audit stream {self.name} did not answer within"
                    f" {self.timeout_s:g} s: {problem!r}"
                )
            log.warning("audit stream %s: %r; asking again", self.name, problem)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
