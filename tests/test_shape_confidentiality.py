"""What the Directory and Recipients reveal: one partner cannot map the others.

Over real gRPC and mutual TLS. UKR plays the curious partner: cleared and allowed to
originate NATO CONFIDENTIAL, on ``intel.eve.>`` only. It asks Recipients about labels and
topics it may not originate (TOP SECRET with compartments, another labelling policy,
another topic) and is refused without a name; a suspended partner is refused; and the
Directory gives certificates and the key bundles a partner needs, with no status and no
groups of anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.errors import Forbidden
from broker.server import Broker
from clients.sdk import ClientError, PartnerClient
from coalition.labels import Classification, label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.policy import PartnerPolicy, PartnerStatus, policy_to_proto
from coalition.v1 import directory_pb2, exchange_pb2
from tests.helpers import admit, operator, partner, running_broker

NC, NS, CTS = Classification.CONFIDENTIAL, Classification.SECRET, Classification.TOP_SECRET

POLICIES = [
    # The curious one: NATO CONFIDENTIAL, may publish only on intel.eve.>.
    PartnerPolicy(
        partner="UKR",
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": NC},
        groups=frozenset({"NATO"}),
        publish_topics=("intel.eve.>",),
        subscribe_topics=("intel.eve.>",),
        origination_ceilings={"NATO": NC},
    ),
    PartnerPolicy(
        partner="USA",
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": CTS},
        groups=frozenset({"NATO", "FVEY"}),
        categories={"SAC": frozenset({"SIGINT", "HUMINT"})},
        publish_topics=("intel.>",),
        subscribe_topics=("intel.>",),
        origination_ceilings={"NATO": CTS},
    ),
    PartnerPolicy(
        partner="GBR",
        status=PartnerStatus.ACTIVE,
        clearances={"EU": NS},
        groups=frozenset({"EU-MEMBERS"}),
        publish_topics=("intel.>",),
        subscribe_topics=("intel.>",),
        origination_ceilings={"EU": NS},
    ),
    PartnerPolicy(
        partner="KOR",
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": NS},
        groups=frozenset({"NATO"}),
        publish_topics=("ops.>",),
        subscribe_topics=("ops.>",),
        origination_ceilings={"NATO": NS},
    ),
]
OTHERS = ("USA", "GBR", "KOR", "NATO")

# The finding's queries: each names a label or topic UKR may not originate.
ORACLE_QUERIES = [
    ("NATO TOP SECRET // REL TO NATO // SIGINT, HUMINT", "intel.eve.x"),
    ("NATO SECRET // REL TO NATO, FVEY", "intel.eve.x"),
    ("EU SECRET // REL TO GBR, EU-MEMBERS", "intel.eve.x"),
    ("EU UNCLASSIFIED // REL TO GBR", "intel.eve.x"),
    ("NATO CONFIDENTIAL // REL TO NATO, KOR", "ops.x"),
    ("NATO UNCLASSIFIED // REL TO KOR", "intel.ground"),
]


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    for pol in POLICIES:
        await admit(pki, b.port, pol)
    # NATO is proposed but not approved: registered, pending.
    async with operator(pki, "op1", b.port) as op1:
        creds = load_partner(pki / "partners" / "NATO")
        pending = PartnerPolicy(partner="NATO", status=PartnerStatus.ACTIVE, clearances={})
        await op1.admit("NATO", creds.signing_cert_der, policy_to_proto(pending), "pending")
    try:
        yield b
    finally:
        await b.stop(grace=1)


@pytest.fixture
async def clients(pki: Path, broker: Broker) -> AsyncIterator[dict[str, PartnerClient]]:
    out = {p.partner: partner(pki, p.partner, broker.port) for p in POLICIES}
    for c in out.values():
        await c.register_keys()
    try:
        yield out
    finally:
        for c in out.values():
            await c.close()


async def raw_directory(client: PartnerClient) -> dict[str, directory_pb2.DirectoryEntry]:
    """The Directory answer as it comes over the wire, by partner."""
    resp = await client.stub.Directory(exchange_pb2.DirectoryRequest())
    return {e.partner: e for e in resp.entries}


async def test_recipients_answers_only_what_the_caller_may_originate(
    clients: dict[str, PartnerClient], broker: Broker
) -> None:
    ukr = clients["UKR"]
    for text, topic in ORACLE_QUERIES:
        with pytest.raises(ClientError) as info:
            await ukr.recipients(parse_label(text), topic)
        assert info.value.status == grpc.StatusCode.PERMISSION_DENIED, (text, topic)
        message = info.value.message
        assert "recipients are answered only for" in message
        assert not any(code in message for code in ("USA", "GBR", "KOR")), message
    refusals = await broker.audit.query(kind="recipients.refused", partner="UKR")
    assert [e.decision for e in refusals] == ["not_permitted_to_originate"] * len(ORACLE_QUERIES)
    # What UKR may originate is still answered: that is what it seals with.
    allowed = parse_label("NATO CONFIDENTIAL // REL TO NATO")
    assert await ukr.recipients(allowed, "intel.eve.x") == ["USA"]
    # A label naming another originator is not one UKR may publish either.
    other = parse_label("NATO CONFIDENTIAL // REL TO NATO", originator="USA")
    with pytest.raises(ClientError) as info:
        await ukr.recipients(other, "intel.eve.x")
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED


async def test_suspended_and_pending_partners_get_no_answer(
    pki: Path, clients: dict[str, PartnerClient], broker: Broker
) -> None:
    ukr = clients["UKR"]
    allowed = parse_label("NATO CONFIDENTIAL // REL TO NATO")
    async with operator(pki, "op1", broker.port) as op1:
        await op1.suspend("UKR", "test suspension")
    with pytest.raises(ClientError) as info:
        await ukr.recipients(allowed, "intel.eve.x")
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert "suspended" in info.value.message
    with pytest.raises(ClientError) as info:
        await ukr.directory(refresh=True)
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert [e.decision for e in await broker.audit.query(kind="recipients.refused")] == [
        "suspended"
    ]
    assert [e.decision for e in await broker.audit.query(kind="directory.refused")] == ["suspended"]
    # Not admitted yet (the interceptor refuses it first; the core holds the line too).
    async with partner(pki, "NATO", broker.port) as nato:
        with pytest.raises(ClientError) as info:
            await nato.recipients(allowed, "intel.eve.x")
        assert info.value.status in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
        )
    for call in (
        lambda: broker.exchange.recipients("NATO", label_to_proto(allowed), "intel.eve.x"),
        lambda: broker.exchange.directory("NATO"),
    ):
        with pytest.raises(Forbidden) as refused:
            call()
        assert refused.value.code == "not_admitted"


async def test_directory_gives_keys_not_standing(
    pki: Path, clients: dict[str, PartnerClient], broker: Broker
) -> None:
    ukr, usa = clients["UKR"], clients["USA"]
    entries = await raw_directory(ukr)
    # Every admitted partner's signing certificate; the pending one is not listed.
    assert set(entries) == {"UKR", "USA", "GBR", "KOR"}
    assert all(e.signing_cert for e in entries.values())
    # Nobody's status or groups.
    assert all(e.status == 0 and not e.groups for e in entries.values())
    # Key bundles: itself, and only the partners it may send to (USA takes NATO on intel.>;
    # KOR subscribes only ops.>, GBR holds no NATO clearance).
    assert {p for p, e in entries.items() if e.HasField("key_bundle")} == {"UKR", "USA"}

    usa_view = await raw_directory(usa)
    assert {p for p, e in usa_view.items() if e.HasField("key_bundle")} == {"USA", "UKR"}
    # A suspension changes nothing another partner can see in the directory.
    async with operator(pki, "op1", broker.port) as op1:
        await op1.suspend("UKR", "test suspension")
        assert await raw_directory(usa) == usa_view
        # Operators keep the full view.
        shown = await op1.show("USA")
        assert shown.directory.status == directory_pb2.ACTIVE
        assert sorted(shown.directory.groups) == ["FVEY", "NATO"]
        assert shown.directory.HasField("key_bundle")
        assert (await op1.show("UKR")).directory.status == directory_pb2.SUSPENDED


async def test_minimal_directory_is_enough_to_seal_and_open(
    clients: dict[str, PartnerClient],
) -> None:
    """USA seals for UKR from its directory; UKR verifies USA's signature from its own."""
    ukr, usa = clients["UKR"], clients["USA"]
    label = parse_label("NATO CONFIDENTIAL // REL TO NATO")
    sealed = await usa.seal(b"for eve", topic="intel.eve.x", label=label)
    assert sealed.recipients == ("UKR",)
    [res] = await usa.publish([sealed.envelope])
    assert res.outcome == 1, res
    sub = ukr.subscribe(["intel.eve.>"])
    try:
        async with asyncio.timeout(10):
            async for d in sub:
                assert (await ukr.open(d)).plaintext == b"for eve"
                await sub.ack([d.offset])
                break
    finally:
        await sub.aclose()
