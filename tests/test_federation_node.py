"""What a recipient's own node sees of compromised national brokers: real broker
processes for NATO and KOR, and KOR's `coalition-node` daemon with its own trust file.

A compromised NATO broker (this test holding NATO's real gateway certificate) forwards
to KOR's broker what a broker withholding a message would (numbers 1 and 3 of a
sender's sequence for the recipient, not 2). KOR's broker cannot tell (only what NATO
releases crosses, so foreign sequences have gaps by design); the recipient's node, which
opens each envelope with the sender's certificate checked against NATO's CA from its
own trust file, sees the hole in the sender's numbers for it and raises its alarm.

When KOR's own broker is compromised too (this test serving KOR's Exchange with KOR's
broker certificate, passing the real broker's directory through), the node is the last
check: a relabelled or re-signed envelope, and a "NATO" sender certified by KOR's CA,
are quarantined, never stored.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.node.inbox import GAP_GRACE_S
from coalition.epoch import SenderEpochs
from coalition.labels import label_to_proto, parse_label
from coalition.pki import issue_partner, load_broker, load_partner
from coalition.v1 import (
    directory_pb2,
    envelope_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
    federation_pb2,
    label_pb2,
)
from tests import v2_tools
from tests.federation_rig import (
    Nation,
    admit_and_link,
    federate,
    forward_as,
    item,
    make_pkis,
    recipient,
    seal,
    start_all,
    stop_all,
)
from tests.helpers import now_ms
from tests.node_helpers import free_port, start_daemon, stop

NATIONS = {"NATO": ["NATO"], "KOR": ["KOR"]}
ALARM = "the broker may be withholding messages"
LABEL = parse_label("NATO SECRET // REL TO KOR")


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = make_pkis(tmp_path_factory.mktemp("nations"), NATIONS)
    # What a compromised KOR could mint with its own CA: a partner named NATO.
    issue_partner(out["KOR"], "NATO", now_ms())
    return out


@pytest.fixture
async def pair(pkis: dict[str, Path], tmp_path: Path) -> AsyncIterator[dict[str, Nation]]:
    """NATO and KOR, partners admitted with their keys registered, linked both ways, and
    each broker's link up with the peer's partners learned."""
    nations = federate(tmp_path, pkis, [("NATO", "KOR")])
    try:
        await start_all(nations)
        await admit_and_link(nations["NATO"], nations["KOR"], NATIONS, register_keys=True)
        async with asyncio.timeout(20):
            for n in nations.values():
                while not await learned(n):  # noqa: ASYNC110 - another process
                    await asyncio.sleep(0.1)
        yield nations
    finally:
        stop_all(nations)


async def learned(n: Nation) -> bool:
    async with n.operator() as op:
        return all(p.connected and p.partners_learned for p in (await op.peers()).peers)


def kor_node(kor: Nation, tmp: Path, target: str = "") -> Path:
    """KOR's node config: its broker (or target), its identity, its own copy of KOR's
    trust file."""
    d = tmp / "kor-node"
    d.mkdir()
    trust = d / "federation.toml"
    trust.write_text(kor.trust_file.read_text())
    for ca in kor.trust_file.parent.glob("*-ca.crt"):
        (d / ca.name).write_bytes(ca.read_bytes())
    cfg = d / "node.toml"
    cfg.write_text(
        f'broker = "{target or kor.target}"\n'
        f'identity = "{kor.pki / "partners" / "KOR"}"\n'
        'inbox = "inbox.db"\n'
        'topics = ["intel.>"]\n'
        '\n[federation]\nfile = "federation.toml"\n'
    )
    return cfg


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as c:
        return list(c.execute(sql))


async def eventually_true(check: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - a file another process writes
            await asyncio.sleep(0.2)


async def test_a_withheld_forward_raises_the_recipients_gap_alarm(
    pair: dict[str, Nation], tmp_path: Path
) -> None:
    nato, kor = pair["NATO"], pair["KOR"]
    sender = nato.creds("NATO")
    epochs = SenderEpochs("NATO")
    envs = [
        seal(sender, [recipient(kor.creds("KOR"))], LABEL, sequence=s, epochs=epochs)
        for s in (1, 2, 3)
    ]
    cfg = kor_node(kor, tmp_path)
    log = tmp_path / "kor-node.log"
    proc = await start_daemon(cfg, log)
    db = cfg.parent / "inbox.db"
    try:
        await eventually_true(lambda: log.exists() and "caught up" in log.read_text(), 30)
        # The compromised NATO broker forwards 1 and 3; 2 never crosses.
        cert = sender.signing_cert_der
        got = await forward_as(nato.pki, "NATO", kor, [item(envs[0], cert), item(envs[2], cert)])
        assert [federation_pb2.CustodyReceipt.FromString(r.receipt).outcome for r in got] == [
            federation_pb2.RECEIPT_STORED,
            federation_pb2.RECEIPT_STORED,
        ]
        # Both are opened and stored: the node verified NATO's sender against NATO's CA.
        await eventually_true(
            lambda: db.exists() and rows(db, "SELECT COUNT(*) FROM inbox") == [(2,)], 20
        )
        assert rows(db, "SELECT sender, recipient_sequence FROM inbox ORDER BY 2") == [
            ("NATO", 1),
            ("NATO", 3),
        ]
        # After the grace for out-of-order delivery, the hole is an alarm naming NATO's 2.
        await eventually_true(lambda: ALARM in log.read_text(), GAP_GRACE_S + 20)
    finally:
        assert await stop(proc) == 0
    [alarm] = [line for line in log.read_text().splitlines() if ALARM in line]
    assert "NATO" in alarm
    assert rows(db, "SELECT sender, first_seq, last_seq FROM gaps") == [("NATO", 2, 2)]
    assert rows(db, "SELECT COUNT(*) FROM quarantine") == [(0,)]


class RogueExchange(exchange_pb2_grpc.ExchangeServicer):
    """KOR's Exchange as a compromised KOR broker serves it to its own node: keys and the
    directory passed through from the real broker (edit() may change the directory),
    then the given deliveries, caught up, and the stream held open."""

    def __init__(
        self,
        real: Any,  # the real broker's Exchange stub (async)
        deliveries: Sequence[exchange_pb2.Delivery],
        edit: Callable[[directory_pb2.DirectoryEntry], None] = lambda e: None,
    ) -> None:
        self.real = real
        self.deliveries = deliveries
        self.edit = edit
        self.acked: list[int] = []

    async def Publish(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[exchange_pb2.PublishResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")
        yield exchange_pb2.PublishResponse()  # never: abort raises

    async def Recipients(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")

    async def RegisterKeys(self, request: Any, context: Any) -> Any:
        return await self.real.RegisterKeys(request)

    async def Directory(self, request: Any, context: Any) -> Any:
        resp = await self.real.Directory(request)
        for e in resp.entries:
            self.edit(e)
        return resp

    async def Subscribe(self, request_iterator: Any, context: Any) -> Any:
        reqs = aiter(request_iterator)
        await anext(reqs)  # the open
        yield exchange_pb2.SubscribeResponse(status=exchange_pb2.SubscribeStatus(caught_up=True))
        yield exchange_pb2.SubscribeResponse(
            batch=exchange_pb2.DeliveryBatch(deliveries=self.deliveries)
        )
        async for req in reqs:
            self.acked.extend(req.ack.offsets)


async def serve_rogue_exchange(kor: Nation, servicer: RogueExchange) -> tuple[grpc.aio.Server, str]:
    creds = load_broker(kor.pki)
    server = grpc.aio.server()
    exchange_pb2_grpc.add_ExchangeServicer_to_server(servicer, server)
    tls = grpc.ssl_server_credentials(
        [(creds.tls_key_pem, creds.tls_cert_pem)],
        root_certificates=creds.ca_pem,
        require_client_auth=True,
    )
    target = f"127.0.0.1:{free_port()}"
    server.add_secure_port(target, tls)
    await server.start()
    return server, target


def delivered(offset: int, env: envelope_pb2.Envelope, label: str) -> exchange_pb2.Delivery:
    return exchange_pb2.Delivery(
        offset=offset,
        envelope=env,
        label=label_to_proto(parse_label(label)),
        topic="intel.report",
        precedence=label_pb2.ROUTINE,
    )


async def run_node_against(
    kor: Nation, tmp: Path, rogue: RogueExchange, n: int
) -> tuple[Path, Path]:
    """KOR's node against the rogue broker until it acknowledged n deliveries."""
    server, target = await serve_rogue_exchange(kor, rogue)
    cfg = kor_node(kor, tmp, target)
    log = tmp / "kor-node.log"
    proc = await start_daemon(cfg, log)
    try:
        await eventually_true(lambda: len(rogue.acked) >= n, 30)
    finally:
        assert await stop(proc) == 0
        await server.stop(None)
    return cfg.parent / "inbox.db", log


