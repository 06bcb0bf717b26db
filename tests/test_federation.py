"""Federation between national brokers: real broker processes, one PKI per nation, mTLS
between them with gateway certificates, receipts and audit chains on both sides."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clients.cluster import NatsCluster
from clients.sdk import PartnerClient
from coalition.epoch import SenderEpochs
from coalition.federation import load_trust_file, receipt_from_audit, verify_receipt
from coalition.labels import parse_label
from coalition.v1 import audit_pb2, exchange_pb2, federation_pb2
from tests.federation_rig import (
    Nation,
    admit_and_link,
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
from tests.helpers import drop_deployment, now_ms

NATIONS = {"NATO": ["NATO", "NATO-HQ"], "KOR": ["KOR", "KOR-2"], "USA": ["USA"]}


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pkis(tmp_path_factory.mktemp("nations"), NATIONS)


@pytest.fixture
async def pair(pkis: dict[str, Path], tmp_path: Path) -> AsyncIterator[dict[str, Nation]]:
    """NATO and KOR, linked both ways, their partners admitted."""
    two = {k: pkis[k] for k in ("NATO", "KOR")}
    nations = federate(tmp_path, two, [("NATO", "KOR")])
    try:
        await start_all(nations)
        nato, kor = nations["NATO"], nations["KOR"]
        await admit_partners(nato, NATIONS["NATO"])
        await admit_partners(kor, NATIONS["KOR"])
        await link(nato, kor)
        await link(kor, nato)
        yield nations
    finally:
        stop_all(nations)


async def deliveries(
    client: PartnerClient, n: int, timeout: float = 20
) -> list[exchange_pb2.Delivery]:
    """n deliveries on a fresh subscription, acknowledged."""
    sub = client.subscribe(("intel.>",))
    got: list[exchange_pb2.Delivery] = []
    try:
        async with asyncio.timeout(timeout):
            async for d in sub:
                got.append(d)
                await sub.ack([d.offset])
                if len(got) == n:
                    break
    finally:
        await sub.aclose()
    return got


async def nothing_for(client: PartnerClient, seconds: float) -> None:
    """No delivery arrives for client within seconds (a bound, not a timing claim)."""
    sub = client.subscribe(("intel.>",))
    try:
        async with asyncio.timeout(seconds):
            async for d in sub:
                raise AssertionError(f"unexpected delivery {d.envelope.header_v2[:0]!r}")
    except TimeoutError:
        pass
    finally:
        await sub.aclose()


async def audit(nation: Nation, kind: str) -> list[audit_pb2.AuditEntry]:
    async with nation.operator() as op:
        return list(await op.audit(kind=kind))


async def eventually_audited(nation: Nation, kind: str, n: int) -> list[audit_pb2.AuditEntry]:
    async with asyncio.timeout(20):
        while len(found := await audit(nation, kind)) < n:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.1)
    return found


async def verify_chain(nation: Nation) -> None:
    async with nation.operator() as op:
        v = await op.verify_audit()
    assert v.ok, v.problem
    assert not v.tampered_offsets


async def test_a_message_released_to_another_nation_reaches_its_partner_end_to_end(
    pair: dict[str, Nation],
) -> None:
    nato, kor = pair["NATO"], pair["KOR"]
    sender, kor_creds = nato.creds("NATO"), kor.creds("KOR")
    env = seal(sender, [recipient(kor_creds)], parse_label("NATO SECRET // REL TO KOR"))
    async with nato.partner("NATO") as pub, kor.partner("KOR") as rcv:
        [res] = await pub.publish([env])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        [d] = await deliveries(rcv, 1)
    # Byte for byte: the envelope the recipient got is the one the sender signed.
    assert d.envelope.SerializeToString() == env.SerializeToString()
    opened = open_foreign(d.envelope, kor_creds, kor.trust_file, sender.signing_cert_der)
    assert opened.plaintext == b"summary" and opened.header.sender == "NATO"
    # The receipt: in NATO's chain, signed by KOR's audit key, naming KOR's decision.
    [rec] = await eventually_audited(nato, "federation.receipt", 1)
    signed = receipt_from_audit(json.loads(rec.detail_json))
    kor_ca = load_trust_file(nato.trust_file).peers["KOR"].ca_cert
    receipt = verify_receipt(signed, kor_ca, now_ms())
    assert receipt.outcome == federation_pb2.RECEIPT_STORED
    assert receipt.message_id == res.message_id and receipt.sender == "NATO"
    nato_ca = load_trust_file(kor.trust_file).peers["NATO"].ca_cert
    with pytest.raises(ValueError):  # not NATO's broker's signature
        verify_receipt(signed, nato_ca, now_ms())
    [received] = await audit(kor, "federation.received")
    assert received.seq == receipt.audit_seq and received.message_id == res.message_id
    await verify_chain(nato)
    await verify_chain(kor)


async def test_nothing_crosses_that_the_release_policy_does_not_allow(
    pair: dict[str, Nation],
) -> None:
    """REL TO USA only: KOR's gateway is not released to, so nothing crosses, and the
    decision not to forward is in NATO's chain."""
    nato, kor = pair["NATO"], pair["KOR"]
    label = parse_label("NATO SECRET // REL TO USA")
    env = seal(nato.creds("NATO"), [recipient(kor.creds("KOR"))], label)
    async with nato.partner("NATO") as pub, kor.partner("KOR") as rcv:
        [res] = await pub.publish([env])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        await nothing_for(rcv, 0.8)
    denied = [e for e in await audit(nato, "deliver.denied") if e.message_id == res.message_id]
    assert [(e.partner, e.decision) for e in denied] == [("KOR", "not_releasable")], denied
    # Released to KOR, but no key wrapped for anyone of KOR's: it does not cross either.
    hq_only = seal(
        nato.creds("NATO"),
        [recipient(nato.creds("NATO-HQ"))],
        parse_label("NATO SECRET // REL TO KOR, NATO-HQ"),
        sequence=2,
    )
    async with nato.partner("NATO") as pub, kor.partner("KOR") as rcv:
        [res] = await pub.publish([hq_only])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        await nothing_for(rcv, 0.8)
    denied = [e for e in await audit(nato, "deliver.denied") if e.message_id == res.message_id]
    assert [(e.partner, e.decision) for e in denied] == [("KOR", "no_key_wrapped")], denied
    assert await audit(kor, "federation.received") == []


