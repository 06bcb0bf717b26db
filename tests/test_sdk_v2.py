"""Envelope v2 end to end through the SDK and the node, on a real broker over mTLS.

Concurrent seals are signed as one batch and stay in sequence order at the broker; a
partner removed from a release mid-stream cannot open anything sent after, even
delivered by a misbehaving broker with its old epoch key still cached; and the upgrade
path: a v2-capable node opens the v1 messages a broker stored before and the v2 after,
catching up after being offline.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.server import Broker
from clients.sdk import OPEN_ERRORS, Directory, Draft, PartnerClient, Peer, Sealed, Sequencer
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import EpochKeyError
from coalition.hybrid import HybridPublicKey, HybridSigningKey
from coalition.labels import Classification, label_to_proto, parse_label
from coalition.pki import issue_partner, load_partner
from coalition.policy import policy_to_proto
from coalition.v1 import envelope_pb2, exchange_pb2, intel_pb2
from tests.helpers import admit, eventually, now_ms, operator, policy, running_broker
from tests.node_helpers import start_daemon, stop, write_config

LABEL = parse_label("NATO SECRET // REL TO USA, GBR")


def report(i: int) -> bytes:
    return intel_pb2.IntelSummary(title=f"report {i}", summary="movement").SerializeToString()


def epoch_keys(s: Sealed | envelope_pb2.Envelope) -> dict[str, envelope_pb2.EpochKey]:
    e = s.envelope if isinstance(s, Sealed) else s
    return {k.recipient: k for k in envelope_pb2.HeaderV2.FromString(e.header_v2).epoch_keys}


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    for code in ("KOR", "USA", "GBR"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


def client(pki: Path, code: str, port: int) -> PartnerClient:
    return PartnerClient(
        load_partner(pki / "partners" / code),
        f"127.0.0.1:{port}",
        sequencer=Sequencer(per_recipient=True),
    )


async def publish_ok(c: PartnerClient, sealed: list[Sealed]) -> list[int]:
    results = await c.publish([s.envelope for s in sealed])
    assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * len(sealed), results
    return [r.offset for r in results]


async def take(c: PartnerClient, n: int) -> list[exchange_pb2.Delivery]:
    """The next n deliveries of a fresh subscription, acknowledged."""
    got: list[exchange_pb2.Delivery] = []
    sub = c.subscribe(["intel.>"])
    async for d in sub:
        got.append(d)
        await sub.ack([d.offset])
        if len(got) == n:
            break
    await sub.aclose()
    return got


async def test_concurrent_seals_share_a_batch_and_keep_sequence_order(
    pki: Path, broker: Broker
) -> None:
    async with client(pki, "KOR", broker.port) as kor, client(pki, "USA", broker.port) as usa:
        for c in (kor, usa):
            await c.register_keys()
        assert kor.sealer is not None  # the development PKI certifies hybrid keys

        async def seal_and_publish(i: int) -> exchange_pb2.PublishResult:
            s = await kor.seal(report(i), topic="intel.ground", label=LABEL)
            [res] = await kor.publish([s.envelope])
            return res

        results = await asyncio.gather(*(seal_and_publish(i) for i in range(32)))
        # Publish order is sequence order: the broker refuses a sequence that does not
        # increase, so any reordering would show as a refusal here.
        assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * 32
        assert kor.sealer.batches < 32
        opened = [await usa.open(d) for d in await take(usa, 32)]
        assert {o.version for o in opened} == {2}
        assert sorted(o.recipient_sequence for o in opened) == list(range(1, 33))
        # One root check per batch, one decapsulation for the one epoch.
        assert usa.opener.roots.verifications == kor.sealer.batches
        assert usa.opener.epochs.decapsulations == 1


async def test_a_partner_removed_mid_stream_opens_nothing_sent_after(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    """GBR receives and opens a stream, then an operator lowers its clearance. KOR's next
    messages roll GBR's epoch and carry no key for it; a broker that delivers them to
    GBR anyway (taken from its store) gives GBR nothing it can open, although GBR still
    holds the old epoch's key."""
    async with (
        client(pki, "KOR", broker.port) as kor,
        client(pki, "USA", broker.port) as usa,
        client(pki, "GBR", broker.port) as gbr,
    ):
        for c in (kor, usa, gbr):
            await c.register_keys()
        assert kor.sealer is not None
        before = await kor.seal_many([report(i) for i in range(3)], topic="intel.a", label=LABEL)
        assert all(set(s.recipients) == {"USA", "GBR"} for s in before)
        await publish_ok(kor, before)
        old = epoch_keys(before[0])["GBR"]
        for d in await take(gbr, 3):
            assert (await gbr.open(d)).plaintext.startswith(b"\n\x08report ")
        assert gbr.opener.epochs.holds("KOR", old.key_id, bytes(old.epoch_id))

        # The operator removes GBR from SECRET releases (a lowering applies at once).
        async with operator(pki, "op1", broker.port) as op:
            await op.set_policy(
                policy_to_proto(policy("GBR", level=Classification.RESTRICTED)), "removed"
            )
        after = [await kor.seal(report(10 + i), topic="intel.a", label=LABEL) for i in range(3)]
        assert all(s.recipients == ("USA",) for s in after)
        assert "GBR" in after[0].not_sealed_for
        # The sender rolled GBR's epoch at once (it saw the recipient set change).
        assert kor.sealer.epochs.current_epoch("GBR") is None
        offsets = await publish_ok(kor, after)

        # A misbehaving broker delivers the later envelopes to GBR anyway.
        with sqlite3.connect(tmp_path / "broker" / "messages.db") as db:
            stolen = [
                envelope_pb2.Envelope.FromString(
                    db.execute(
                        "SELECT envelope FROM messages WHERE msg_offset = ?", (o,)
                    ).fetchone()[0]
                )
                for o in offsets
            ]
        for e, o in zip(stolen, offsets, strict=True):
            assert envelope_v2.is_v2(e) and "GBR" not in epoch_keys(e)
            with pytest.raises(OPEN_ERRORS) as info:
                await gbr.open(exchange_pb2.Delivery(offset=o, envelope=e))
            assert isinstance(info.value, OPEN_ERRORS)
            assert info.value.reason.value == "not_a_recipient"
            # Nor does the old epoch's key unwrap anything of a later message: the wrap
            # is bound to the header it was made for.
            core = envelope_pb2.HeaderV2.FromString(e.header_v2).core
            with pytest.raises(EpochKeyError):
                gbr.opener.epochs.unwrap("KOR", core, old)

        # Reinstated (two operators), GBR gets a NEW epoch, never the one it held.
        async with (
            operator(pki, "op1", broker.port) as op1,
            operator(pki, "op2", broker.port) as op2,
        ):
            resp = await op1.set_policy(policy_to_proto(policy("GBR")), "reinstated")
            await op2.approve(resp.proposal.proposal_id)
        [again] = await kor.seal_many([report(20)], topic="intel.a", label=LABEL)
        assert set(again.recipients) == {"USA", "GBR"}
        assert bytes(epoch_keys(again)["GBR"].epoch_id) != bytes(old.epoch_id)


