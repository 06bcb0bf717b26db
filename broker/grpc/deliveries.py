"""A delivery batch's SubscribeResponse, serialized by hand around the stored envelopes.

Built as a message, each stored envelope would be parsed into a Delivery (upb copies
its ciphertext, path and signatures into the message) and serialized back into the
response (upb grows its buffer as it goes, copying again): about 9 µs per delivery of
an 8.8 KB v2 envelope here, the largest cost of the Subscribe path. The stored bytes
are already the encoding of that Envelope field (publish stored ``SerializeToString()``
of the verified envelope), so they are placed as they are, copied once, into the
response's bytes: the same bytes ``SubscribeResponse(batch=...).SerializeToString()``
gives for them (tests/test_delivery_encoding.py), fields in number order, each omitted
or present exactly as the message would have it. The interceptor hands bytes a
servicer yields to gRPC unchanged (``broker.grpc.interceptor``).

A subscriber that asked for shared runs (``SubscribeOpen.shared_runs``) gets the runs its
batch's envelopes repeat (a batch root with its hybrid signature, an epoch's
encapsulations: ``coalition.shared_runs``) once, in ``DeliveryBatch.shared``, and each
envelope with them cut out (``Delivery.envelope_cut``, ``shared_refs``). Where the runs
are is found once per stored message, shared by every subscriber it goes to
(``SharedRuns``, bounded), by walking the few tags that lead to them; the runs sent are
sliced from the stored bytes themselves, so the subscriber rebuilds those exact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.exchange import DeliveryBatch
from broker.exchange.memo import Memo
from coalition import shared_runs
from coalition.v1 import envelope_pb2

__all__ = ["SharedRuns", "delivery_batch_bytes"]

# Tags (field number << 3 | wire type): varint 0, length-delimited 2.
_RESPONSE_BATCH = b"\x1a"  # SubscribeResponse.batch = 3
_BATCH_DELIVERY = b"\x0a"  # DeliveryBatch.deliveries = 1
_OFFSET = b"\x08"  # Delivery.offset = 1 (uint64)
_ENVELOPE = b"\x12"  # Delivery.envelope = 2 (Envelope)
_LABEL = b"\x1a"  # Delivery.label = 3 (Label)
_TOPIC = b"\x22"  # Delivery.topic = 4 (string)
_PRECEDENCE = b"\x28"  # Delivery.precedence = 5 (enum)
_CUT = b"\x32"  # Delivery.envelope_cut = 6 (bytes)
_REFS = b"\x3a"  # Delivery.shared_refs = 7 (packed uint32)
_BATCH_SHARED = b"\x12"  # DeliveryBatch.shared = 2 (bytes)

# Stored messages whose cuts are remembered (see SharedRuns).
MEMO_SIZE = 2048
MAX_RUNS_BYTES = 32 << 10
MAX_KEPT_BYTES = 32 << 10


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    """n as a protobuf varint; a negative int32 or enum as its 64-bit two's complement."""
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]  # lengths of labels and topics, precedences
    if 0 <= n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))  # envelope lengths
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Cut:
    """A stored envelope with its runs cut out, as every batch sends it: the bytes kept
    and, per run in order, its offset (encoded as a varint) and the run."""

    size: int  # the whole envelope's length
    kept: bytes
    runs: tuple[tuple[bytes, bytes], ...]


class SharedRuns:
    """Each stored message's runs, found and cut once for all its subscribers.

    Keyed by store offset and checked against the envelope's length (a cut whose length
    differs is made again). Equal runs of different messages are kept as one object,
    so a batch's table finds them by identity (each cut holds its runs, so no id is
    reused while a batch is built). Envelopes whose runs are more than
    MAX_RUNS_BYTES, or whose kept bytes are more than MAX_KEPT_BYTES, are not
    remembered: at most MEMO_SIZE x (MAX_RUNS_BYTES + MAX_KEPT_BYTES) held.
    """

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._cuts: Memo[int, Cut] = Memo(size)
        self._same: Memo[tuple[int, bytes], bytes] = Memo(size)
        self.walked = 0  # envelopes walked (memo misses)

    def of(self, offset: int, envelope: bytes) -> Cut | None:
        """envelope's cut, or None when it has no runs (it goes whole)."""
        hit = self._cuts.get(offset)
        if hit is not None and hit.size == len(envelope):
            return hit if hit.runs else None
        self.walked += 1
        found = shared_runs.runs(envelope)
        if not found or sum(found[1::2]) - sum(found[::2]) > MAX_RUNS_BYTES:
            self._cuts.put(offset, Cut(len(envelope), b"", ()))
            return None
        kept: list[bytes] = []
        runs: list[tuple[bytes, bytes]] = []
        at = 0
        for i in range(0, len(found), 2):
            start, end = found[i], found[i + 1]
            run = envelope[start:end]
            # Found again by its length and last bytes (cheaper than hashing it all),
            # and taken only if equal: the table is keyed by object.
            key = (len(run), run[-32:])
            same = self._same.get(key)
            if same is None or same != run:
                self._same.put(key, run)
                same = run
            kept.append(envelope[at:start])
            runs.append((_varint(start), same))
            at = end
        kept.append(envelope[at:])
        cut = Cut(len(envelope), b"".join(kept), tuple(runs))
        if len(cut.kept) <= MAX_KEPT_BYTES:
            self._cuts.put(offset, cut)
        return cut