@pytest.fixture
async def triangle(pkis: dict[str, Path], tmp_path: Path) -> AsyncIterator[dict[str, Nation]]:
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


async def test_the_triangle_delivers_once_and_never_back_to_the_origin(
    triangle: dict[str, Nation],
) -> None:
    nato, kor, usa = triangle["NATO"], triangle["KOR"], triangle["USA"]
    to = [
        recipient(kor.creds("KOR")),
        recipient(usa.creds("USA")),
        recipient(nato.creds("NATO-HQ")),
    ]
    env = seal(nato.creds("NATO"), to, parse_label("NATO SECRET // REL TO KOR, USA, NATO-HQ"))
    async with (
        nato.partner("NATO") as pub,
        kor.partner("KOR") as k,
        usa.partner("USA") as u,
        nato.partner("NATO-HQ") as hq,
    ):
        [res] = await pub.publish([env])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        for client in (k, u, hq):
            [d] = await deliveries(client, 1)
            assert d.envelope.SerializeToString() == env.SerializeToString()
        await eventually_audited(nato, "federation.receipt", 2)
        # Once each: nothing more comes (the three watched at once).
        await asyncio.gather(*(nothing_for(c, 1.0) for c in (k, u, hq)))
    # Stored once in each peer; nothing came back to NATO.
    assert len(await audit(kor, "federation.received")) == 1
    assert len(await audit(usa, "federation.received")) == 1
    assert await audit(nato, "federation.received") == []
    # KOR and USA decided, and recorded, not to forward NATO's message any further.
    for here, other in ((kor, "USA"), (usa, "KOR")):
        denied = [e for e in await audit(here, "deliver.denied") if e.partner == other]
        assert [e.decision for e in denied] == ["forwarded"], denied
    for n in (nato, kor, usa):
        await verify_chain(n)


