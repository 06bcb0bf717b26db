"""Publish's pre-routing for caught-up streams: one routing decision per stream and
(topic, label, key wrapped), where "key wrapped" follows the stream's own rule: a key for
the partner itself, or, for a federation link's stream, a key for any partner of its peer
nation (two messages of one request alike but for their recipients are routed apart)."""

from __future__ import annotations

from broker.config import BrokerConfig
from broker.exchange.live import LiveStreams, Route, Subscription
from broker.registry_types import PartnerRecord
from coalition.labels import Label, parse_label
from coalition.policy import PartnerPolicy, PartnerStatus
from coalition.v1 import envelope_pb2


class _Korea:
    """A link's routing rule toward KOR: this nation's senders, KOR's recipients."""

    def takes(self, sender: str) -> bool:
        return True

    def reaches(self, recipient: str) -> bool:
        return recipient == "KOR" or recipient.startswith("KOR-")


def _record(code: str) -> PartnerRecord:
    policy = PartnerPolicy(code, PartnerStatus.ACTIVE, subscribe_topics=("intel.>",))
    return PartnerRecord(code, b"", policy, 1)


def _header(mid: str, recipients: list[str]) -> envelope_pb2.Header:
    return envelope_pb2.Header(
        message_id=mid,
        sender="NATO-HQ",
        topic="intel.x",
        wrapped_keys=[envelope_pb2.WrappedKey(recipient=r) for r in recipients],
    )


def test_a_links_stream_is_routed_on_its_peers_recipients_message_by_message() -> None:
    streams = LiveStreams(BrokerConfig(), _record)
    sub = streams.open("KOR", ["intel.>"], 16)
    sub.live_after, sub.gateway = 0, _Korea()
    label = parse_label("NATO SECRET // REL TO KOR")
    calls: list[str] = []

    def route(
        s: Subscription, p: PartnerPolicy, h: envelope_pb2.Header, lab: Label, now: int
    ) -> Route:
        calls.append(h.message_id)
        assert s.gateway is not None
        if any(s.gateway.reaches(w.recipient) for w in h.wrapped_keys):
            return h, "allow", ""
        return None, "no_key_wrapped", "the sender wrapped no key for that nation"

    messages = [
        ("m1", _header("m1", ["KOR-JCS", "USA-EUCOM"]), label),
        ("m2", _header("m2", ["USA-EUCOM"]), label),
        ("m3", _header("m3", ["KOR-NIS"]), label),
    ]
    decided = streams.pre_route("NATO-HQ", messages, 0, route)[sub]
    assert (decided["m1"].reason, decided["m2"].reason, decided["m3"].reason) == (
        "allow",
        "no_key_wrapped",
        "allow",
    )
    assert decided["m3"].header is messages[2][1]  # each message under its own header
    assert calls == ["m1", "m2"]  # once per (topic, label, key wrapped for the peer)
