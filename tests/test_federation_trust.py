"""What a national broker cannot do to another: speak for a third nation, forward another
nation's messages, relabel or re-sign, drop unseen, or get a message stored twice.
Each test plays the compromised broker by calling the peer's Federation service with
that nation's real gateway certificate; every peer here is a real broker process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from clients.node.inbox import Entry, Inbox
from coalition import envelope_v2
from coalition.epoch import SenderEpochs
from coalition.labels import parse_label
from coalition.pki import issue_gateway, issue_partner, load_partner
from coalition.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc, federation_pb2
from tests import v2_tools
from tests.federation_rig import (
    Nation,
    admit_partners,
    federate,
    forward_as,
    item,
    link,
    make_pkis,
    open_foreign,
    recipient,
    seal,
    start_all,
    stop_all,
)
from tests.helpers import now_ms
from tests.test_federation import audit, deliveries, nothing_for

NATIONS = {"NATO": ["NATO", "NATO-HQ"], "KOR": ["KOR", "KOR-2"], "USA": ["USA"]}
LABEL = parse_label("NATO SECRET // REL TO KOR, USA, NATO")


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = make_pkis(tmp_path_factory.mktemp("nations"), NATIONS)
    # What a compromised KOR could mint with its own CA: USA's gateway and a USA partner.
    issue_gateway(out["KOR"], "USA", now_ms())
    issue_partner(out["KOR"], "USA", now_ms())
    return out


@pytest.fixture
async def trio(pkis: dict[str, Path], tmp_path: Path) -> AsyncIterator[dict[str, Nation]]:
    """NATO, KOR and USA, every pair linked and admitted both ways."""
    nations = federate(tmp_path, pkis, [("NATO", "KOR"), ("NATO", "USA"), ("KOR", "USA")])
    try:
        await start_all(nations)
        for n in nations.values():
            await admit_partners(n, NATIONS[n.code])
            for peer in n.peers:
                await link(n, nations[peer])
        yield nations
    finally:
        stop_all(nations)


def outcome(r: federation_pb2.SignedReceipt) -> tuple[str, str]:
    receipt = federation_pb2.CustodyReceipt.FromString(r.receipt)
    return federation_pb2.ReceiptOutcome.Name(receipt.outcome), receipt.reason_code


async def refused_entries(nation: Nation) -> list[tuple[str, str]]:
    return [(e.partner, e.decision) for e in await audit(nation, "federation.refused")]


async def test_a_gateway_forwards_only_its_own_nations_messages(trio: dict[str, Nation]) -> None:
    nato, kor, usa = trio["NATO"], trio["KOR"], trio["USA"]
    to_nato = [recipient(nato.creds("NATO"))]
    usa_creds = usa.creds("USA")
    rogue_usa = load_partner(kor.pki / "partners" / "USA")  # USA, certified by KOR's CA
    kor2 = kor.creds("KOR-2")
    got = await forward_as(
        kor.pki,
        "KOR",
        nato,
        [
            # A real USA message, relayed by KOR: KOR's gateway does not speak for USA.
            item(seal(usa_creds, to_nato, LABEL), usa_creds.signing_cert_der),
            # "USA" under KOR's CA: refused before any signature work.
            item(seal(rogue_usa, to_nato, LABEL), rogue_usa.signing_cert_der),
            # KOR's own message with KOR-2's certificate: the sender is not the certificate's.
            item(seal(kor.creds("KOR"), to_nato, LABEL), kor2.signing_cert_der),
        ],
    )
    assert [outcome(r) for r in got] == [
        ("RECEIPT_REFUSED", "origin_mismatch"),
        ("RECEIPT_REFUSED", "origin_mismatch"),
        ("RECEIPT_REFUSED", "sender_mismatch"),
    ]
    assert await refused_entries(nato) == [
        ("USA", "origin_mismatch"),
        ("USA", "origin_mismatch"),
        ("KOR-2", "sender_mismatch"),
    ]
    async with nato.partner("NATO") as rcv:
        await nothing_for(rcv, 0.6)


async def test_a_foreign_ca_speaks_only_for_its_own_nations_gateway(
    trio: dict[str, Nation],
) -> None:
    nato, kor = trio["NATO"], trio["KOR"]
    env = seal(kor.creds("KOR"), [recipient(nato.creds("NATO"))], LABEL)
    # KOR's CA naming USA's gateway: refused at authorization, before any request.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await forward_as(kor.pki, "USA", nato, [item(env, kor.creds("KOR").signing_cert_der)])
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # KOR's CA naming a USA partner, on NATO's Exchange.
    rogue = load_partner(kor.pki / "partners" / "USA")
    tls = grpc.ssl_channel_credentials(
        (nato.pki / "ca" / "ca.crt").read_bytes(), rogue.tls_key_pem, rogue.tls_cert_pem
    )
    async with grpc.aio.secure_channel(nato.target, tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await exchange_pb2_grpc.ExchangeStub(channel).Directory(exchange_pb2.DirectoryRequest())
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "issued by nation KOR's CA" in (exc.value.details() or "")
    # A real gateway on the Exchange, and a partner on Federation: deny by default.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await forward_as_partner(nato, env)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reasons = {e.decision for e in await audit(nato, "auth.refused")}
    assert {"foreign_identity", "not_a_gateway"} <= reasons


async def forward_as_partner(to: Nation, env: envelope_pb2.Envelope) -> None:
    """NATO's own partner calling NATO's Federation service."""
    from coalition.v1 import federation_pb2_grpc

    creds = to.creds("NATO")
    tls = grpc.ssl_channel_credentials(creds.ca_pem, creds.tls_key_pem, creds.tls_cert_pem)
    async with grpc.aio.secure_channel(to.target, tls) as channel:
        call = federation_pb2_grpc.FederationStub(channel).Forward(
            iter([federation_pb2.ForwardRequest(items=[item(env, creds.signing_cert_der)])])
        )
        async for _ in call:
            pass


async def test_relabelled_or_resigned_envelopes_are_refused_by_the_next_hop_and_the_node(
    trio: dict[str, Nation],
) -> None:
    nato, kor = trio["NATO"], trio["KOR"]
    sender, hq, me = nato.creds("NATO"), nato.creds("NATO-HQ"), kor.creds("KOR")
    env = seal(sender, [recipient(me)], parse_label("NATO SECRET // REL TO USA"))

    def relabel(core: envelope_pb2.Header) -> None:
        core.label.CopyFrom(envelope_pb2.Header().label)
        from coalition.labels import label_to_proto

        core.label.CopyFrom(label_to_proto(parse_label("NATO SECRET // REL TO KOR")))

    relabelled = v2_tools.edit_core(env, relabel)
    assert hq.hybrid_signing_key is not None
    # Made consistent again and signed by another NATO key the broker might hold.
    [resigned] = v2_tools.rebatch([relabelled], hq.hybrid_signing_key)
    cert = sender.signing_cert_der
    got = await forward_as(
        nato.pki,
        "NATO",
        kor,
        [item(relabelled, cert), item(resigned, cert), item(resigned, hq.signing_cert_der)],
    )
    assert [outcome(r) for r in got] == [
        ("RECEIPT_REFUSED", "bad_path"),
        ("RECEIPT_REFUSED", "bad_signature"),
        ("RECEIPT_REFUSED", "sender_mismatch"),
    ]
    assert [d for _, d in await refused_entries(kor)] == [
        "bad_path",
        "bad_signature",
        "sender_mismatch",
    ]
    for bad in (relabelled, resigned):  # the recipient's own check refuses them too
        with pytest.raises(envelope_v2.InvalidEnvelopeV2):
            open_foreign(bad, me, kor.trust_file, cert)
    async with kor.partner("KOR") as rcv:
        await nothing_for(rcv, 0.6)


async def test_a_withheld_forward_is_a_gap_at_the_recipient_and_a_copy_is_stored_once(
    trio: dict[str, Nation], tmp_path: Path
) -> None:
    nato, kor = trio["NATO"], trio["KOR"]
    sender, me = nato.creds("NATO"), kor.creds("KOR")
    epochs = SenderEpochs("NATO")
    label = parse_label("NATO SECRET // REL TO KOR")
    envs = [seal(sender, [recipient(me)], label, sequence=s, epochs=epochs) for s in (1, 2, 3)]
    cert = sender.signing_cert_der
    # A compromised NATO broker forwards 1, withholds 2, forwards 3 and 1 again.
    got = await forward_as(
        nato.pki, "NATO", kor, [item(envs[0], cert), item(envs[2], cert), item(envs[0], cert)]
    )
    assert [outcome(r)[0] for r in got] == [
        "RECEIPT_STORED",
        "RECEIPT_STORED",
        "RECEIPT_DUPLICATE",
    ]
    async with kor.partner("KOR") as rcv:
        ds = await deliveries(rcv, 2)
        await nothing_for(rcv, 0.6)  # the copy was not stored again
    inbox = Inbox(tmp_path / "inbox.db")
    for d in ds:
        opened = open_foreign(d.envelope, me, kor.trust_file, cert)
        inbox.store(
            Entry(
                opened.header.message_id,
                "NATO",
                opened.header.sequence,
                opened.sequence,
                opened.header.topic,
                "ROUTINE",
                "",
                opened.header.created_ms,
                now_ms(),
                d.offset,
                "text/plain",
                "",
            ),
            opened.plaintext,
        )
    gaps = [(g.sender, g.first, g.last) for g in inbox.gaps()]
    inbox.close()
    assert gaps == [("NATO", 2, 2)]
    [dup] = await audit(kor, "federation.duplicate")
    assert json.loads(dup.detail_json)["gateway"] == "NATO"
    assert (await refused_entries(kor)) == []
