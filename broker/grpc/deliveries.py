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

# Stored messages whose runs are remembered, and the longest run kept: at most
# MEMO_SIZE x MAX_RUNS_BYTES held (runs equal across messages are one object).
MEMO_SIZE = 2048
MAX_RUNS_BYTES = 32 << 10


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


# A stored message's runs: the envelope's length, then (start, run) pairs in order.
Runs = tuple[int, tuple[tuple[int, bytes], ...]]


class SharedRuns:
    """Each stored message's shareable runs, found once for all its subscribers.

    Keyed by store offset and checked against the envelope's length; equal runs of
    different messages are kept as one object, so a batch's table finds them by identity.
    """

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._runs: Memo[int, Runs] = Memo(size)
        self._same: Memo[bytes, bytes] = Memo(size)
        self.walked = 0  # envelopes walked (memo misses)

    def of(self, offset: int, envelope: bytes) -> tuple[tuple[int, bytes], ...]:
        hit = self._runs.get(offset)
        if hit is not None and hit[0] == len(envelope):
            return hit[1]
        self.walked += 1
        found = shared_runs.runs(envelope)
        pairs: list[tuple[int, bytes]] = []
        if sum(found[1::2]) - sum(found[::2]) <= MAX_RUNS_BYTES:
            for i in range(0, len(found), 2):
                run = envelope[found[i] : found[i + 1]]
                same = self._same.get(run)
                if same is None:
                    self._same.put(run, run)
                    same = run
                pairs.append((found[i], same))
        runs = tuple(pairs)
        self._runs.put(offset, (len(envelope), runs))
        return runs


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
    index: dict[bytes, int] = {}
    table: list[bytes] = []
    for m, h in zip(item.messages, item.headers, strict=True):
        raw = m.envelope
        runs = shared.of(m.offset, raw)
        tail = _tail(tails, h)
        head = _OFFSET + _varint(m.offset) if m.offset else b""
        if not runs:
            n = len(raw)
            size = len(head) + 1 + len(_varint(n)) + n + len(tail)
            prefix = _BATCH_DELIVERY + _varint(size)
            parts += (prefix, head, _ENVELOPE, _varint(n), raw, tail)
            total += len(prefix) + size
            continue
        cut: list[bytes] = []
        refs: list[bytes] = []
        kept = 0
        at = 0
        for start, run in runs:
            i = index.get(run)
            if i is None:
                i = index[run] = len(table)
                table.append(run)
            cut.append(raw[at:start])
            kept += start - at
            at = start + len(run)
            refs += (_varint(start), _varint(i))
        cut.append(raw[at:])
        kept += len(raw) - at
        packed = b"".join(refs)
        cut_head = _CUT + _varint(kept)
        refs_field = b"".join((_REFS, _varint(len(packed)), packed))
        size = len(head) + len(tail) + len(cut_head) + kept + len(refs_field)
        prefix = _BATCH_DELIVERY + _varint(size)
        parts += (prefix, head, tail, cut_head, *cut, refs_field)
        total += len(prefix) + size
    for run in table:
        n = len(run)
        parts += (_BATCH_SHARED, _varint(n), run)
        total += 1 + len(_varint(n)) + n
    return b"".join((_RESPONSE_BATCH, _varint(total), *parts))
