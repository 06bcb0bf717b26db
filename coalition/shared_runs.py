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


def runs(raw: bytes) -> tuple[int, ...]:
    """The shareable runs of a serialized v2 envelope as flat (start, end) pairs, in
    order: each epoch key's encapsulation of at least MIN_RUN bytes, then the batch
    proof's root and root signature as one run (from the root's tag to the proof's end,
    when only the signature follows it). Empty for a v1 envelope, and for bytes laid out
    otherwise or with lengths past the walk's reach (2 MiB at the top level, 16 KiB
    inside): the envelope then travels whole.

    Only positions, found by walking the tags that lead to them, with one-byte tags and
    lengths of up to three bytes read inline (this runs once per stored message, on the
    broker's event loop). Whatever they name is sliced from raw itself, so a wrong answer
    here can cost sharing, never change an envelope.
    """
    out: list[int] = []
    size = len(raw)
    pos = 0
    try:
        while pos < size:  # Envelope: ciphertext (2), header_v2 (4), batch (5)
            tag = raw[pos]
            if tag & 7 != 2 or tag >= 0x80:
                return ()
            b = raw[pos + 1]
            if b < 0x80:
                start, n = pos + 2, b
            else:
                c = raw[pos + 2]
                if c < 0x80:
                    start, n = pos + 3, (b & 0x7F) | (c << 7)
                else:
                    d = raw[pos + 3]
                    if d >= 0x80:
                        return ()
                    start, n = pos + 4, (b & 0x7F) | ((c & 0x7F) << 7) | (d << 14)
            end = start + n
            if tag == 0x22 and not _epoch_key_runs(raw, start, end, out):
                return ()
            if tag == 0x2A and not _root_run(raw, start, end, out):
                return ()
            pos = end
    except IndexError:
        return ()
    if pos != size:
        return ()
    return tuple(out)


def _epoch_key_runs(raw: bytes, p: int, end: int, out: list[int]) -> bool:
    """HeaderV2 in raw[p:end]: each epoch key's (2) encapsulation (4) into out."""
    while p < end:
        t = raw[p]
        if t & 7 != 2:
            return False
        b = raw[p + 1]
        if b < 0x80:
            ks, n = p + 2, b
        else:
            c = raw[p + 2]
            if c >= 0x80:
                return False
            ks, n = p + 3, (b & 0x7F) | (c << 7)
        ke = ks + n
        if t == 0x12:
            q = ks
            while q < ke:  # recipient (1), key_id (2), epoch_id (3): skipped
                f = raw[q]
                if f & 7 != 2:
                    break
                b = raw[q + 1]
                if b < 0x80:
                    s, n = q + 2, b
                else:
                    c = raw[q + 2]
                    if c >= 0x80:
                        return False
                    s, n = q + 3, (b & 0x7F) | (c << 7)
                if f == 0x22:
                    if n >= MIN_RUN:
                        out += (s, s + n)
                    break
                q = s + n
        p = ke
    return p == end


def _root_run(raw: bytes, p: int, end: int, out: list[int]) -> bool:
    """BatchProof in raw[p:end]: the run from root's (4) tag to its end into out, when
    only root_signature (5) follows the root."""
    root = -1
    while p < end:
        t = raw[p]
        if t == 0x10:  # leaf_index (varint)
            p += 1
            while raw[p] >= 0x80:
                p += 1
            p += 1
            continue
        if t & 7 != 2:
            return False
        b = raw[p + 1]
        if b < 0x80:
            e = p + 2 + b
        else:
            c = raw[p + 2]
            if c >= 0x80:
                return False
            e = p + 3 + ((b & 0x7F) | (c << 7))
        if t == 0x22 and root == -1:
            root = p
        elif root >= 0 and t != 0x2A:
            root = -2  # something else follows the root: not shared
        p = e
    if p != end:
        return False
    if root >= 0 and end - root >= MIN_RUN:
        out += (root, end)
    return True


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