async def test_a_v2_node_opens_v1_stored_before_and_v2_after(pki: Path, tmp_path: Path) -> None:
    """The upgrade path: KOR's certificate certifies no ML-DSA-65 key (issued before
    hybrid keys), so it sends v1; GBR's does, so it sends v2. USA's node receives v1
    live, goes offline while both are stored, catches up on both, and then receives both
    live: everything opens, once, with no quarantine and no sequence gap."""
    mixed = tmp_path / "pki"
    shutil.copytree(pki, mixed)
    issue_partner(mixed, "KOR", now_ms(), force=True, ml_dsa=False)
    broker = await running_broker(mixed, tmp_path / "broker")
    try:
        for code in ("KOR", "USA", "GBR"):
            await admit(mixed, broker.port, policy(code))
        cfg = write_config(tmp_path / "usa" / "node.toml", mixed, "USA", broker.port)
        inbox = cfg.parent / "usa-inbox.db"
        log = tmp_path / "usa.log"
        async with (
            client(mixed, "KOR", broker.port) as kor,
            client(mixed, "GBR", broker.port) as gbr,
        ):
            assert kor.sealer is None and gbr.sealer is not None
            node = await start_daemon(cfg, log)
            await eventually(lambda: log.exists() and "caught up" in log.read_text(), 20)
            await kor.register_keys()
            await gbr.register_keys()
            ids = []
            first = await kor.seal_many([report(i) for i in range(3)], topic="intel.a", label=LABEL)
            await publish_ok(kor, first)
            ids += [s.message_id for s in first]
            await eventually(lambda: len(inbox_ids(inbox)) == 3, 20)
            await stop(node)

            offline = [
                *await kor.seal_many(
                    [report(i) for i in range(3, 6)], topic="intel.a", label=LABEL
                ),
                *await gbr.seal_many(
                    [report(i) for i in range(6, 12)], topic="intel.a", label=LABEL
                ),
            ]
            await publish_ok(kor, offline[:3])
            await publish_ok(gbr, offline[3:])
            ids += [s.message_id for s in offline]
            assert [envelope_v2.is_v2(s.envelope) for s in offline] == [False] * 3 + [True] * 6

            node = await start_daemon(cfg, log)
            try:
                await eventually(lambda: len(inbox_ids(inbox)) == 12, 30)
                live = [
                    await gbr.seal(report(12), topic="intel.a", label=LABEL),
                    await kor.seal(report(13), topic="intel.a", label=LABEL),
                ]
                await publish_ok(gbr, live[:1])
                await publish_ok(kor, live[1:])
                ids += [s.message_id for s in live]
                await eventually(lambda: len(inbox_ids(inbox)) == 14, 20)
            finally:
                await stop(node)
        assert sorted(inbox_ids(inbox)) == sorted(ids)
        with sqlite3.connect(inbox) as c:
            assert c.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == 0
            assert c.execute("SELECT COUNT(*) FROM gaps").fetchone()[0] == 0
            highs = dict(c.execute("SELECT sender, high FROM rx_senders").fetchall())
        assert highs == {"KOR": 7, "GBR": 7}
    finally:
        await broker.stop(grace=1)


