"""The header the broker stores and routes on, for envelope v1 and v2 alike.

Everything the broker reads from a header (the store's columns, the JetStream subjects
built from them, routing, the live feed, quotas, retention's eligibility, audit records)
reads a ``Header``: v1's signed header, or v2's header core with one ``wrapped_keys``
entry per epoch key carrying its recipient, key id and per-(sender, recipient) sequence
(no key material). So each of those places works on both versions through this one
accessor and ``with_recipients``, not two copies.
"""

from __future__ import annotations

from coalition import envelope as env
from coalition import envelope_v2
from coalition.v1 import envelope_pb2

__all__ = ["routing_header", "with_recipients"]


def routing_header(e: envelope_pb2.Envelope) -> envelope_pb2.Header:
    """The envelope's header (v1) or header core with its recipients (v2), UNVERIFIED.

    Raises InvalidEnvelope(MALFORMED) for either version, so callers catch one error.
    """
    if not envelope_v2.is_v2(e):
        return env.parse_header(e)
    try:
        core, header_v2, _ = envelope_v2.parse_v2(e)
    except envelope_v2.InvalidEnvelopeV2 as exc:
        raise env.InvalidEnvelope(
            env.Failure.MALFORMED, str(exc).removeprefix("malformed: ")
        ) from None
    return with_recipients(core, header_v2)


def with_recipients(
    core: envelope_pb2.Header, header_v2: envelope_pb2.HeaderV2
) -> envelope_pb2.Header:
    """core (a v2 header core, which holds no keys) with its epoch keys' recipients.

    Fills ``core`` in place and returns it: recipient, key id and sequence of each epoch
    key, in order, as v1's wrapped keys carry them; never the keys themselves.
    """
    for k in header_v2.epoch_keys:
        core.wrapped_keys.add(recipient=k.recipient, key_id=k.key_id, sequence=k.sequence)
    return core
