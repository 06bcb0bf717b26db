"""Byte runs a delivery batch carries once: where they are in a v2 envelope, and how a
subscriber puts each envelope back together.

A v2 envelope repeats what its batch and its epochs share: every envelope of one publish
batch ends with the same serialized root and hybrid root signature (``BatchProof.root``
and ``root_signature``, about 3.4 KB), and every message of an epoch carries the same
HPKE encapsulation per recipient until acknowledged (``EpochKey.encapsulation``, 1,120
bytes each). On the wire only (nothing here changes an envelope or what is signed), the
broker sends each such run once per delivery batch, in a table, and each delivery as its
envelope with the runs cut out plus ``(at, index)`` references: table entry ``index``
goes back in at byte ``at`` of the rebuilt envelope.

``runs(raw)`` finds those runs by walking only the few protobuf tags that lead to them
(no message is built). ``rebuild`` is the subscriber's side and trusts nothing: each
reference must point into the table and land in order inside what is being rebuilt, and
a batch's rebuilt envelopes must fit the limit its caller gives (the most a batch
without shared runs could have carried), so a table entry referenced many times cannot
make a node hold more than a plain batch could. The rebuilt bytes are then parsed,
verified and opened exactly as a plain delivery's; a broker that lies in the table only
produces envelopes that fail those checks (docs/security.md, "Shared byte runs").
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "MAX_REFS",
    "MAX_TABLE",
    "MIN_RUN",
    "Rebuilder",
    "SharedRunsError",
    "runs",
]

# Shorter runs are not worth a reference (an encapsulation is 1,120 bytes, a root with
# its signature about 3.4 KB).
MIN_RUN = 256
# Bounds a subscriber holds a broker to: table entries per batch, references per delivery.
MAX_TABLE = 4096
MAX_REFS = 64


class SharedRunsError(ValueError):
    """A delivery batch's shared runs do not rebuild its envelopes."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip(buf: bytes, pos: int, wire: int) -> int:
    """The position after the value of a field of this wire type that starts at pos."""
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 5:
        return pos + 4
    if wire == 1:
        return pos + 8
    raise ValueError("unsupported wire type")


def _field(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the length-delimited field whose tag is at pos,
    or (tag, end of the field, same) for any other; one-byte tags and lengths inline."""
    tag = buf[pos]
    if tag >= 0x80:
        tag, pos = _varint(buf, pos)
    else:
        pos += 1
    if tag & 7 != 2:
        end = _skip(buf, pos, tag & 7)
        return tag, end, end
    n = buf[pos]
    if n >= 0x80:
        n, pos = _varint(buf, pos)
    else:
        pos += 1
    return tag, pos, pos + n


def runs(raw: bytes) -> tuple[int, ...]:
    """The shareable runs of a serialized v2 envelope as flat (start, end) pairs, in
    order: each epoch key's encapsulation of at least MIN_RUN bytes, then the batch
    proof's root and root signature as one run (from the root's tag to the proof's end,
    when only they follow it). Empty for a v1 envelope or bytes laid out otherwise.

    Only positions, found by walking the tags that lead to them: whatever they name is
    taken from raw itself, so a wrong answer here can cost sharing, never change an
    envelope.
    """
    out: list[int] = []
    size = len(raw)
    try:
        pos = 0
        while pos < size:
            tag, start, end = _field(raw, pos)
            if tag == 0x22:  # header_v2 -> epoch_keys (2) -> encapsulation (4)
                p = start
                while p < end:
                    t, ks, ke = _field(raw, p)
                    if t == 0x12:
                        q = ks
                        while q < ke:
                            f, s, e = _field(raw, q)
                            if f == 0x22:
                                if e - s >= MIN_RUN:
                                    out += (s, e)
                                break
                            q = e
                    p = ke
                if p != end:
                    return ()
            elif tag == 0x2A:  # batch -> root (4) and root_signature (5) to its end
                p = start
                root = -1
                while p < end:
                    t, _, e = _field(raw, p)
                    if t == 0x22 and root < 0:
                        root = p
                    elif root >= 0 and t != 0x2A:
                        root = -2  # something else follows the root: not shared
                    p = e
                if p != end:
                    return ()
                if root >= 0 and end - root >= MIN_RUN:
                    out += (root, end)
            pos = end
    except (ValueError, IndexError):
        return ()
    if pos != size or any(out[i] > out[i + 1] for i in range(len(out) - 1)):
        return ()
    return tuple(out)


class Rebuilder:
    """Rebuilds the envelopes of one delivery batch from its table, within ``limit``
    bytes in all (and so each)."""

    def __init__(self, table: Sequence[bytes], limit: int) -> None:
        if len(table) > MAX_TABLE:
            raise SharedRunsError(
                f"the batch's table holds {len(table)} runs; at most {MAX_TABLE} are accepted"
            )
        self._table = table
        self._left = limit
        self._limit = limit

    def rebuild(self, cut: bytes, refs: Sequence[int]) -> bytes:
        """The envelope whose bytes are cut with table entries put back where refs say.

        refs are (at, index) pairs, ``at`` counted in the rebuilt envelope, strictly
        after the previous entry's end. Raises SharedRunsError naming what is wrong.
        """
        if len(refs) % 2:
            raise SharedRunsError("a delivery's references are not (offset, index) pairs")
        if len(refs) > 2 * MAX_REFS:
            raise SharedRunsError(
                f"a delivery has {len(refs) // 2} references; at most {MAX_REFS} are accepted"
            )
        table = self._table
        size = len(cut)
        for i in range(1, len(refs), 2):
            index = refs[i]
            if index >= len(table):
                raise SharedRunsError(
                    f"a reference names run {index}; the batch's table has {len(table)}"
                )
            size += len(table[index])
        if size > self._left:
            raise SharedRunsError(
                f"the batch's envelopes would rebuild to more than {self._limit} bytes"
            )
        parts: list[bytes] = []
        built = 0  # bytes of the envelope rebuilt so far
        taken = 0  # bytes of cut used so far
        for i in range(0, len(refs), 2):
            at = refs[i]
            if at < built:
                raise SharedRunsError("a delivery's references overlap or are out of order")
            take = at - built
            if taken + take > len(cut):
                raise SharedRunsError("a reference points past the end of its envelope")
            parts.append(cut[taken : taken + take])
            run = table[refs[i + 1]]
            parts.append(run)
            taken += take
            built = at + len(run)
        if not parts:
            self._left -= size
            return cut
        parts.append(cut[taken:])
        self._left -= size
        return b"".join(parts)
