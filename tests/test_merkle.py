"""coalition.merkle: RFC 9162 tree hashes and inclusion paths over salted leaves."""

from __future__ import annotations

import hashlib

import pytest

from coalition import merkle


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(bytes([i % 256]) * 32, b"header %d" % i) for i in range(n)]


def _mth(d: list[bytes]) -> bytes:
    """RFC 9162 2.1.1, written as the RFC states it."""
    if len(d) == 1:
        return d[0]
    k = 1
    while k * 2 < len(d):
        k *= 2
    return merkle.node_hash(_mth(d[:k]), _mth(d[k:]))


def _path(m: int, d: list[bytes]) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(m, D[n])."""
    if len(d) == 1:
        return []
    k = 1
    while k * 2 < len(d):
        k *= 2
    if m < k:
        return [*_path(m, d[:k]), _mth(d[k:])]
    return [*_path(m - k, d[k:]), _mth(d[:k])]


def test_hashes_are_domain_separated_sha256() -> None:
    salt, data = b"s" * 32, b"header"
    assert merkle.leaf_hash(salt, data) == hashlib.sha256(b"\x00" + salt + data).digest()
    a, b = b"a" * 32, b"b" * 32
    assert merkle.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    # A leaf can never be read as a node, nor the reverse.
    assert merkle.leaf_hash(a, b) != merkle.node_hash(a, b)
    three = _leaves(3)
    assert merkle.tree_hash(three) == merkle.node_hash(
        merkle.node_hash(three[0], three[1]), three[2]
    )


@pytest.mark.parametrize("n", [*range(1, 40), 64, 65, 255, 256, 1024])
def test_paths_match_the_rfc_and_verify(n: int) -> None:
    leaves = _leaves(n)
    root, paths = merkle.inclusion_paths(leaves)
    assert root == _mth(leaves) == merkle.tree_hash(leaves)
    for m in sorted({0, n // 2, n - 1, *range(min(n, 9))}):
        assert paths[m] == _path(m, leaves)
        assert merkle.verify_inclusion(m, n, leaves[m], paths[m], root)


def test_every_alteration_fails() -> None:
    n = 13
    leaves = _leaves(n)
    root, paths = merkle.inclusion_paths(leaves)
    m = 5
    path = paths[m]
    assert merkle.verify_inclusion(m, n, leaves[m], path, root)
    # A swapped leaf: another leaf at this index, or this leaf at another index.
    assert not merkle.verify_inclusion(m, n, leaves[m + 1], path, root)
    assert not merkle.verify_inclusion(m + 1, n, leaves[m], path, root)
    # A wrong path: one hash altered, one dropped, one added, the order reversed.
    bad = list(path)
    bad[1] = bytes(32)
    assert not merkle.verify_inclusion(m, n, leaves[m], bad, root)
    assert not merkle.verify_inclusion(m, n, leaves[m], path[:-1], root)
    assert not merkle.verify_inclusion(m, n, leaves[m], [*path, bytes(32)], root)
    assert not merkle.verify_inclusion(m, n, leaves[m], path[::-1], root)
    assert not merkle.verify_inclusion(m, n, leaves[m], [*path[:-1], b"short"], root)
    # The tree size shapes the path (it is signed beside the root, never taken alone).
    assert merkle.verify_inclusion(n - 1, n, leaves[n - 1], paths[n - 1], root)
    assert not merkle.verify_inclusion(n - 1, 2 * n, leaves[n - 1], paths[n - 1], root)
    assert not merkle.verify_inclusion(m, n, leaves[m], path, merkle.tree_hash(leaves[:-1]))
    # The same header under another salt is another leaf.
    assert not merkle.verify_inclusion(
        m, n, merkle.leaf_hash(b"\xff" * 32, b"header %d" % m), path, root
    )


def test_out_of_range_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="salt"):
        merkle.leaf_hash(b"short", b"x")
    with pytest.raises(ValueError, match="1 to 1024"):
        merkle.tree_hash([])
    with pytest.raises(ValueError, match="1 to 1024"):
        merkle.inclusion_paths(_leaves(1) * 1025)
    with pytest.raises(ValueError, match="outside"):
        merkle.verify_inclusion(3, 3, _leaves(1)[0], [], bytes(32))
    with pytest.raises(ValueError, match="1 to 1024"):
        merkle.root_from_path(0, 0, _leaves(1)[0], [])
