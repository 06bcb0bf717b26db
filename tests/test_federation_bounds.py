"""What a hostile but admitted peer nation can send is bounded: items per Forward request,
certificate bytes, Forward streams and Directory calls per gateway, its rate (its stream
is slowed), the audit entries its refusals cost (summarised past the threshold), and the
signature work a repeated certificate or root costs. Each bound refuses with its status,
is audited, and leaves a local partner's traffic flowing. And a link whose peer answers
"not now" (its store full) resends rather than drops. Real broker processes throughout.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from coalition.labels import parse_label
from coalition.pki import gateway_dir, load_gateway
from coalition.v1 import envelope_pb2, exchange_pb2, federation_pb2, federation_pb2_grpc
from tests.federation_rig import (
    Nation,
    admit_and_link,
    admit_partners,
    federate,
    forward_as,
    item,
    link,
    make_pkis,
    recipient,
    seal,
    start_all,
    stop_all,
)
from tests.test_broker_faults import free_port
from tests.test_federation import audit, deliveries, eventually_audited

NATIONS = {"NATO": ["NATO", "NATO-HQ"], "KOR": ["KOR"]}
LABEL = parse_label("NATO SECRET // REL TO KOR, NATO")


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pkis(tmp_path_factory.mktemp("nations"), NATIONS)


@asynccontextmanager
async def nato_admitting_kor(
    pkis: dict[str, Path], tmp: Path, limits: str = "", metrics: bool = False
) -> AsyncIterator[tuple[Nation, Nation, int]]:
    """NATO admitting KOR's gateway (KOR does not admit NATO's, so no link of KOR's
    broker calls NATO: each test plays KOR's gateway itself); NATO's [limits] extra."""
    port = free_port() if metrics else 0
    extra = f"[limits]\n{limits}\n" + (f'[metrics]\nlisten = "127.0.0.1:{port}"\n' * metrics)
    nations = federate(tmp, pkis, [("NATO", "KOR")], extra={"NATO": extra})
    try:
        await start_all(nations)
        nato, kor = nations["NATO"], nations["KOR"]
        await admit_partners(nato, NATIONS["NATO"])
        await link(nato, kor)
        yield nato, kor, port
    finally:
        stop_all(nations)


Stream = tuple[
    asyncio.Queue[federation_pb2.ForwardRequest], AsyncIterator[federation_pb2.ForwardResponse]
]


@asynccontextmanager
async def forward_stream(kor: Nation, to: Nation) -> AsyncIterator[Stream]:
    """One Forward stream as KOR's gateway: requests are put on the queue."""
    creds = load_gateway(gateway_dir(kor.pki, "KOR"))
    tls = grpc.ssl_channel_credentials(
        (to.pki / "ca" / "ca.crt").read_bytes(), creds.tls_key_pem, creds.tls_cert_pem
    )
    out: asyncio.Queue[federation_pb2.ForwardRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[federation_pb2.ForwardRequest]:
        while True:
            yield await out.get()

    async with grpc.aio.secure_channel(to.target, tls) as channel:
        call = federation_pb2_grpc.FederationStub(channel).Forward(requests())
        try:
            yield out, aiter(call)
        finally:
            call.cancel()


def kor_items(kor: Nation, nato: Nation, n: int) -> list[federation_pb2.ForwardedEnvelope]:
    """n valid KOR messages for NATO's partner, as KOR's broker would forward them."""
    creds = kor.creds("KOR")
    to = [recipient(nato.creds("NATO"))]
    return [item(seal(creds, to, LABEL, sequence=i + 1), creds.signing_cert_der) for i in range(n)]


def outcomes(receipts: list[federation_pb2.SignedReceipt]) -> list[tuple[str, str, int]]:
    out = []
    for r in receipts:
        c = federation_pb2.CustodyReceipt.FromString(r.receipt)
        out.append((federation_pb2.ReceiptOutcome.Name(c.outcome), c.reason_code, c.audit_seq))
    return out


async def local_traffic_flows(nato: Nation) -> None:
    """A NATO partner publishes and another NATO partner receives it."""
    env = seal(nato.creds("NATO"), [recipient(nato.creds("NATO-HQ"))], LABEL)
    async with nato.partner("NATO") as pub, nato.partner("NATO-HQ") as rcv:
        [res] = await pub.publish([env])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        assert len(await deliveries(rcv, 1)) == 1


def scrape(port: int) -> dict[str, float]:
    """NATO's federation metrics for peer KOR, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("coalition_federation_") and 'peer="KOR"' in line:
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            out[name.removeprefix("coalition_federation_")] = float(value)
    return out


async def test_a_forward_request_of_too_many_items_is_refused_whole_and_audited(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    async with nato_admitting_kor(pkis, tmp_path) as (nato, kor, _):
        [one] = kor_items(kor, nato, 1)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await forward_as(kor.pki, "KOR", nato, [one] * 257)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 256 envelopes" in (exc.value.details() or "")
        [entry] = await audit(nato, "federation.forward.refused")
        assert (entry.actor, entry.decision) == ("gateway:KOR", "too_many_items")
        # A certificate past its bound is refused per envelope, before it is parsed.
        big = federation_pb2.ForwardedEnvelope(envelope=one.envelope, signing_cert=b"x" * 17000)
        got = await forward_as(kor.pki, "KOR", nato, [big, one])
        assert [o[:2] for o in outcomes(got)] == [
            ("RECEIPT_REFUSED", "oversized"),
            ("RECEIPT_STORED", ""),
        ]
        # A request past max_request_bytes is refused by grpc before it is read.
        huge = federation_pb2.ForwardedEnvelope(envelope=b"e" * (1 << 20), signing_cert=b"c")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await forward_as(kor.pki, "KOR", nato, [huge] * 5)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await local_traffic_flows(nato)


async def test_forward_streams_per_gateway_are_bounded(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    async with nato_admitting_kor(pkis, tmp_path, "max_forward_streams = 2") as (nato, kor, _):
        async with forward_stream(kor, nato) as (q1, r1), forward_stream(kor, nato) as (q2, r2):
            for q, r in ((q1, r1), (q2, r2)):  # each stream is open at NATO once answered
                q.put_nowait(federation_pb2.ForwardRequest(batch_id=1))
                assert (await anext(r)).batch_id == 1
            # The third is refused as it opens, before it is read: the test sends nothing
            # on it, since a request racing the refusal can fail the call on the client's
            # side (INTERNAL) before the broker's status arrives.
            async with forward_stream(kor, nato) as (_, r3):
                with pytest.raises(grpc.aio.AioRpcError) as exc:  # not left waiting
                    await asyncio.wait_for(anext(r3), 30)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit is 2" in (exc.value.details() or "")
            # The open streams still carry envelopes, and NATO's own partners publish.
            q1.put_nowait(federation_pb2.ForwardRequest(batch_id=2, items=kor_items(kor, nato, 1)))
            assert [o[0] for o in outcomes(list((await anext(r1)).receipts))] == ["RECEIPT_STORED"]
            await local_traffic_flows(nato)
        [entry] = await audit(nato, "federation.forward.refused")
        assert entry.decision == "too_many_streams"
        # Once the streams have ended, a new one is taken.
        got = await forward_as(kor.pki, "KOR", nato, kor_items(kor, nato, 1))
        assert [o[0] for o in outcomes(got)] == ["RECEIPT_STORED"]


async def test_directory_calls_per_gateway_are_rate_bounded(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    limits = "max_federation_directory_per_min = 3"
    async with nato_admitting_kor(pkis, tmp_path, limits) as (nato, kor, _):
        creds = load_gateway(gateway_dir(kor.pki, "KOR"))
        tls = grpc.ssl_channel_credentials(
            (nato.pki / "ca" / "ca.crt").read_bytes(), creds.tls_key_pem, creds.tls_cert_pem
        )
        async with grpc.aio.secure_channel(nato.target, tls) as channel:
            stub = federation_pb2_grpc.FederationStub(channel)
            for _ in range(3):
                await stub.Directory(federation_pb2.FederationDirectoryRequest())
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Directory(federation_pb2.FederationDirectoryRequest())
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the most allowed (3)" in (exc.value.details() or "")
        [entry] = await audit(nato, "federation.directory.refused")
        assert (entry.actor, entry.decision) == ("gateway:KOR", "rate_limited")
        async with nato.partner("NATO") as p:  # NATO's partners' directory is its own
            assert "NATO-HQ" in (await p.directory()).peers
        await local_traffic_flows(nato)


async def test_a_gateways_refusals_past_the_threshold_are_summarised(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    limits = "refusal_audit_threshold = 3\nrefusal_audit_interval_ms = 1000"
    async with nato_admitting_kor(pkis, tmp_path, limits) as (nato, kor, _):
        [one] = kor_items(kor, nato, 1)
        junk = federation_pb2.ForwardedEnvelope(envelope=one.envelope, signing_cert=b"junk")
        got = outcomes(await forward_as(kor.pki, "KOR", nato, [junk] * 10))
        assert {o[:2] for o in got} == {("RECEIPT_REFUSED", "bad_signing_cert")}
        # The first three are entries of their own (their receipts name them), the
        # other seven are counted into one summary entry.
        assert [o[2] != 0 for o in got] == [True] * 3 + [False] * 7
        assert len(await audit(nato, "federation.refused")) == 3
        [summary] = await eventually_audited(nato, "federation.refused.summary", 1)
        assert summary.decision == "bad_signing_cert"
        assert summary.actor == "gateway:KOR"
        assert '"count":7' in summary.detail_json.replace(" ", "")
        await local_traffic_flows(nato)


async def test_a_repeated_certificate_or_root_costs_one_check(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    async with nato_admitting_kor(pkis, tmp_path, metrics=True) as (nato, kor, port):
        [one] = kor_items(kor, nato, 1)
        env = envelope_pb2.Envelope.FromString(one.envelope)
        sig = bytearray(env.batch.root_signature.ml_dsa_65)
        sig[0] ^= 1  # Ed25519 holds, ML-DSA-65 does not: the costly half fails
        env.batch.root_signature.ml_dsa_65 = bytes(sig)
        bad = federation_pb2.ForwardedEnvelope(
            envelope=env.SerializeToString(), signing_cert=one.signing_cert
        )
        got = outcomes(await forward_as(kor.pki, "KOR", nato, [bad] * 5))
        assert {o[:2] for o in got} == {("RECEIPT_REFUSED", "bad_signature")}
        got = outcomes(await forward_as(kor.pki, "KOR", nato, [bad] * 5 + [one]))
        assert [o[0] for o in got] == ["RECEIPT_REFUSED"] * 5 + ["RECEIPT_STORED"]
        m = await asyncio.to_thread(scrape, port)
        # One certificate check for eleven envelopes under one certificate; one check
        # of the bad root for ten copies, one of the good one.
        assert m["cert_checks_total"] == 1
        assert m["root_checks_total"] == 2
        assert m["refused_total"] == 10


async def test_a_gateway_over_its_rate_is_slowed_while_local_partners_are_not(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    limits = "default_forward_rate_per_s = 1"
    async with nato_admitting_kor(pkis, tmp_path, limits, metrics=True) as (nato, kor, port):
        items = kor_items(kor, nato, 6)
        async with forward_stream(kor, nato) as (q, r):
            # The first request takes the bucket's one token and goes 4 into debt.
            q.put_nowait(federation_pb2.ForwardRequest(batch_id=1, items=items[:5]))
            first = outcomes(list((await anext(r)).receipts))
            assert [o[0] for o in first] == ["RECEIPT_STORED"] * 5
            q.put_nowait(federation_pb2.ForwardRequest(batch_id=2, items=items[5:]))
            second = asyncio.ensure_future(anext(r))
            # The gateway's stream waits for its rate; NATO's own partners do not.
            env = seal(nato.creds("NATO"), [recipient(nato.creds("NATO-HQ"))], LABEL)
            async with nato.partner("NATO") as pub:
                [res] = await pub.publish([env])
            assert res.outcome == exchange_pb2.ACCEPTED, res
            assert not second.done()
            resp = await second
            assert [o[0] for o in outcomes(list(resp.receipts))] == ["RECEIPT_STORED"]
        m = await asyncio.to_thread(scrape, port)
        assert m["slowed_total"] == 1
        assert m["refused_total"] == 0
        assert m["received_total"] == 6


async def test_a_link_resends_what_a_full_peer_answers_not_now(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    payload = b"p" * 2000
    extra: Mapping[str, str] = {"NATO": "[limits]\nsender_store_bytes = 10000\n"}
    nations = federate(tmp_path, pkis, [("NATO", "KOR")], extra=extra)
    nato, kor = nations["NATO"], nations["KOR"]
    try:
        await start_all(nations)
        await admit_and_link(nato, kor, NATIONS)
        to = [recipient(nato.creds("NATO"))]
        creds = kor.creds("KOR")
        envs = [seal(creds, to, LABEL, sequence=i + 1, payload=payload) for i in range(2)]
        async with kor.partner("KOR") as pub:
            for env in envs:  # KOR's share of NATO's store holds one of them
                [res] = await pub.publish([env])
                assert res.outcome == exchange_pb2.ACCEPTED, res
        refused = await eventually_audited(nato, "federation.refused", 2)
        assert {e.decision for e in refused} == {"quota_exceeded"}
        # KOR has recorded no final refusal: the message is held, not dropped.
        receipts = await audit(kor, "federation.receipt")
        assert [e.decision for e in receipts] == ["stored"]
        # NATO's operators give KOR's senders more room; the held message crosses.
        nato.broker.signal(signal.SIGTERM)
        assert await nato.broker.wait_exit() == 0
        cfg = nato.trust_file.parent / "broker.toml"
        cfg.write_text(cfg.read_text().replace("10000", "1000000"))
        await nato.broker.start()
        async with nato.partner("NATO") as rcv:
            got = await deliveries(rcv, 2, timeout=30)
        assert sorted(d.offset for d in got) == sorted({d.offset for d in got})
        assert len(got) == 2
        await eventually_audited(kor, "federation.receipt", 2)
        assert [e.decision for e in await audit(kor, "federation.receipt")] == ["stored"] * 2
    finally:
        stop_all(nations)


async def test_partners_list_marks_a_peers_gateway(pkis: dict[str, Path], tmp_path: Path) -> None:
    import json

    from tests.test_federation_ops import admin

    async with nato_admitting_kor(pkis, tmp_path) as (nato, _, _):
        code, out, err = await admin(nato, "--json", "partners", "list")
        assert code == 0, err
        kinds = {p["partner"]: p["kind"] for p in json.loads(out)["partners"]}
        assert kinds == {"NATO": "partner", "NATO-HQ": "partner", "KOR": "gateway"}
        code, out, err = await admin(nato, "partners", "list")
        assert code == 0, err
        rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
        assert rows == {"NATO": "partner", "NATO-HQ": "partner", "KOR": "gateway"}
        from clients.console import views  # the console's partners page, the same

        async with nato.operator() as op:
            listed = {r.code: r.kind for r in await views.partners(op)}
        assert listed == {"NATO": "partner", "NATO-HQ": "partner", "KOR": "gateway"}


async def test_a_link_splits_a_backlog_larger_than_a_request_may_carry(
    pkis: dict[str, Path], tmp_path: Path
) -> None:
    extra: Mapping[str, str] = {"KOR": "[limits]\nsubscriber_window = 300\n"}
    nations = federate(tmp_path, pkis, [("NATO", "KOR")], extra=extra)
    nato, kor = nations["NATO"], nations["KOR"]
    try:
        await start_all(nations)
        await admit_and_link(nato, kor, NATIONS)
        # NATO is down while KOR's partner publishes: the link's backlog is one delivery
        # batch of 300 (KOR's window), more than one Forward request may carry.
        nato.broker.signal(signal.SIGTERM)
        assert await nato.broker.wait_exit() == 0
        to = [recipient(nato.creds("NATO"))]
        creds = kor.creds("KOR")
        async with kor.partner("KOR") as pub:
            for start in range(0, 300, 50):
                envs = [seal(creds, to, LABEL, sequence=start + i + 1) for i in range(50)]
                results = await pub.publish(envs)
                assert {r.outcome for r in results} == {exchange_pb2.ACCEPTED}
        await nato.broker.start()
        received = await eventually_audited(nato, "federation.received", 300)
        assert len(received) == 300
        assert await audit(nato, "federation.forward.refused") == []
    finally:
        stop_all(nations)
