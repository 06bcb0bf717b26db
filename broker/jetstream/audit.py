"""JetStreamAuditLog: the audit log's hash chain in a replicated JetStream stream, written
by every broker of a cluster.

One linear chain, whoever writes it. Each write is one message of the audit stream (a
*block*, see broker.jetstream.audit_blocks): a run of chained entries, the checkpoints
signed over them, and every outbox source's drained mark after it. A broker chains a
block onto the head it knows and publishes it with ``Nats-Expected-Last-Sequence`` set
to the stream sequence of that head. The stream stores it only if nothing was stored
since; otherwise it refuses, the broker reads the new last block, chains its entries
again after it (dropping outbox rows the new marks already cover) and retries. This is
a single sequencer by optimistic concurrency: JetStream's stream leader orders the
writes, so no broker needs a lease, and no election of ours can split the chain in two.
Two brokers racing cost one retry; a broker that was partitioned away cannot append to
a head that has moved.

Why not one chain per broker with cross-signed checkpoints: a verifier would then need
every chain and the cross-signatures to know nothing was dropped between them, the
export format and ``coalition-admin audit verify`` would change, and a broker's chain
would stop when it dies. Why not a lease-elected sequencer: the lease is one more moving
part whose failover the audit would wait on, while the expected-sequence check already
gives the same order with the stream's own election.

Exactly-once draining: the marks travel in the same message as the entries they cover,
and a block only lands right after the block whose marks it was filtered against. Two
brokers draining the same outbox source never both append a row: the slower one is
refused, re-reads the marks, finds its rows covered and appends nothing. A publish whose
answer was lost (the leader died) is sent again with the same ``Nats-Msg-Id``, which
the stream's duplicate window answers with the first copy's sequence; if it was refused
after all, the blocks stored since are searched for its id before anything is chained
again.

Durability: the stream is file-backed, replicated ``settings.replicas`` times, and
refuses deleting or purging a message (``deny_delete``, ``deny_purge``). A write is
acknowledged by the stream leader once a quorum holds it. Reads of the stream go to the
leader (no direct gets from replicas).

Checkpoints: every ``checkpoint_every`` entries and on close, signed by the audit key of
the broker that writes them; each carries that broker's audit certificate, so an export
names every certificate that signed part of it and verifies offline with the CA alone.
``verify()`` trusts this broker's key and every certificate in the chain that the CA
issued to a broker (when the CA is given).

Limits: reads (query, export, verify) scan the stream from its first block; count() and
the drained marks read only the last block. Refusal summaries are counted per broker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.aio.client import Client

from broker.audit.backend import AuditBackend, AuditError
from broker.audit.items import AuditItem, OutboxEntry, entry_fields
from broker.audit.refusals import RefusalSummary
from broker.jetstream.audit_blocks import (
    Block,
    Head,
    SignedCheckpoint,
    chain,
    export_order,
)
from broker.jetstream.audit_reads import SignerTrust, matches, newest, scan
from broker.jetstream.audit_stream import AuditStream, Conflict
from broker.jetstream.connect import ClusterSettings
from coalition.audit_chain import ChainVerifier, VerifyResult, sign_checkpoint
from coalition.clock import wall_clock_ms
from coalition.v1 import audit_pb2

__all__ = ["JetStreamAuditLog"]

log = logging.getLogger("coalition.broker.audit")

# What one block holds at most (the server's max_payload is larger); an outbox batch
# beyond it is written as several blocks, each moving the mark past its own rows.
_BLOCK_BYTES = 256 * 1024


def _size(entry: audit_pb2.AuditEntry) -> int:
    return (
        200
        + len(entry.kind)
        + len(entry.actor)
        + len(entry.partner)
        + len(entry.message_id)
        + len(entry.decision)
        + 2 * len(entry.detail_json)
    )


@dataclass
class _Write:
    """One queued write: entries (records) or an outbox chunk or a checkpoint."""

    fields: list[audit_pb2.AuditEntry] = field(default_factory=list)
    source: str = ""  # an outbox chunk of this source: rows are (id, fields)
    rows: list[tuple[int, audit_pb2.AuditEntry]] = field(default_factory=list)
    checkpoint_at: int | None = None  # a checkpoint of the head at this time (-1: its own)
    only_if_unsigned: bool = False
    future: asyncio.Future[object] | None = None


class JetStreamAuditLog(AuditBackend):
    """The audit log over a JetStream stream; open with ``await JetStreamAuditLog.open``."""

    def __init__(
        self,
        stream: AuditStream,
        head: Head,
        signing_key: Ed25519PrivateKey,
        checkpoint_every: int,
        refusals: RefusalSummary,
        clock: Callable[[], int],
        certificate: bytes,
        ca: x509.Certificate | None,
    ) -> None:
        self._stream = stream
        self._head = head
        self._key = signing_key
        self._every = checkpoint_every
        self._certificate = certificate
        self._trust = SignerTrust(ca)
        self._init_front(refusals, clock)
        self._queue: list[_Write] = []
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._commits = 0
        self._on_commit: Callable[[float], None] | None = None

    @classmethod
    async def open(
        cls,
        nc: Client,
        settings: ClusterSettings,
        signing_key: Ed25519PrivateKey,
        checkpoint_every: int = 500,
        *,
        refusal_threshold: int = 0,
        refusal_interval_ms: int = 60_000,
        clock: Callable[[], int] = wall_clock_ms,
        certificate: bytes = b"",
        ca: x509.Certificate | None = None,
        timeout_s: float = 60.0,
    ) -> JetStreamAuditLog:
        """Create or open the deployment's audit stream and read its head.

        certificate: DER of the broker's audit certificate (carried by its checkpoints);
        ca: the coalition CA, so verify() trusts other brokers' audit certificates;
        timeout_s: how long a write or read may wait through a leader election.
        Raises AuditError, ValueError like AuditLog.open.
        """
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        refusals = RefusalSummary(refusal_threshold, refusal_interval_ms)
        stream = AuditStream(nc.jetstream(), settings, timeout_s)
        await stream.create()
        head, _ = await stream.head(Head())
        return cls(stream, head, signing_key, checkpoint_every, refusals, clock, certificate, ca)

    # -- writing --------------------------------------------------------------------------
    @property
    def commits(self) -> int:
        """Blocks this broker appended since open (for tests and metrics)."""
        return self._commits

    def time_commits(self, hook: Callable[[float], None] | None) -> None:
        """Call hook with each append's duration in seconds (None: stop)."""
        self._on_commit = hook

    async def _submit(self, write: _Write) -> object:
        if self._closed:
            raise RuntimeError("the audit log is closed")
        write.future = asyncio.get_running_loop().create_future()
        self._queue.append(write)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain_queue(), name="audit-writer")
        return await write.future

    async def _drain_queue(self) -> None:
        """Write what is queued: consecutive record writes share one block (group commit)."""
        while self._queue:
            batch = [self._queue.pop(0)]
            size = sum(_size(f) for f in batch[0].fields)
            while batch[0].fields and self._queue and self._queue[0].fields and size < _BLOCK_BYTES:
                size += sum(_size(f) for f in self._queue[0].fields)
                batch.append(self._queue.pop(0))
            try:
                results = await self._write(batch)
            except Exception as exc:
                for w in batch:
                    if w.future is not None and not w.future.done():
                        w.future.set_exception(exc)
                continue
            except asyncio.CancelledError:  # closed: nothing more is written
                closed = AuditError("the audit log closed before this was written")
                for w in [*batch, *self._queue]:
                    if w.future is not None and not w.future.done():
                        w.future.set_exception(closed)
                self._queue.clear()
                raise
            for w, result in zip(batch, results, strict=True):
                if w.future is not None and not w.future.done():
                    w.future.set_result(result)

    def _sign(self, seq: int, chain_hash: bytes, time_ms: int) -> SignedCheckpoint:
        return SignedCheckpoint(
            sign_checkpoint(seq, chain_hash, time_ms, self._key), self._certificate
        )

    def _draft(self, batch: list[_Write], head: Head) -> tuple[Block | None, list[object]]:
        """The block batch makes after head and each write's result (None: no block)."""
        first = batch[0]
        block_id = uuid.uuid4().hex
        if first.checkpoint_at is not None:
            if first.only_if_unsigned and (head.seq == 0 or head.signed):
                return None, [None]
            at = head.time_ms if first.checkpoint_at < 0 else first.checkpoint_at
            cp = self._sign(head.seq, head.hash, at)
            block = Block(block_id, (), [cp], head.marks, head.time_ms)
            return block, [cp.checkpoint]
        if first.source:
            mark = head.marks.get(first.source, 0)
            fresh = [(i, f) for i, f in first.rows if i > mark]
            if not fresh:
                return None, [mark]
            entries, cps = chain(
                head, [f for _, f in fresh], self._sign, self._every, at_end_only=True
            )
            marks = {**head.marks, first.source: fresh[-1][0]}
            return Block(block_id, entries, cps, marks, entries[-1].time_ms), [fresh[-1][0]]
        fields = [f for w in batch for f in w.fields]
        entries, cps = chain(head, fields, self._sign, self._every, at_end_only=False)
        results: list[object] = []
        at = 0
        for w in batch:
            results.append([e.seq for e in entries[at : at + len(w.fields)]])
            at += len(w.fields)
        return Block(block_id, entries, cps, head.marks, entries[-1].time_ms), results

    async def _write(self, batch: list[_Write]) -> list[object]:
        """Append batch's block onto the stream's head, re-chaining after every block
        another broker stored first; each write's result."""
        while True:
            block, results = self._draft(batch, self._head)
            if block is None:
                return results
            outcome = await self._stream.append(block, self._head.stream_seq, self._on_commit)
            if not isinstance(outcome, Conflict):
                self._commits += 1
                self._head = self._head.after(block, outcome)
                return results
            if outcome.last_seq < self._head.stream_seq:
                # The stream answers from behind what it acknowledged (a leader still
                # catching up, or lost writes): wait, then chain onto what it holds.
                log.critical(
                    "audit stream reports last sequence %d, below %d it acknowledged",
                    outcome.last_seq,
                    self._head.stream_seq,
                )
                await asyncio.sleep(0.25)
                self._head, _ = await self._stream.head(Head())
                continue
            # Another block was stored first. If this one was stored after all (its first
            # answer was lost), that is the result: never chain it twice.
            look_for = block.id if outcome.uncertain else ""
            self._head, mine = await self._stream.head(self._head, outcome.last_seq, look_for)
            if mine:
                return results

    async def _refresh(self) -> Head:
        """Read the stream's head; keep it unless the writer got further meanwhile."""
        head, _ = await self._stream.head(self._head)
        if head.stream_seq > self._head.stream_seq:
            self._head = head
        return self._head

    async def record_many(self, items: Sequence[AuditItem], *, now_ms: int) -> list[int]:
        """Append several entries in one block (one link each in the chain); their seqs.

        Durable on a quorum of the stream's replicas on return. Same rules as
        AuditLog.record(); nothing is written if any item is invalid. Raises AuditError.
        """
        if not items:
            return []
        fields = [entry_fields(item, now_ms) for item in items]
        seqs = await self._submit(_Write(fields=fields))
        assert isinstance(seqs, list)
        return [int(s) for s in seqs]

    async def append_outbox(self, source: str, rows: Sequence[OutboxEntry]) -> int:
        """Append (outbox id, entry) rows of source in id order, each at its own time, and
        move source's drained mark to the last id in the same block; return the mark.
        Rows at or below the mark (as the stream's last block has it) are skipped, so a
        row is appended once whichever broker drains it. A batch larger than a block is
        written as several, each moving the mark past its own rows; each signs one
        checkpoint if it crossed a multiple of checkpoint_every. Raises AuditError."""
        ordered = sorted(((r.id, r.entry()) for r in rows), key=lambda r: r[0])
        if not ordered:
            return await self.drained_through(source)
        chunks: list[list[tuple[int, audit_pb2.AuditEntry]]] = [[]]
        size = 0
        for row in ordered:
            if chunks[-1] and size + _size(row[1]) > _BLOCK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(row)
            size += _size(row[1])
        mark = 0
        for chunk in chunks:
            moved = await self._submit(_Write(source=source, rows=chunk))
            assert isinstance(moved, int)
            mark = moved
        return mark

    async def drained_through(self, source: str) -> int:
        """The highest outbox id of source whose entry is in the chain, 0 if none (read
        from the stream's last block)."""
        return (await self._refresh()).marks.get(source, 0)

    async def checkpoint(self, now_ms: int) -> audit_pb2.AuditCheckpoint:
        """Sign the current head (seq 0 and zero hash when empty), store and return it."""
        cp = await self._submit(_Write(checkpoint_at=now_ms))
        assert isinstance(cp, audit_pb2.AuditCheckpoint)
        return cp

    async def close(self, now_ms: int | None = None) -> None:
        """Write pending refusal summaries, then checkpoint the head if it is not yet (at
        now_ms, default the last entry's time), whoever wrote it; then stop writing. The
        NATS connection is the caller's. Closing again does nothing."""
        if self._closed:
            return
        try:
            await self.stop_summaries(now_ms)
            await self._refresh()
            at = -1 if now_ms is None else now_ms
            await self._submit(_Write(checkpoint_at=at, only_if_unsigned=True))
            if self._writer is not None:
                await asyncio.wait([self._writer])  # what others queued meanwhile
        finally:
            self._closed = True
            if self._writer is not None and not self._writer.done():
                # Cut short (its bound, or a failed write): stop retrying; what is not
                # written is reported to its caller (an outbox row stays in its outbox).
                self._writer.cancel()
                await asyncio.wait([self._writer])

    # -- reading --------------------------------------------------------------------------
    async def _blocks(self) -> AsyncGenerator[Block | None, None]:
        """Every message of the stream as it stands now, in order (see scan)."""
        head = await self._refresh()
        async with contextlib.aclosing(scan(self._stream, head.stream_seq)) as blocks:
            async for _, block in blocks:
                if block is not None:
                    for c in block.checkpoints:
                        self._trust.meet(c.signer, c.checkpoint.time_ms)
                yield block

    async def query(
        self,
        *,
        partner: str = "",
        kind: str = "",
        since_ms: int = 0,
        until_ms: int = 0,
        limit: int = 0,
        tail: bool = False,
    ) -> list[audit_pb2.AuditEntry]:
        """Entries in seq order; kind is a prefix, since_ms inclusive, until_ms exclusive,
        0/"" means no filter; with tail, the newest `limit` entries (still in seq order)."""
        drained = await self._catch_up()
        wanted = functools.partial(
            matches, partner=partner, kind=kind, since=since_ms, until=until_ms
        )
        found = None
        if tail and limit > 0:  # most tails are in the last few blocks
            found = await newest(self._stream, (await self._refresh()).stream_seq, wanted, limit)
        out = await self._scan_for(wanted, limit, tail) if found is None else found
        if not drained:
            out += await self._unchained(partner, kind, since_ms, until_ms)
            if limit > 0:
                out = out[-limit:] if tail else out[:limit]
        return out

    async def _scan_for(
        self, wanted: Callable[[audit_pb2.AuditEntry], bool], limit: int, tail: bool
    ) -> list[audit_pb2.AuditEntry]:
        """The entries wanted accepts, the first (or with tail the last) limit of them."""
        keep = limit if limit > 0 and tail else None
        entries: collections.deque[audit_pb2.AuditEntry] = collections.deque(maxlen=keep)
        async with contextlib.aclosing(self._blocks()) as blocks:
            async for block in blocks:
                entries.extend(e for e in (block.entries if block else ()) if wanted(e))
                if limit > 0 and not tail and len(entries) >= limit:
                    break
        return list(entries)[:limit] if limit > 0 and not tail else list(entries)

    async def export(self) -> AsyncIterator[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]:
        """Every entry in seq order, each followed by the checkpoints taken at its seq."""
        await self._catch_up()
        async for block in self._blocks():
            if block is not None:
                for record in export_order(block):
                    yield record

    async def verify(self, public_key: Ed25519PublicKey) -> VerifyResult:
        """Recompute the chain and check every checkpoint (signed by public_key or by a
        broker audit certificate the CA issued); report the first break. A message of
        the stream that is not a block breaks the chain where it stands."""
        await self._catch_up()
        verifier = ChainVerifier(public_key)
        added: set[bytes] = set()
        seq = 0
        async for block in self._blocks():
            if block is None:
                result = verifier.result()
                if result.ok:
                    problem = f"entry {seq + 1}: the stream holds a message that is not audit"
                    return VerifyResult(False, result.entries, result.checkpoints, seq + 1, problem)
                continue
            for c in block.checkpoints:
                key = self._trust.meet(c.signer, c.checkpoint.time_ms)
                if key is not None and c.signer not in added:
                    added.add(c.signer)
                    verifier.add_key(key)
            verifier.feed(export_order(block))
            if block.entries:
                seq = block.entries[-1].seq
        return verifier.result()

    async def count(self) -> int:
        """Number of entries in the chain (its head's seq)."""
        await self._catch_up()
        return (await self._refresh()).seq

    async def signer_certificates(self) -> list[bytes]:
        """DER of every audit certificate carried by the checkpoints read so far (an
        export has read them all)."""
        return list(self._trust.seen)