def inbox_ids(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        try:
            return [r[0] for r in c.execute("SELECT message_id FROM inbox")]
        except sqlite3.OperationalError:
            return []


async def test_a_changed_directory_entry_rolls_that_partners_epoch(pki: Path) -> None:
    """A directory refresh that shows a partner's entry changed (here its hybrid key, a
    change the kernel's own key-id check does not see) rolls that partner's epoch at
    once, and only that partner's; a partner that leaves the directory rolls too."""
    kor = client(pki, "KOR", 9)  # never connects: the directory is handed over directly
    try:
        assert kor.sealer is not None
        peers = {c: load_partner(pki / "partners" / c) for c in ("USA", "GBR")}

        def directory(usa_hybrid: HybridPublicKey | None, *codes: str) -> Directory:
            d = Directory()
            for code in codes:
                c = peers[code]
                hybrid = c.hybrid_signing_key
                d.peers[code] = Peer(
                    code,
                    0,
                    frozenset(),
                    c.signing_key.public_key(),
                    c.signing_key_id,
                    c.current_key_id,
                    c.hpke_keys[c.current_key_id].public_key(),
                    hybrid_public=(
                        usa_hybrid
                        if code == "USA"
                        else None
                        if hybrid is None
                        else hybrid.public_key()
                    ),
                )
            return d

        before = directory(None, "USA", "GBR")
        to = [env.Recipient(c, p.key_id, p.hpke_public) for c, p in before.peers.items()]  # type: ignore[arg-type]

        async def epochs() -> dict[str, bytes]:
            [s] = await kor.sealer.seal(  # type: ignore[union-attr]
                [Draft(b"x", "intel.a", label_to_proto(LABEL), 1, env.INTEL_SUMMARY, to)]
            )
            return {c: bytes(k.epoch_id) for c, k in epoch_keys(s).items()}

        first = await epochs()
        kor._roll_changed(before, directory(None, "USA", "GBR"))  # nothing changed
        assert await epochs() == first
        kor._roll_changed(before, directory(HybridSigningKey.generate().public_key(), "USA", "GBR"))
        second = await epochs()
        assert second["USA"] != first["USA"] and second["GBR"] == first["GBR"]
        kor._roll_changed(before, directory(None, "USA"))  # GBR left the directory
        third = await epochs()
        assert third["GBR"] != second["GBR"] and third["USA"] == second["USA"]
    finally:
        await kor.close()
