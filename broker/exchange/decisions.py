"""Parsed labels and policy decisions, memoized for the publish pipeline, the delivery
loop and the partner directory alike (labels and topics repeat a lot)."""

from __future__ import annotations

from collections.abc import Callable

from broker.exchange.memo import Memo
from coalition.labels import Label, label_from_proto
from coalition.policy import Decision, PartnerPolicy
from coalition.v1 import label_pb2

# A policy decision function (coalition.policy.decide_origination, decide).
DecisionFn = Callable[[PartnerPolicy, Label, str, int], Decision]

LABEL_MEMO_SIZE = 1024
DECISION_MEMO_SIZE = 4096


class Decisions:
    """label() and decided(), each backed by a Memo."""

    def __init__(self) -> None:
        self._labels: Memo[bytes, Label] = Memo(LABEL_MEMO_SIZE)
        self._decisions: Memo[
            tuple[object, int, int, str], tuple[PartnerPolicy, Label, Decision]
        ] = Memo(DECISION_MEMO_SIZE)

    def label(self, msg: label_pb2.Label) -> Label:
        """label_from_proto, memoized by the label's wire bytes.

        Raises LabelError like label_from_proto (a label that does not parse is not
        remembered).
        """
        key = msg.SerializeToString()
        hit = self._labels.get(key)
        if hit is None:
            hit = label_from_proto(msg)
            self._labels.put(key, hit)
        return hit

    def decided(
        self,
        fn: DecisionFn,
        policy: PartnerPolicy,
        label: Label,
        topic: str,
        now: int,
    ) -> Decision:
        """fn(policy, label, topic, now), memoized while neither policy nor label changes.

        Policies and labels are immutable and replaced, not edited, so their identity is
        the key (each entry holds them, so an id is never reused while remembered). Only
        label expiry depends on the time: labels that expire are decided afresh every time.
        """
        if label.expiry_time_ms:
            return fn(policy, label, topic, now)
        key = (fn, id(policy), id(label), topic)
        hit = self._decisions.get(key)
        if hit is not None and hit[0] is policy and hit[1] is label:
            return hit[2]
        d = fn(policy, label, topic, now)
        self._decisions.put(key, (policy, label, d))
        return d