async def test_suspending_a_peer_stops_the_flow_both_ways_at_once(
    pair: dict[str, Nation],
) -> None:
    nato, kor = pair["NATO"], pair["KOR"]
    to_kor = seal(
        nato.creds("NATO"), [recipient(kor.creds("KOR"))], parse_label("NATO SECRET // REL TO KOR")
    )
    to_nato = seal(
        kor.creds("KOR"), [recipient(nato.creds("NATO"))], parse_label("NATO SECRET // REL TO NATO")
    )

    async def link_up(here: Nation, peer: str) -> bool:
        async with here.operator() as op:
            [p] = [p for p in (await op.peers()).peers if p.nation == peer]
        return p.connected

    async with asyncio.timeout(20):
        while not (await link_up(nato, "KOR") and await link_up(kor, "NATO")):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    async with nato.operator("op1") as op1:
        await op1.suspend("KOR", "test: the link is cut")
    # At once, both ways: NATO's link to KOR closes, and NATO ends KOR's open stream, so
    # KOR's link is down before it has anything to send.
    async with asyncio.timeout(5):
        while await link_up(nato, "KOR") or await link_up(kor, "NATO"):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    async with nato.partner("NATO") as n, kor.partner("KOR") as k:
        assert (await n.publish([to_kor]))[0].outcome == exchange_pb2.ACCEPTED
        assert (await k.publish([to_nato]))[0].outcome == exchange_pb2.ACCEPTED
        await nothing_for(k, 1.5)
        await nothing_for(n, 0.5)
        assert await audit(kor, "federation.received") == []
        assert await audit(nato, "federation.received") == []
        # Reinstated by two operators: what waited crosses now, each way once.
        async with nato.operator("op1") as op1, nato.operator("op2") as op2:
            prop = await op1.reinstate("KOR", "test: the link is back")
            await op2.approve(prop.proposal.proposal_id, "approved in test")
        [d] = await deliveries(k, 1)
        assert d.envelope.SerializeToString() == to_kor.SerializeToString()
        [d] = await deliveries(n, 1)
        assert d.envelope.SerializeToString() == to_nato.SerializeToString()


@pytest.fixture
async def keyed_pair(pkis: dict[str, Path], tmp_path: Path) -> AsyncIterator[dict[str, Nation]]:
    """NATO and KOR with their partners' key bundles registered, then linked."""
    two = {k: pkis[k] for k in ("NATO", "KOR")}
    nations = federate(tmp_path, two, [("NATO", "KOR")])
    try:
        await start_all(nations)
        await admit_and_link(nations["NATO"], nations["KOR"], NATIONS, register_keys=True)
        yield nations
    finally:
        stop_all(nations)


async def test_senders_seal_for_another_nations_partners_through_the_directory(
    keyed_pair: dict[str, Nation],
) -> None:
    """The SDK, as a node uses it: NATO's Recipients and Directory name KOR's partners
    (learned over the link), each verified against KOR's CA from the node's own trust
    file; KOR's node opens it the same way. Without a trust file nothing foreign verifies."""
    nato, kor = keyed_pair["NATO"], keyed_pair["KOR"]
    label = parse_label("NATO SECRET // REL TO KOR")
    nato_trust, kor_trust = load_trust_file(nato.trust_file), load_trust_file(kor.trust_file)
    sender = PartnerClient(nato.creds("NATO"), nato.target, trust=nato_trust)
    rcv = PartnerClient(kor.creds("KOR-2"), kor.target, trust=kor_trust)
    plain = nato.partner("NATO-HQ")  # no trust file
    try:
        async with asyncio.timeout(20):
            while sorted(await sender.recipients(label, "intel.report")) != ["KOR", "KOR-2"]:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        sealed = await sender.seal(b"across", topic="intel.report", label=label)
        assert sorted(sealed.recipients) == ["KOR", "KOR-2"]
        [res] = await sender.publish([sealed.envelope])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        [d] = await deliveries(rcv, 1)
        opened = await rcv.open(d)
        assert opened.plaintext == b"across" and opened.header.sender == "NATO"
        # Without a trust file, KOR's entries do not verify against NATO's CA.
        d_plain = await plain.directory(refresh=True)
        assert "KOR" not in d_plain.peers and "KOR" in d_plain.problems
        # The KOR entry the sender sees is KOR's partner, verified against KOR's CA (the
        # gateway's registry entry, which holds KOR's CA certificate, is never listed).
        seen = await sender.directory(refresh=True)
        assert {"KOR", "KOR-2"} <= set(seen.peers) and not seen.problems
        # And back: KOR-2 seals for NATO's partners, NATO's partner opens it.
        back = parse_label("NATO SECRET // REL TO NATO")
        sealed = await rcv.seal(b"and back", topic="intel.report", label=back)
        assert "NATO" in sealed.recipients
        [res] = await rcv.publish([sealed.envelope])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        [d] = await deliveries(sender, 1)
        opened = await sender.open(d)
        assert opened.plaintext == b"and back" and opened.header.sender == "KOR-2"
    finally:
        for c in (sender, rcv, plain):
            await c.close()