def delivery_batch_bytes(item: DeliveryBatch, shared: SharedRuns | None = None) -> bytes:
    """The serialized SubscribeResponse carrying item's deliveries, in order: each one's
    offset, stored envelope, the label and topic of the header it was routed on, and its
    precedence. With ``shared`` (a subscriber that rebuilds envelopes) and more than one
    delivery, each envelope's runs go once into the batch's table instead."""
    if shared is not None and len(item.messages) > 1:
        return _shared_batch_bytes(item, shared)
    parts: list[bytes] = []
    total = 0
    # The fields after the envelope, encoded once per (label, topic, precedence): the
    # messages of a batch mostly share them.
    tails: dict[tuple[bytes, str, int], bytes] = {}
    for m, h in zip(item.messages, item.headers, strict=True):
        tail = _tail(tails, h)
        n = len(m.envelope)
        if m.offset:
            head = b"".join((_OFFSET, _varint(m.offset), _ENVELOPE, _varint(n)))
        else:
            head = _ENVELOPE + _varint(n)
        size = len(head) + n + len(tail)
        prefix = _BATCH_DELIVERY + _varint(size)
        parts += (prefix, head, m.envelope, tail)
        total += len(prefix) + size
    return b"".join((_RESPONSE_BATCH, _varint(total), *parts))


def _tail(tails: dict[tuple[bytes, str, int], bytes], h: envelope_pb2.Header) -> bytes:
    """The label, topic and precedence fields of a delivery routed on h, encoded once per
    batch for each (label, topic, precedence)."""
    label = h.label.SerializeToString()
    key = (label, h.topic, h.precedence)
    tail = tails.get(key)
    if tail is None:
        topic = h.topic.encode()
        tail = tails[key] = b"".join(
            (
                _LABEL,
                _varint(len(label)),
                label,
                _TOPIC + _varint(len(topic)) + topic if topic else b"",
                _PRECEDENCE + _varint(h.precedence) if h.precedence else b"",
            )
        )
    return tail


def _shared_batch_bytes(item: DeliveryBatch, shared: SharedRuns) -> bytes:
    """delivery_batch_bytes for a subscriber that rebuilds envelopes: each delivery's
    offset, label, topic and precedence as before, then its envelope with its runs cut
    out and the (at, index) references that put them back; the table last."""
    parts: list[bytes] = []
    total = 0
    tails: dict[tuple[bytes, str, int], bytes] = {}
    index: dict[int, bytes] = {}  # id(run) -> its table index, encoded (runs live on)
    table: list[bytes] = []
    for m, h in zip(item.messages, item.headers, strict=True):
        raw = m.envelope
        cut = shared.of(m.offset, raw)
        tail = _tail(tails, h)
        head = _OFFSET + _varint(m.offset) if m.offset else b""
        if cut is None:
            n = len(raw)
            size = len(head) + 1 + len(_varint(n)) + n + len(tail)
            prefix = _BATCH_DELIVERY + _varint(size)
            parts += (prefix, head, _ENVELOPE, _varint(n), raw, tail)
            total += len(prefix) + size
            continue
        refs: list[bytes] = []
        for at, run in cut.runs:
            i = index.get(id(run))
            if i is None:
                i = index[id(run)] = _varint(len(table))
                table.append(run)
            refs += (at, i)
        packed = b"".join(refs)
        kept = cut.kept
        body = b"".join(
            (head, tail, _CUT, _varint(len(kept)), kept, _REFS, _varint(len(packed)), packed)
        )
        prefix = _BATCH_DELIVERY + _varint(len(body))
        parts += (prefix, body)
        total += len(prefix) + len(body)
    for run in table:
        n = len(run)
        parts += (_BATCH_SHARED, _varint(n), run)
        total += 1 + len(_varint(n)) + n
    return b"".join((_RESPONSE_BATCH, _varint(total), *parts))
