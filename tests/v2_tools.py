"""Building altered v2 batches for tests and vectors: what a sender (or forger) could send.

``rebatch`` takes envelopes whose headers or ciphertexts were changed and makes them a
consistent batch again: fresh tree over the given headers, the root signed by the key
given. It is how the tests and the vector script show which checks hold even against
someone who holds a signing key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from coalition import merkle
from coalition.hybrid import HybridSigningKey
from coalition.pae import BATCH_ROOT_TYPE
from coalition.v1 import envelope_pb2


def copy(env: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    out = envelope_pb2.Envelope()
    out.CopyFrom(env)
    return out


def edit_header_v2(
    env: envelope_pb2.Envelope,
    change: Callable[[envelope_pb2.HeaderV2], None],
) -> envelope_pb2.Envelope:
    """The envelope with its HeaderV2 parsed, changed and re-serialized (proof kept)."""
    header = envelope_pb2.HeaderV2.FromString(env.header_v2)
    change(header)
    out = copy(env)
    out.header_v2 = header.SerializeToString()
    return out


def edit_core(
    env: envelope_pb2.Envelope, change: Callable[[envelope_pb2.Header], None]
) -> envelope_pb2.Envelope:
    """The envelope with its header core changed (epoch keys and ciphertext kept)."""

    def apply(h: envelope_pb2.HeaderV2) -> None:
        core = envelope_pb2.Header.FromString(h.core)
        change(core)
        h.core = core.SerializeToString()

    return edit_header_v2(env, apply)


def set_digest(env: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """The envelope with its header's payload digest recomputed over its ciphertext."""

    def apply(h: envelope_pb2.HeaderV2) -> None:
        h.payload_digest = hashlib.sha256(env.ciphertext).digest()

    return edit_header_v2(env, apply)


def rebatch(
    envelopes: Sequence[envelope_pb2.Envelope],
    signing_key: HybridSigningKey,
    *,
    keep: Callable[[envelope_pb2.HybridSignature], envelope_pb2.HybridSignature] | None = None,
) -> list[envelope_pb2.Envelope]:
    """The envelopes made one consistent batch again, the root signed by ``signing_key``.

    The root statement keeps the first envelope's sender, key id, batch id and time.
    ``keep`` may strip or replace parts of the new signature.
    """
    first = envelope_pb2.BatchRoot.FromString(envelopes[0].batch.root)
    leaves = [merkle.leaf_hash(e.batch.leaf_salt, e.header_v2) for e in envelopes]
    root_hash, paths = merkle.inclusion_paths(leaves)
    first.tree_size = len(envelopes)
    first.root = root_hash
    root = first.SerializeToString()
    signature = signing_key.sign(BATCH_ROOT_TYPE, root)
    if keep is not None:
        signature = keep(signature)
    out = []
    for i, env in enumerate(envelopes):
        e = copy(env)
        e.batch.leaf_index = i
        del e.batch.path[:]
        e.batch.path.extend(paths[i])
        e.batch.root = root
        e.batch.root_signature.CopyFrom(signature)
        out.append(e)
    return out
