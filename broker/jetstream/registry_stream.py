"""The registry stream of a JetStream deployment, and the machinery every registry
change goes through: the watch that keeps the view current, compare-and-set batches,
and the retries that make a lost acknowledgement harmless.

Storage. One stream, ``<prefix>_REGISTRY`` (R``replicas``, file storage, atomic batches
allowed, single messages never deleted), with a subject per fact (see
``broker.jetstream.registry_view``). It is a KV bucket in all but name: a KV bucket is a
stream with a subject per key and compare-and-set on the key's last sequence, which is
what this uses; unlike the KV API it keeps every version of a key (the policy history,
a proposal's making and decision) and writes several keys in one atomic batch.

A change and its audit record together. Each change is one atomic batch (ADR-50): its
audit record on ``reg.outbox`` and its facts, each fact carrying
``Nats-Expected-Last-Subject-Sequence`` = the subject's last sequence this broker saw.
The cluster stores the whole batch or nothing, so a change is never without its audit
record nor an audit record without its change; and a batch made against a state that
has moved on is refused as a whole. That is the compare-and-set two operators on two
brokers race on: a proposal decided twice, two policy versions with the same number, a
change made against an old version. The loser reads the subject again (the view waits
for the watch to reach the subject's last sequence, asked of the stream's leader) and
decides anew against what won: a stale expected version raises ``StaleVersion``, a
decided proposal answers False, a partner registered twice raises ``AlreadyExists``,
exactly as the SQLite registry answers inside its transaction.

Unknown outcomes. A batch whose acknowledgement is lost (a leader dies, an election is
under way) may or may not be stored; batches cannot carry ``Nats-Msg-Id``, so every
change carries its own change id instead. After a timeout the view is brought up to the
subject's last sequence and the change id looked for: found, the change is done;
not found, it is tried again (still compare-and-set, so it cannot apply twice), until
``write_timeout_s`` has passed, when the caller gets ``Unavailable``.

The view. Every broker watches the whole stream (an ordered consumer from the first
message) and keeps the current records, policy histories, proposals and outbox rows in
memory; get and all read it without waiting, as today. A broker's own change is applied
to its view as soon as the cluster acknowledges it (its sequences are known: a batch
takes consecutive sequences ending at the acknowledged one), so the change is visible
when the call returns; the watch skips it when it arrives. ``on_change`` callbacks hear
of every change, this broker's (``local``) and every other broker's, once each.

The outbox. Its rows are the ``reg.outbox`` messages the watch has delivered (never
those applied early: the watch delivers in stream order, so the rows read never skip
one that a later read could find below them, which the drainer's mark relies on); its
ids are stream sequences, ascending and never reused. ``forget_outbox`` purges the
subject up to the mark.

"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from broker.audit.items import AuditItem, encode, with_detail
from broker.errors import Unavailable
from broker.jetstream.connect import ClusterSettings, placed
from broker.jetstream.registry_view import H_CHANGE, H_TIME, Outgoing, View
from broker.registry_types import ChangeCallback, tell
from broker.store.base import OutboxRow

log = logging.getLogger("coalition.broker.registry")

# A compare-and-set lost: 10071 names the subject's last sequence; 10164 does not (a
# replicated stream, or another write to the subject still in flight).
_WRONG_LAST_SEQUENCE = (10071, 10164)
# A batch the server saw only part of (a message lost across a reconnect): nothing of
# it is stored, so it is sent again.
_BATCH_INCOMPLETE = (10175, 10176)
# No answer, so no knowing whether a write was stored (js.publish reports no responders
# as NoStreamResponseError).
_UNCERTAIN = (
    NatsTimeout,
    NoRespondersError,
    NoStreamResponseError,
    ConnectionClosedError,
    asyncio.TimeoutError,
)


class Behind(Exception):
    """The view holds less than the caller knows of: read the stream again first."""


class _Conflict(Exception):
    """The batch was refused: a subject moved on since the view read it."""


class _Uncertain(Exception):
    """No answer: the batch may or may not be stored."""


@dataclass
class Plan:
    """A change's messages, made against the view, and what the call returns."""

    messages: list[Outgoing] = field(default_factory=list)
    result: Any = None