async def test_a_national_broker_on_jetstream(
    pkis: dict[str, Path], tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """KOR's broker keeps its store, registry and audit chain on a JetStream cluster:
    the same path, and forwarded sequences out of order are stored (dedupe still holds)."""
    prefix = f"F{uuid.uuid4().hex[:10]}"
    monitors = [f"http://127.0.0.1:{n.monitor_port}" for n in nats_cluster.nodes]
    store = (
        '[store]\nbackend = "jetstream"\n'
        f"servers = {json.dumps(nats_cluster.urls)}\n"
        f'prefix = "{prefix}"\n'
        f"monitor = {json.dumps(monitors)}\n"
    )
    two = {k: pkis[k] for k in ("NATO", "KOR")}
    nations = federate(tmp_path, two, [("NATO", "KOR")], extra={"KOR": store})
    nato, kor = nations["NATO"], nations["KOR"]
    try:
        await start_all(nations)
        await admit_partners(nato, NATIONS["NATO"])
        await admit_partners(kor, NATIONS["KOR"])
        await link(nato, kor)
        await link(kor, nato)
        sender, me = nato.creds("NATO"), kor.creds("KOR")
        label = parse_label("NATO SECRET // REL TO KOR")
        epochs = SenderEpochs("NATO")
        envs = [seal(sender, [recipient(me)], label, sequence=s, epochs=epochs) for s in (1, 2, 3)]
        async with nato.partner("NATO") as pub, kor.partner("KOR") as rcv:
            [res] = await pub.publish([envs[2]])
            assert res.outcome == exchange_pb2.ACCEPTED, res
            [d] = await deliveries(rcv, 1)
            assert d.envelope.SerializeToString() == envs[2].SerializeToString()
            # Lower sequences after a higher one, and a copy: as a backlog sent FLASH first
            # and a resend would bring them.
            cert = sender.signing_cert_der
            got = await forward_as(
                nato.pki,
                "NATO",
                kor,
                [item(envs[0], cert), item(envs[1], cert), item(envs[2], cert)],
            )
            outcomes = [federation_pb2.CustodyReceipt.FromString(r.receipt).outcome for r in got]
            assert outcomes == [
                federation_pb2.RECEIPT_STORED,
                federation_pb2.RECEIPT_STORED,
                federation_pb2.RECEIPT_DUPLICATE,
            ]
            assert len(await deliveries(rcv, 2)) == 2
        await verify_chain(kor)
        await verify_chain(nato)
    finally:
        stop_all(nations)
        await drop_deployment(nats_cluster, prefix)


async def test_nodes_of_two_nations_exchange_through_their_brokers(
    keyed_pair: dict[str, Nation], tmp_path: Path
) -> None:
    """`coalition-node publish` in NATO and `coalition-node run` in KOR, each with its
    nation's trust file: the summary lands in the KOR node's inbox once, from NATO."""
    from tests.node_helpers import node, start_daemon, stop, write_config

    nato, kor = keyed_pair["NATO"], keyed_pair["KOR"]
    fed = '[federation]\nfile = "{}"\n'
    pub_cfg = write_config(
        tmp_path / "nato" / "node.toml",
        nato.pki,
        "NATO",
        nato.broker.port,
        extra=fed.format(nato.trust_file),
    )
    rcv_cfg = write_config(
        tmp_path / "kor" / "node.toml",
        kor.pki,
        "KOR-2",
        kor.broker.port,
        extra=fed.format(kor.trust_file),
    )
    daemon = await start_daemon(rcv_cfg, tmp_path / "kor-node.log")
    try:
        label = "NATO SECRET // REL TO KOR"
        async with asyncio.timeout(30):
            while True:  # until NATO's broker has learned KOR's partners over the link
                r = await node(
                    "publish",
                    "--config",
                    str(pub_cfg),
                    "--topic",
                    "intel.ground",
                    "--label",
                    label,
                    "--json",
                    "-",
                    stdin=b"Armour moving north",
                )
                if r.code == 0:
                    break
                assert "no eligible recipient" in r.err or "not sealed" in r.err, r
                await asyncio.sleep(0.5)
        assert "KOR-2" in json.loads(r.out)["recipients"], r.out
        async with asyncio.timeout(30):
            while True:
                inbox = await node("inbox", "--config", str(rcv_cfg), "--json")
                entries = json.loads(inbox.out)
                if entries:
                    break
                await asyncio.sleep(0.3)
        [entry] = entries
        assert entry["sender"] == "NATO" and entry["topic"] == "intel.ground"
    finally:
        assert await stop(daemon) == 0
