"""The audit log on JetStream: one hash chain written by several brokers at once, outbox
rows chained exactly once whichever broker drains them, a stream that refuses deletes
and purges, and exports that verify offline with the CA alone.

Real parts: a three-node nats-server cluster (the session's), real outboxes (SQLite
message stores), certificates issued by the test PKI's CA. Each broker is a
JetStreamAuditLog on its own NATS connection, as in two broker processes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError

from broker.audit import AuditError, AuditItem
from broker.audit.drainer import Drainer, _entries
from broker.audit.items import encode, entry_fields
from broker.jetstream.audit import JetStreamAuditLog
from broker.jetstream.audit_blocks import Block, SignedCheckpoint
from broker.jetstream.audit_blocks import encode as encode_block
from broker.jetstream.audit_reads import NEWEST_BLOCKS
from broker.jetstream.connect import ClusterSettings, connect
from broker.store import SqliteMessageStore
from clients.admin import cli as admin_cli
from clients.admin.render import to_json
from coalition.audit_chain import entry_hash, sign_checkpoint
from coalition.identity import Identity
from coalition.pki import issue_signing_cert, load_broker
from coalition.pki.load import load_ca
from coalition.v1 import audit_pb2
from tests.helpers import now_ms

pytestmark = pytest.mark.asyncio

EXIT_AUDIT_BROKEN = 5
T0 = now_ms()  # entries' times: the audit certificates must be valid at their checkpoints


@dataclass
class Broker:
    """What one broker brings to the audit log: its connection, key and certificate."""

    nc: Client
    key: Ed25519PrivateKey
    cert: bytes  # DER
    log: JetStreamAuditLog


@pytest.fixture
async def brokers(
    pki: Path, cluster_settings: ClusterSettings
) -> AsyncIterator[tuple[Broker, Broker]]:
    """Two brokers of one deployment, each with its own CA-issued audit key."""
    creds = load_broker(pki)
    assert creds.audit_cert is not None
    other = Ed25519PrivateKey.generate()
    other_cert = issue_signing_cert(
        load_ca(pki), Identity.broker("broker-b"), other.public_key(), now_ms(), valid_days=30
    )
    pairs = [(creds.audit_key, creds.audit_cert), (other, other_cert)]
    out = []
    for key, cert in pairs:
        nc = await connect(cluster_settings)
        der = cert.public_bytes(serialization.Encoding.DER)
        log = await JetStreamAuditLog.open(
            nc, cluster_settings, key, checkpoint_every=7, certificate=der, ca=creds.ca_cert
        )
        out.append(Broker(nc, key, der, log))
    try:
        yield out[0], out[1]
    finally:
        for b in out:
            await b.log.close()  # a no-op if the test closed it
            await b.nc.close()


async def _outbox(tmp_path: Path, n: int) -> SqliteMessageStore:
    """A real message store whose outbox holds n audit records m0..m{n-1}."""
    store = await SqliteMessageStore.open(tmp_path / "messages.db", max_bytes=1 << 30)
    for i in range(n):
        item = AuditItem("publish.accepted", "KOR", "KOR", f"m{i}", "allow", {"i": i})
        await store.record([encode(item)], T0 + i)
    return store


async def test_the_stream_refuses_deleting_and_purging_entries(
    brokers: tuple[Broker, Broker], cluster_settings: ClusterSettings
) -> None:
    a, _ = brokers
    for i in range(3):
        await a.log.record(kind="deliver", actor="broker", message_id=f"m{i}", now_ms=i)
    js = a.nc.jetstream()
    name = cluster_settings.name("AUDIT")
    info = await js.stream_info(name)
    assert (info.config.deny_delete, info.config.deny_purge) == (True, True)
    assert info.config.num_replicas == 3 and info.config.storage == StorageType.FILE
    with pytest.raises(APIError) as deleted:
        await js.delete_msg(name, 1)
    assert deleted.value.description == "message delete not permitted"
    with pytest.raises(APIError) as purged:
        await js.purge_stream(name)
    assert purged.value.description == "stream purge not permitted"
    assert await a.log.count() == 3
    assert (await a.log.verify(a.key.public_key())).ok


async def test_a_stream_that_allows_deletes_is_not_used(cluster_settings: ClusterSettings) -> None:
    nc = await connect(cluster_settings)
    try:
        await nc.jetstream().add_stream(
            StreamConfig(
                name=cluster_settings.name("AUDIT"),
                subjects=[cluster_settings.subject("audit", ">")],
                num_replicas=3,
                storage=StorageType.FILE,
            )
        )
        with pytest.raises(AuditError, match="allows deleting or purging"):
            await JetStreamAuditLog.open(nc, cluster_settings, Ed25519PrivateKey.generate())
    finally:
        await nc.close()


async def test_two_brokers_recording_and_draining_at_once_make_one_chain(
    brokers: tuple[Broker, Broker], tmp_path: Path
) -> None:
    a, b = brokers
    store = await _outbox(tmp_path, 300)
    drainers = [Drainer(a.log), Drainer(b.log)]
    for d in drainers:
        d.add_source("messages", store)
    try:

        async def records(x: Broker, tag: str) -> list[int]:
            seqs = []
            for i in range(40):
                seqs += await asyncio.gather(
                    *(
                        x.log.record(
                            kind="deliver", actor=tag, message_id=f"{tag}{i}.{j}", now_ms=T0 + i
                        )
                        for j in range(3)
                    )
                )
            return seqs

        async def drain(d: Drainer) -> int:
            total = 0
            for _ in range(10):
                total += await d.drain()
                await asyncio.sleep(0)
            return total

        seqs_a, seqs_b, *_ = await asyncio.gather(
            records(a, "A"), records(b, "B"), drain(drainers[0]), drain(drainers[1])
        )
        for d in drainers:  # what is left after both raced
            await d.drain()
    finally:
        await store.close()
    # Every record() got its own place in one gap-free chain.
    assert sorted(seqs_a + seqs_b) == sorted(set(seqs_a + seqs_b))
    entries = await a.log.query()
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    ids = [e.message_id for e in entries]
    # Each outbox row exactly once, in outbox order; each record exactly once.
    drained = [m for m in ids if m.startswith("m")]
    assert drained == [f"m{i}" for i in range(300)]
    assert sorted(m for m in ids if not m.startswith("m")) == sorted(
        f"{t}{i}.{j}" for t in "AB" for i in range(40) for j in range(3)
    )
    assert await a.log.drained_through("messages") == await b.log.drained_through("messages")
    # Both brokers see the same chain, and it verifies under either broker's key (the
    # other's checkpoints are trusted through the CA).
    for x in (a, b):
        result = await x.log.verify(x.key.public_key())
        assert result.ok, result
        assert result.entries == 300 + 240 and result.checkpoints > 0
        assert sorted(await x.log.signer_certificates()) == sorted([a.cert, b.cert])
        assert await x.log.count() == 540
    assert {e.actor for e in entries} >= {"A", "B"}
    assert a.log.commits + b.log.commits < 540 / 4  # records shared blocks (group commit)


async def test_a_stale_drainer_appends_nothing_twice(
    brokers: tuple[Broker, Broker], tmp_path: Path
) -> None:
    a, b = brokers
    store = await _outbox(tmp_path, 7)
    try:
        rows = _entries("messages", await store.read_outbox(0, 100))
    finally:
        await store.close()
    # b read the head at open; a drains the first five rows since.
    assert await a.log.append_outbox("messages", rows[:5]) == 5
    # b's view is stale: its append is refused by the stream, it re-reads the marks
    # and finds those rows in the chain.
    before = b.log.commits
    assert await b.log.append_outbox("messages", rows[:5]) == 5
    assert b.log.commits == before
    assert await b.log.append_outbox("messages", rows) == 7
    assert await a.log.append_outbox("messages", rows) == 7
    entries = await a.log.query()
    assert [e.message_id for e in entries] == [f"m{i}" for i in range(7)]
    assert [e.time_ms for e in entries] == [T0 + i for i in range(7)]  # the rows' times
    assert (await b.log.verify(b.key.public_key())).ok


async def test_marks_and_head_survive_a_reopen(
    brokers: tuple[Broker, Broker], cluster_settings: ClusterSettings, tmp_path: Path
) -> None:
    a, _ = brokers
    store = await _outbox(tmp_path, 4)
    try:
        rows = _entries("messages", await store.read_outbox(0, 100))
    finally:
        await store.close()
    await a.log.append_outbox("messages", rows[:3])
    await a.log.record(kind="deliver", actor="broker", now_ms=5)
    await a.log.close()
    nc = await connect(cluster_settings)
    try:
        again = await JetStreamAuditLog.open(nc, cluster_settings, a.key, checkpoint_every=7)
        assert await again.drained_through("messages") == 3
        assert await again.drained_through("registry") == 0
        assert await again.append_outbox("messages", rows) == 4
        assert await again.count() == 5
        checkpoints = [r async for r in again.export() if isinstance(r, audit_pb2.AuditCheckpoint)]
        assert [c.seq for c in checkpoints] == [4]  # a's close signed its head
        await again.close(now_ms=9)
        assert (await again.verify(a.key.public_key())).checkpoints == 2
    finally:
        await nc.close()


def _export_lines(records: list[Any], certs: list[bytes]) -> list[str]:
    """JSON lines as `coalition-admin audit export` writes them."""
    lines = []
    for r in records:
        kind = "entry" if isinstance(r, audit_pb2.AuditEntry) else "checkpoint"
        lines.append(json.dumps({"record": kind, **to_json(r)}))
    for der in certs:
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        lines.append(json.dumps({"record": "audit_certificate", "certificate_pem": pem.decode()}))
    return lines


async def _verify_file(
    capsys: pytest.CaptureFixture[str], pki: Path, path: Path
) -> tuple[int, Any]:
    argv = ["audit", "verify", "--file", str(path), "--ca", str(pki / "ca" / "ca.crt"), "--json"]
    code = await asyncio.to_thread(admin_cli.main, argv)
    out, _ = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None


async def test_a_cluster_export_verifies_offline_and_a_tampered_one_does_not(
    brokers: tuple[Broker, Broker],
    cluster_settings: ClusterSettings,
    pki: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = brokers
    for i in range(10):
        await a.log.record(kind="deliver", actor="A", message_id=f"a{i}", now_ms=now_ms())
        await b.log.record(kind="deliver", actor="B", message_id=f"b{i}", now_ms=now_ms())
    await b.log.close()
    await a.log.close()
    # A third broker (no key of its own in the chain yet) exports it.
    reader = await JetStreamAuditLog.open(a.nc, cluster_settings, Ed25519PrivateKey.generate())
    records = [r async for r in reader.export()]
    certs = await reader.signer_certificates()
    assert sorted(certs) == sorted([a.cert, b.cert])  # both keys signed checkpoints
    good = tmp_path / "export.jsonl"
    good.write_text("\n".join(_export_lines(records, certs)) + "\n")
    code, verdict = await _verify_file(capsys, pki, good)
    assert code == 0 and verdict["ok"] and verdict["entries"] == 20
    assert verdict["broker"] in ("broker, broker-b", "broker-b, broker")
    # One decision changed by hand: named by its seq.
    tampered = [json.loads(line) for line in good.read_text().splitlines()]
    target = next(r for r in tampered if r["record"] == "entry" and r["seq"] == 9)
    target["decision"] = "not_releasable"
    bad = tmp_path / "tampered.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in tampered))
    code, verdict = await _verify_file(capsys, pki, bad)
    assert code == EXIT_AUDIT_BROKEN
    assert (verdict["ok"], verdict["first_broken_seq"]) == (False, 9)
    # Without broker-b's certificate its checkpoints do not verify.
    one = [line for line in good.read_text().splitlines() if "audit_certificate" not in line]
    one += _export_lines([], [a.cert])
    only_a = tmp_path / "one-cert.jsonl"
    only_a.write_text("\n".join(one) + "\n")
    code, verdict = await _verify_file(capsys, pki, only_a)
    assert code == EXIT_AUDIT_BROKEN and verdict["problem"].endswith("bad signature")


async def test_blocks_forged_into_the_stream_are_named_by_verify(
    brokers: tuple[Broker, Broker], cluster_settings: ClusterSettings
) -> None:
    a, _ = brokers
    for i in range(5):
        await a.log.record(kind="deliver", actor="broker", message_id=f"m{i}", now_ms=i)
    js = a.nc.jetstream()
    subject = cluster_settings.subject("audit", "chain")
    [last] = await a.log.query(limit=1, tail=True)
    # Someone with publish rights on the stream appends a well-formed block whose
    # checkpoint is signed by a key no CA certified.
    forger = Ed25519PrivateKey.generate()
    fields = entry_fields(AuditItem("policy.change", "mallory", "GBR"), 99)
    fields.seq, fields.prev_hash = 6, last.hash
    fields.hash = entry_hash(last.hash, fields)
    cp = SignedCheckpoint(sign_checkpoint(6, fields.hash, 99, forger), b"")
    await js.publish(subject, encode_block(Block("forged", [fields], [cp], {}, 99)))
    result = await a.log.verify(a.key.public_key())
    assert (result.ok, result.first_broken_seq) == (False, 6)
    assert result.problem == "checkpoint at 6: bad signature"
    # A message that is not a block: the log writes on after it, verify names where.
    await js.publish(subject, b"not a block")
    assert await a.log.record(kind="deliver", actor="broker", now_ms=100) == 7
    assert await a.log.count() == 7


async def test_a_tail_query_reads_back_or_scans_as_needed(brokers: tuple[Broker, Broker]) -> None:
    a, _ = brokers
    for i in range(NEWEST_BLOCKS + 6):  # one block each
        partner = "GBR" if i < 2 else "USA"
        await a.log.record(kind="deliver", actor="broker", partner=partner, now_ms=T0 + i)
    newest_three = await a.log.query(limit=3, tail=True)  # from the last blocks
    assert [e.seq for e in newest_three] == [
        NEWEST_BLOCKS + 4,
        NEWEST_BLOCKS + 5,
        NEWEST_BLOCKS + 6,
    ]
    # Too far back to read block by block: the stream is scanned, the answer the same.
    assert [e.seq for e in await a.log.query(partner="GBR", limit=5, tail=True)] == [1, 2]
    assert [e.seq for e in await a.log.query(partner="GBR", limit=1, tail=True)] == [2]
    assert [e.seq for e in await a.log.query(partner="USA", limit=2)] == [3, 4]
