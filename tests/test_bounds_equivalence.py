"""The header bounds envelope v2 checks without a copy name what v1's checks name.

``recipients_bounds_problem`` (a header core with its recipients beside it, as v2's
epoch keys carry them) and the label bounds' quick path answer exactly as
``header_bounds_problem`` on a header carrying the same recipients as wrapped keys, and
the label's field-by-field walk, for a well-formed header and for each out-of-bounds
case of tests/test_header_bounds.py, plus the cases only these paths see.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coalition import envelope as env
from coalition.labels import label_bounds_problem, label_to_proto
from coalition.v1 import envelope_pb2
from tests.test_header_bounds import CASES, LABEL, big_wrapped_key


def _header() -> envelope_pb2.Header:
    h = envelope_pb2.Header(
        message_id="m-1",
        sender="KOR",
        sequence=1,
        topic="intel.ground",
        created_ms=1,
        content_type=env.INTEL_SUMMARY,
        signing_key_id="0a1b",
    )
    h.label.CopyFrom(label_to_proto(LABEL))
    h.wrapped_keys.add(recipient="USA", key_id="k1")
    return h


def _bad_recipient(h: envelope_pb2.Header) -> None:
    h.wrapped_keys.add(recipient="usa\n", key_id="k2")


def _long_recipient(h: envelope_pb2.Header) -> None:
    h.wrapped_keys.add(recipient="G" * 30, key_id="k2")


def _bad_key_id(h: envelope_pb2.Header) -> None:
    h.wrapped_keys.add(recipient="GBR", key_id="k 2")


def _recipient_sequence_just_over(h: envelope_pb2.Header) -> None:
    h.wrapped_keys[0].sequence = env.MAX_SEQUENCE + 1


def _long_policy(h: envelope_pb2.Header) -> None:
    h.label.policy = "P" * 300


def _long_value(h: envelope_pb2.Header) -> None:
    h.label.categories[0].values.append("V" * 300)


def _long_category_name(h: envelope_pb2.Header) -> None:
    h.label.categories[0].name = "N" * 300


def _negative_expiry(h: envelope_pb2.Header) -> None:
    h.label.expiry_time_ms = -1


def _negative_origination(h: envelope_pb2.Header) -> None:
    h.label.origination_time_ms = -5


def _nothing(h: envelope_pb2.Header) -> None:
    pass


MUTATIONS: list[Callable[[envelope_pb2.Header], None]] = [
    _nothing,
    *(mutate for mutate, _ in CASES),
    _bad_recipient,
    _long_recipient,
    _bad_key_id,
    _recipient_sequence_just_over,
    _long_policy,
    _long_value,
    _long_category_name,
    _negative_expiry,
    _negative_origination,
]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=[m.__name__ for m in MUTATIONS])
def test_recipients_beside_the_header_are_bounded_as_wrapped_keys(
    mutate: Callable[[envelope_pb2.Header], None],
) -> None:
    h = _header()
    mutate(h)
    entries = [(k.recipient, k.key_id, k.sequence) for k in h.wrapped_keys]
    probe = envelope_pb2.Header()
    probe.CopyFrom(h)
    del probe.wrapped_keys[:]
    for partner, key_id, sequence in entries:  # no key bytes, as v2 checks them
        probe.wrapped_keys.add(recipient=partner, key_id=key_id, sequence=sequence)
    core = envelope_pb2.Header()
    core.CopyFrom(h)
    del core.wrapped_keys[:]

    expected = env.header_bounds_problem(probe)

    assert env.recipients_bounds_problem(core, entries) == expected
    assert (expected is None) == (mutate in (_nothing, big_wrapped_key))


@pytest.mark.parametrize(
    ("mutate", "names"),
    [
        (_long_policy, "label field policy has 300 characters"),
        (_long_value, "label field categories[0].values[3] has 300 characters"),
        (_long_category_name, "label field categories[0].name has 300 characters"),
        (_negative_expiry, "label field expiry_time_ms has -1"),
        (_negative_origination, "label field origination_time_ms has -5"),
    ],
)
def test_a_label_over_a_bound_is_still_named(
    mutate: Callable[[envelope_pb2.Header], None], names: str
) -> None:
    h = _header()
    mutate(h)
    problem = label_bounds_problem(h.label)
    assert problem is not None and problem.startswith(names), problem
    assert label_bounds_problem(_header().label) is None
