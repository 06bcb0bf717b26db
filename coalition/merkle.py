"""Merkle tree hashes and inclusion paths as RFC 9162 (section 2.1) defines them, salted leaves.

Hashes are SHA-256, domain-separated as the RFC does: a leaf hash is
``SHA-256(0x00 || salt || data)`` and an interior node ``SHA-256(0x01 || left || right)``.
The salt (32 random bytes per leaf, carried beside the leaf) keeps a sibling's hash in
an inclusion path from confirming a guess of that sibling's content. The tree over
``n`` leaves splits at the largest power of two below ``n`` (RFC 9162 MTH), so trees of
any size are allowed, and an inclusion path lists sibling hashes from the leaf upward.

Nothing here is secret: the functions are plain SHA-256 compositions. ``verify_inclusion``
returns False on any mismatch; it raises only ``ValueError`` for out-of-range arguments.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

__all__ = [
    "HASH_LEN",
    "MAX_TREE_SIZE",
    "SALT_LEN",
    "inclusion_paths",
    "leaf_hash",
    "node_hash",
    "root_from_path",
    "tree_hash",
    "verify_inclusion",
]

HASH_LEN = 32
SALT_LEN = 32
# The most leaves one tree (one batch) may hold, so a path is at most 10 hashes.
MAX_TREE_SIZE = 1024
_LEAF = b"\x00"
_NODE = b"\x01"


def leaf_hash(salt: bytes, data: bytes) -> bytes:
    """SHA-256(0x00 || salt || data). Raises ValueError unless the salt is 32 bytes."""
    if len(salt) != SALT_LEN:
        raise ValueError(f"leaf salt must be {SALT_LEN} bytes, got {len(salt)}")
    return hashlib.sha256(_LEAF + salt + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_size(n: int) -> None:
    if not 1 <= n <= MAX_TREE_SIZE:
        raise ValueError(f"a tree holds 1 to {MAX_TREE_SIZE} leaves, not {n}")


def tree_hash(leaves: Sequence[bytes]) -> bytes:
    """RFC 9162 MTH over leaf hashes. Raises ValueError for 0 or too many leaves."""
    _check_size(len(leaves))
    return _build(list(leaves))[0]


def inclusion_paths(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The tree hash and every leaf's RFC 9162 inclusion path (leaf upward), in one pass.

    Raises ValueError for 0 or too many leaves.
    """
    _check_size(len(leaves))
    return _build(list(leaves))


def _build(hashes: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    if len(hashes) == 1:
        return hashes[0], [[]]
    k = _split(len(hashes))
    left, left_paths = _build(hashes[:k])
    right, right_paths = _build(hashes[k:])
    return (
        node_hash(left, right),
        [[*p, right] for p in left_paths] + [[*p, left] for p in right_paths],
    )


def root_from_path(
    leaf_index: int, tree_size: int, leaf: bytes, path: Sequence[bytes]
) -> bytes | None:
    """The root an inclusion path leads to (RFC 9162 2.1.3.2), or None if the path is malformed.

    A path of the wrong length for (leaf_index, tree_size) or holding a hash that is not
    32 bytes gives None. Raises ValueError if leaf_index or tree_size is out of range.
    """
    _check_size(tree_size)
    if not 0 <= leaf_index < tree_size:
        raise ValueError(f"leaf index {leaf_index} is outside a tree of {tree_size}")
    fn, sn, r = leaf_index, tree_size - 1, leaf
    for p in path:
        if sn == 0 or len(p) != HASH_LEN:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf: bytes, path: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``path`` proves ``leaf`` is leaf number ``leaf_index`` of the tree ``root``.

    Raises ValueError if leaf_index or tree_size is out of range.
    """
    computed = root_from_path(leaf_index, tree_size, leaf, path)
    return computed is not None and hmac.compare_digest(computed, root)