def quarantined(db: Path) -> list[tuple[object, ...]]:
    return rows(db, "SELECT sender, reason FROM quarantine ORDER BY broker_offset")


async def test_a_relabelled_or_resigned_envelope_is_refused_by_the_recipients_node(
    pair: dict[str, Nation], tmp_path: Path
) -> None:
    nato, kor = pair["NATO"], pair["KOR"]
    sender, me = nato.creds("NATO"), kor.creds("KOR")
    epochs = SenderEpochs("NATO")
    honest, original = (
        seal(
            sender,
            [recipient(me)],
            parse_label(f"NATO SECRET // REL TO {rel}"),
            sequence=s,
            epochs=epochs,
        )
        for s, rel in ((1, "KOR"), (2, "USA"))
    )

    def relabel(core: envelope_pb2.Header) -> None:
        core.label.CopyFrom(label_to_proto(LABEL))

    # REL TO USA made REL TO KOR; then made consistent again and signed by another key
    # (the "NATO" KOR's CA certified, which a compromised KOR broker could hold).
    relabelled = v2_tools.edit_core(original, relabel)
    other = load_partner(kor.pki / "partners" / "NATO")  # "NATO" under KOR's CA
    assert other.hybrid_signing_key is not None
    [resigned] = v2_tools.rebatch([relabelled], other.hybrid_signing_key)
    async with kor.partner("KOR") as me_client:
        rogue = RogueExchange(
            me_client.stub,
            [
                delivered(1, honest, "NATO SECRET // REL TO KOR"),
                delivered(2, relabelled, "NATO SECRET // REL TO KOR"),
                delivered(3, resigned, "NATO SECRET // REL TO KOR"),
            ],
        )
        db, _ = await run_node_against(kor, tmp_path, rogue, 3)
    # The honest one is stored; the relabelled and re-signed ones are quarantined.
    assert rows(db, "SELECT sender, recipient_sequence FROM inbox") == [("NATO", 1)]
    assert quarantined(db) == [("NATO", "bad_path"), ("NATO", "bad_signature")]


async def test_the_recipients_node_refuses_a_foreign_sender_its_broker_vouches_for(
    pair: dict[str, Nation], tmp_path: Path
) -> None:
    """KOR's broker serves a directory entry for NATO certified by KOR's own CA: the node
    checks NATO's entries against NATO's CA from its own trust file, so the entry does
    not verify and the message signed under it is quarantined."""
    kor = pair["KOR"]
    rogue_nato = load_partner(kor.pki / "partners" / "NATO")
    env = seal(rogue_nato, [recipient(kor.creds("KOR"))], LABEL)

    def swap(e: directory_pb2.DirectoryEntry) -> None:
        if e.partner == "NATO":
            e.signing_cert = rogue_nato.signing_cert_der
            del e.previous_signing_certs[:]
            e.key_bundle.CopyFrom(rogue_nato.bundle)

    async with kor.partner("KOR") as me_client:
        rogue = RogueExchange(
            me_client.stub, [delivered(1, env, "NATO SECRET // REL TO KOR")], swap
        )
        db, _ = await run_node_against(kor, tmp_path, rogue, 1)
    assert rows(db, "SELECT COUNT(*) FROM inbox") == [(0,)]
    assert quarantined(db) == [("NATO", "unknown_sender")]