class RegistryStream:
    """The registry's stream, its view and its writes (see the module docstring)."""

    def __init__(self, nc: Client, settings: ClusterSettings, *, write_timeout_s: float) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=5)
        self.settings = settings
        self.name = settings.name("REGISTRY")
        self.write_timeout_s = write_timeout_s
        self.view = View(settings.subject("reg") + ".")
        self.callbacks: list[ChangeCallback] = []
        self._mine: set[str] = set()  # change ids made through this object
        self._written = 0  # the highest sequence this object wrote
        self._delivered = 0  # the highest sequence the watch delivered
        self._moved = asyncio.Event()
        self._synced = asyncio.Event()
        self._sub: Any = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self, sync_timeout_s: float) -> None:
        """Create the stream if it is missing, read it whole, then watch it. Raises
        ``Unavailable`` if the cluster cannot be read within sync_timeout_s (an answer
        that does not come in time is asked again until then: a loaded cluster, or one
        electing a leader, answers late)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + sync_timeout_s
        while True:
            try:
                await self._ensure_stream()
                info = await self._js.stream_info(self.name)
                if info.state.messages == 0:
                    self._synced.set()
                self._sub = await self._js.subscribe(
                    self.settings.subject("reg", ">"),
                    stream=self.name,
                    ordered_consumer=True,
                    idle_heartbeat=1.0,
                    cb=self._on_message,
                )
                await asyncio.wait_for(self._synced.wait(), max(deadline - loop.time(), 0.1))
                return
            except (*_UNCERTAIN, APIError) as exc:
                retry = isinstance(exc, _UNCERTAIN) or (getattr(exc, "code", 0) or 0) >= 500
                if self._sub is not None or not retry or loop.time() >= deadline:
                    self.close()
                    raise Unavailable(
                        "registry_unavailable",
                        f"the registry stream {self.name} cannot be read from the cluster "
                        f"({type(exc).__name__}: {exc})",
                    ) from exc
                await asyncio.sleep(0.5)

    async def _ensure_stream(self) -> None:
        config = StreamConfig(
            name=self.name,
            description="coalition registry: partners, policies, proposals, key bundles",
            subjects=[self.settings.subject("reg", ">")],
            num_replicas=self.settings.replicas,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            allow_atomic=True,
            allow_direct=True,
            deny_delete=True,
        )
        try:
            await placed(lambda: self._js.add_stream(config), f"stream {self.name}")
        except APIError as exc:
            # Already there with another configuration: use it if it can do what this needs.
            try:
                info = await self._js.stream_info(self.name)
            except NotFoundError:
                raise exc from None  # not there: the cluster refused to make it (say why)
            if not info.config.allow_atomic:
                raise Unavailable(
                    "registry_unavailable",
                    f"the registry stream {self.name} exists without atomic batches "
                    f"allowed ({exc}); an operator must enable allow_atomic on it",
                ) from exc

    # -- the watch ------------------------------------------------------------------------
    async def _on_message(self, msg: Msg) -> None:
        md = msg.metadata
        seq = md.sequence.stream
        headers = msg.headers or {}
        local = headers.get(H_CHANGE, "") in self._mine
        try:
            change = self.view.apply(msg.subject, seq, msg.data, headers, local=local)
        except (DecodeError, ValueError, KeyError) as exc:
            # Only brokers write here; a message none of them could have written is
            # skipped (and said), never allowed to stop the watch.
            log.error("registry message %d on %r unreadable, skipped: %s", seq, msg.subject, exc)
            change = None
        self._delivered = max(self._delivered, seq)
        if md.num_pending == 0:
            self._synced.set()
        self._wake()
        if change is not None:
            tell(self.callbacks, change)

    def _wake(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    async def _until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                raise Unavailable(
                    "registry_unavailable",
                    f"the registry did not catch up with the cluster in time ({what}); "
                    "the cluster may be electing a leader or have lost its quorum; retry",
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._moved.wait(), left)

    async def refresh(self, subjects: list[str]) -> None:
        """Bring the view up to each subject's last sequence now (see _refresh)."""
        await self._refresh(subjects, asyncio.get_running_loop().time() + self.write_timeout_s)

    async def _refresh(self, subjects: list[str], deadline: float) -> None:
        """Bring the view up to each subject's last sequence, as the stream's leader
        reports it (retried through elections until deadline)."""
        loop = asyncio.get_running_loop()
        for subject in subjects:
            while True:
                try:
                    last = (await self._js.get_last_msg(self.name, subject)).seq or 0
                    break
                except NotFoundError:
                    last = 0
                    break
                except (*_UNCERTAIN, APIError) as exc:
                    if loop.time() >= deadline:
                        raise Unavailable(
                            "registry_unavailable",
                            f"the registry stream cannot be read ({type(exc).__name__}); retry",
                        ) from exc
                    await asyncio.sleep(0.25)
            await self._until(_reached(self.view, subject, last), deadline, subject)

    # -- writing --------------------------------------------------------------------------
    async def _publish(self, messages: list[Outgoing]) -> int:
        """Write messages as one atomic batch; return the last one's stream sequence."""
        try:
            if len(messages) == 1:
                m = messages[0]
                ack = await self._js.publish(m.subject, m.data, headers=m.wire_headers())
                return int(ack.seq)
            batch = uuid.uuid4().hex
            reply: Msg | None = None
            for n, m in enumerate(messages, 1):
                headers = {**m.wire_headers(), "Nats-Batch-Id": batch}
                headers["Nats-Batch-Sequence"] = str(n)
                if n == len(messages):
                    headers["Nats-Batch-Commit"] = "1"
                if n == 1 or n == len(messages):
                    reply = await self._nc.request(m.subject, m.data, timeout=5, headers=headers)
                    if reply.data:
                        _check_ack(reply.data)
                else:
                    await self._nc.publish(m.subject, m.data, headers=headers)
            assert reply is not None
            return _check_ack(reply.data)
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise _Conflict(str(exc)) from exc
            status = exc.code or 0
            if exc.err_code in _BATCH_INCOMPLETE or status == 429 or status >= 500:
                raise _Uncertain(str(exc)) from exc
            raise
        except _UNCERTAIN as exc:
            raise _Uncertain(type(exc).__name__) from exc

    async def commit(
        self, make: Callable[[bool], Plan | None], depends_on: Callable[[], list[str]]
    ) -> Plan | None:
        """Make a change against the view and write it (see the module docstring).

        make(fresh) returns the change's plan, None when there is nothing to write, or
        raises the caller's refusal. It is called again after each lost race, so its
        checks see what won. When the caller knows of more than the view holds (a
        version or a partner another broker made a moment ago) make raises ``Behind``
        unless fresh: the view is then brought up to the subjects depends_on() names, and
        make called again with fresh True. Returns the plan written, or None.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.write_timeout_s
        cid = uuid.uuid4().hex
        self._mine.add(cid)
        plan: Plan | None = None
        fresh = False
        while True:
            if plan is not None and cid in self.view.changes:
                return plan  # an earlier try was stored; its acknowledgement was lost
            try:
                plan = make(fresh)
            except Behind:
                subjects = depends_on()
                await self._refresh(subjects, deadline)
                fresh = depends_on() == subjects  # else what was read names more to read
                continue
            if plan is None:
                return None
            for m in plan.messages:
                m.headers[H_CHANGE] = cid
            checked = [m.subject for m in plan.messages if m.expect is not None]
            try:
                last = await self._publish(plan.messages)
            except _Conflict:
                log.info("registry change lost a race; reading the stream again")
                await self._refresh(checked, deadline)
                fresh = True
                continue
            except _Uncertain as exc:
                if loop.time() >= deadline:
                    raise Unavailable(
                        "registry_unavailable",
                        f"the registry change could not be confirmed by the cluster ({exc}); "
                        "it may be electing a leader or have lost its quorum; retry",
                    ) from exc
                log.warning("registry change unconfirmed (%s); checking and retrying", exc)
                await asyncio.sleep(0.25)
                await self._refresh(checked, deadline)
                fresh = True
                continue
            self._written = max(self._written, last)
            first = last - len(plan.messages) + 1
            for n, m in enumerate(plan.messages):
                if self.view.kind_of(m.subject) == "outbox":
                    continue  # outbox rows come from the watch only, in stream order
                change = self.view.apply(m.subject, first + n, m.data, m.headers, local=True)
                if change is not None:
                    tell(self.callbacks, change)
            self._wake()
            return plan

    def outbox(self, audit: AuditItem | None, now_ms: int) -> list[Outgoing]:
        """The outbox message of audit (none without one)."""
        if audit is None:
            return []
        return [
            Outgoing(self.view.subject("outbox"), encode(audit).encode(), {H_TIME: str(now_ms)})
        ]

    # -- the audit outbox (an OutboxSource of broker.audit.drainer) ------------------------
    async def read_outbox(self, after: int, limit: int) -> list[OutboxRow]:
        """Audit records of committed changes with outbox id above after, oldest first;
        each entry's detail carries ``ref`` (``registry:<outbox id>``). Waits (briefly)
        for the watch to deliver this broker's own last change first."""
        deadline = asyncio.get_running_loop().time() + 5.0
        with contextlib.suppress(Unavailable):
            await self._until(lambda: self._delivered >= self._written, deadline, "outbox")
        out = []
        for row in self.view.outbox_rows(after, limit):
            record = with_detail(row.record, ref=f"registry:{row.id}")
            out.append(OutboxRow(row.id, row.time_ms, record))
        return out

    async def forget_outbox(self, through: int) -> None:
        """The audit log holds every record up to through: purge them from the stream."""
        if through <= 0:
            return
        try:
            await self._js.purge_stream(
                self.name, subject=self.view.subject("outbox"), seq=through + 1
            )
        except (*_UNCERTAIN, APIError) as exc:
            raise Unavailable(
                "registry_unavailable",
                f"the registry's drained audit records cannot be purged now ({exc}); retried "
                "after the next drain",
            ) from exc
        self.view.forget(through)

    def close(self) -> None:
        """Stop watching (the connection belongs to the caller)."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(sub.unsubscribe())
        except RuntimeError:  # no loop: the connection's closing ends the watch
            return
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("registry watch not unsubscribed: %s", task.exception())


def _reached(view: View, subject: str, seq: int) -> Callable[[], bool]:
    return lambda: view.last(subject) >= seq


def _check_ack(data: bytes) -> int:
    """The sequence a batch's PubAck names; raises APIError for an error reply."""
    body = json.loads(data)
    if "error" in body:
        APIError.from_error(body["error"])  # raises the error's own class
        raise APIError(description=str(body["error"]))
    return int(body["seq"])
