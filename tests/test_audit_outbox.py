"""The transactional outbox: every stored message has its publish.accepted audit entry,
and every registry change (admission, policy change, proposal, decision, key bundle) its
entry, exactly once, because the record commits with the decision (in the store's or
the registry's outbox) and the drainer moves it into the chain with a per-source mark
kept in the audit database.

Real brokers over mTLS, real SQLite files. An audit failure is injected at the audit
log's append_outbox (the disk-full tests make the whole log fail for real); a crash is a
real SIGKILL of a broker process, and the state "the audit commit happened, the outbox
delete did not" is made with the drainer's own calls on the files while no broker runs.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditError, AuditItem, AuditLog
from broker.audit.drainer import _entries
from broker.audit.items import OutboxEntry, decode
from broker.registry import Registry
from broker.server import Broker
from broker.store import SqliteMessageStore
from clients.sdk import PartnerClient
from coalition.labels import parse_label
from coalition.pki import load_broker
from coalition.policy import PartnerStatus
from coalition.v1 import audit_pb2, exchange_pb2
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, eventually, now_ms, operator, partner, policy, running_broker

LABEL = parse_label("NATO SECRET // REL TO USA")
TOPIC = "intel.ground"


async def _start(pki: Path, data: Path, *, admit_partners: bool) -> Broker:
    b = await running_broker(pki, data)
    if admit_partners:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "USA", b.port) as usa:  # a recipient with keys
            await usa.register_keys()
    return b


def _fail_drains(b: Broker, *, times: int, which: str = "messages") -> list[int]:
    """Make the next `times` appends of source's outbox rows fail; returns a counter."""
    inner = b.audit.append_outbox
    failed = [0]

    async def append_outbox(source: str, rows: Sequence[OutboxEntry]) -> int:
        if source == which and failed[0] < times:
            failed[0] += 1
            raise AuditError("injected: the audit log cannot be written")
        return await inner(source, rows)

    b.audit.append_outbox = append_outbox  # type: ignore[method-assign]
    return failed


async def _publish(kor: PartnerClient, body: bytes) -> exchange_pb2.PublishResult:
    s = await kor.seal(body, topic=TOPIC, label=LABEL, recipients=["USA"])
    [r] = await kor.publish([s.envelope])
    return r


async def _accepted(b: Broker) -> list[audit_pb2.AuditEntry]:
    return await b.audit.query(kind="publish.accepted")


async def _chain_ok(pki: Path, b: Broker) -> None:
    async with operator(pki, "op1", b.port) as op:
        assert (await op.verify_audit()).ok


def _detail(e: audit_pb2.AuditEntry) -> dict[str, Any]:
    detail: dict[str, Any] = json.loads(e.detail_json)
    return detail


async def test_an_acceptance_waits_in_the_outbox_while_the_audit_log_fails(
    pki: Path, tmp_path: Path
) -> None:
    b = await _start(pki, tmp_path / "broker", admit_partners=True)
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()
        failed = _fail_drains(b, times=1)
        before = now_ms()
        first = await _publish(kor, b"stored with its record; the drain fails")
        # Stored and acknowledged with its record in the same commit; the drain failed.
        assert first.outcome == exchange_pb2.ACCEPTED
        await eventually(lambda: failed == [1] and b.exchange.audit_failed, 10)
        [waiting] = await b.store.read_outbox(0, 10)
        assert decode(waiting.record).message_id == first.message_id
        # The next publish finds the log writable again: the record is drained first.
        second = await _publish(kor, b"after the log recovered")
        assert second.outcome == exchange_pb2.ACCEPTED
        entries = await _accepted(b)
        assert [e.message_id for e in entries] == [first.message_id, second.message_id]
        assert _detail(entries[0])["offset"] == first.offset
        [probe] = await b.audit.query(kind="audit.recovered")
        # Drained after the probe, but at the time of its own commit.
        assert probe.seq < entries[0].seq and before <= entries[0].time_ms <= probe.time_ms
        assert await b.exchange.books.drainer.undrained() == []
        await _chain_ok(pki, b)
    finally:
        await kor.close()
        await b.stop(grace=1)


async def test_shutdown_drains_and_signs_the_final_head(pki: Path, tmp_path: Path) -> None:
    data = tmp_path / "broker"
    b = await _start(pki, data, admit_partners=True)
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()
        for i in range(5):
            assert (await _publish(kor, b"%d" % i)).outcome == exchange_pb2.ACCEPTED
    finally:
        await kor.close()
        await b.stop(grace=1)
    with sqlite3.connect(data / "messages.db") as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
    with sqlite3.connect(data / "audit.db") as db:
        (accepted,) = db.execute(
            "SELECT COUNT(*) FROM entries WHERE kind = 'publish.accepted'"
        ).fetchone()
        head = db.execute("SELECT MAX(seq) FROM entries").fetchone()
        signed = db.execute("SELECT MAX(seq) FROM checkpoints").fetchone()
    assert accepted == 5 and head == signed


# -- crashes: real broker processes ------------------------------------------------------


@pytest.fixture
def slow_drainer(pki: Path, tmp_path: Path) -> Any:
    """A broker process whose drainer waits ten minutes between background drains, so
    what is published after its first drain stays in the outbox until a read."""
    toml = tmp_path / "broker.toml"
    toml.write_text("[limits]\naudit_drain_interval_ms = 600000\n")
    b = ConfiguredBroker(pki, tmp_path / "data", extra_args=["--config", str(toml)])
    try:
        yield b
    finally:
        b.cleanup()


def _outbox_records(db: Path, table: str = "outbox", column: str = "record") -> list[str]:
    with sqlite3.connect(db) as conn:
        return [str(r) for (r,) in conn.execute(f"SELECT {column} FROM {table} ORDER BY id")]


def _chained(data: Path, kind: str) -> list[str]:
    with sqlite3.connect(data / "audit.db") as conn:
        rows = conn.execute("SELECT message_id FROM entries WHERE kind = ? ORDER BY seq", (kind,))
        return [str(m) for (m,) in rows]


async def _append_first_row_only(pki: Path, data: Path, source: str) -> None:
    """The drainer's audit commit for the first waiting row of source, then a 'crash'
    before the outbox forgot it (nothing else is done to the files)."""
    audit = await AuditLog.open(data / "audit.db", load_broker(pki).audit_key)
    try:
        if source == "messages":
            store = await SqliteMessageStore.open(data / "messages.db", max_bytes=1 << 30)
            rows = await store.read_outbox(0, 1)
            await store.close()
        else:
            registry = Registry(data / "state.db")
            rows = (await registry.read_outbox(0, 1))[:1]
            registry.close()
        assert len(rows) == 1
        await audit.append_outbox(source, _entries(source, rows))
    finally:
        await audit.close()


async def test_acceptances_a_kill_left_in_the_outbox_are_chained_exactly_once(
    pki: Path, slow_drainer: ConfiguredBroker
) -> None:
    b = slow_drainer
    await b.start()
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    async with partner(pki, "USA", b.port) as usa, partner(pki, "KOR", b.port) as kor:
        await usa.register_keys()
        await kor.register_keys()
        results = [await _publish(kor, b"report %d" % i) for i in range(4)]
    assert all(r.outcome == exchange_pb2.ACCEPTED for r in results)
    ids = [r.message_id for r in results]
    b.signal(signal.SIGKILL)
    await b.wait_exit()
    # Killed between the store's commits and the drain: the records wait in the outbox.
    waiting = [decode(r).message_id for r in _outbox_records(b.data / "messages.db")]
    assert waiting and set(waiting) <= set(ids)
    assert set(_chained(b.data, "publish.accepted")) == set(ids) - set(waiting)
    # And one of them as if killed after the drainer's audit commit, before the delete.
    await _append_first_row_only(pki, b.data, "messages")
    assert _chained(b.data, "publish.accepted").count(waiting[0]) == 1
    await b.start()
    async with operator(pki, "op1", b.port) as op:
        entries = await op.audit(kind="publish.accepted")
        assert (await op.verify_audit()).ok
    assert sorted(e.message_id for e in entries) == sorted(ids)  # each exactly once
    for e in entries:
        offset = _detail(e)["offset"]
        assert offset == results[ids.index(e.message_id)].offset
    b.signal(signal.SIGTERM)
    assert await b.wait_exit() == 0
    assert _outbox_records(b.data / "messages.db") == []


def _change_entry(code: str) -> Callable[[int], AuditItem]:
    def entry(version: int) -> AuditItem:
        return AuditItem("policy.change", "op1", code, "", "allow", {"version": version})

    return entry


async def test_registry_changes_left_in_its_outbox_are_chained_exactly_once(
    pki: Path, tmp_path: Path
) -> None:
    data = tmp_path / "broker"
    b = await _start(pki, data, admit_partners=True)
    await admit(pki, b.port, policy("GBR"))
    await b.stop(grace=1)
    # Two policy changes committed with their records, and the broker died before
    # draining them (no broker runs while they are made); the first one's audit commit
    # happened, its delete did not.
    registry = Registry(data / "state.db")
    try:
        for code in ("GBR", "USA"):
            rec = registry.get(code)
            assert rec is not None
            suspended = dataclasses.replace(rec.policy, status=PartnerStatus.SUSPENDED)
            await registry.apply(
                suspended,
                changed_by="op1",
                approved_by="",
                reason="test",
                diff=["status"],
                now_ms=now_ms(),
                audit=_change_entry(code),
            )
    finally:
        registry.close()
    await _append_first_row_only(pki, data, "registry")
    b = await running_broker(pki, data)
    try:
        gbr = await b.audit.query(kind="policy.change", partner="GBR")
        usa = await b.audit.query(kind="policy.change", partner="USA")
        assert [_detail(e).get("version") for e in gbr].count(2) == 1
        assert [_detail(e).get("version") for e in usa].count(2) == 1
        refs = [_detail(e)["ref"] for e in gbr + usa]
        assert len(set(refs)) == len(refs)
        assert await b.registry.read_outbox(0, 10) == []
        await _chain_ok(pki, b)
    finally:
        await b.stop(grace=1)


# -- registry changes, in process ------------------------------------------------------


async def _suspend_gbr(pki: Path, b: Broker) -> None:
    async with operator(pki, "op1", b.port) as op:
        resp = await op.suspend("GBR", "test: a lowering change applies at once")
        assert resp.WhichOneof("result") == "applied"


async def _changes(b: Broker, partner: str = "GBR") -> list[audit_pb2.AuditEntry]:
    return await b.audit.query(kind="policy.change", partner=partner)


async def test_a_policy_change_the_audit_log_missed_is_drained_once_it_recovers(
    pki: Path, tmp_path: Path
) -> None:
    b = await _start(pki, tmp_path / "broker", admit_partners=True)
    await admit(pki, b.port, policy("GBR"))
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()
        before = len(await _changes(b))
        failed = _fail_drains(b, times=1, which="registry")
        # The change is durable and the operator is told so; its entry waits in the
        # registry's outbox, and publishes are refused until the log recovers.
        await _suspend_gbr(pki, b)
        assert failed == [1] and b.exchange.audit_failed
        [waiting] = await b.registry.read_outbox(0, 10)
        assert decode(waiting.record).kind == "policy.change"
        # The next publish finds the log writable again and drains it first.
        assert (await _publish(kor, b"after the log recovered")).outcome == exchange_pb2.ACCEPTED
        entries = await _changes(b)
        assert len(entries) == before + 1
        detail = _detail(entries[-1])
        assert detail["ref"] == f"registry:{waiting.id}" and detail["diff"]
        assert entries[-1].time_ms == waiting.time_ms  # the change's time, not the drain's
        assert await b.registry.read_outbox(0, 10) == []
        await _chain_ok(pki, b)
    finally:
        await kor.close()
        await b.stop(grace=1)


async def test_every_registry_change_is_audited_with_its_outbox_ref(
    pki: Path, tmp_path: Path
) -> None:
    b = await _start(pki, tmp_path / "broker", admit_partners=True)
    try:
        await admit(pki, b.port, policy("GBR"))  # proposal, approval, change, registration
        await _suspend_gbr(pki, b)
        kinds = {"partner.registered", "policy.proposed", "policy.approved", "policy.change"}
        entries = [e for e in await b.audit.query(partner="GBR") if e.kind in kinds]
        assert {e.kind for e in entries} == kinds
        refs = [_detail(e)["ref"] for e in entries]
        assert all(r.startswith("registry:") for r in refs) and len(set(refs)) == len(refs)
        keys = await b.audit.query(kind="keys.registered", partner="USA")
        assert keys and _detail(keys[0])["ref"].startswith("registry:")
        assert await b.registry.read_outbox(0, 10) == []
    finally:
        await b.stop(grace=1)


async def test_the_next_registry_change_drains_the_one_the_log_missed_first(
    pki: Path, tmp_path: Path
) -> None:
    b = await _start(pki, tmp_path / "broker", admit_partners=True)
    await admit(pki, b.port, policy("GBR"))
    try:
        _fail_drains(b, times=1, which="registry")
        await _suspend_gbr(pki, b)
        assert b.exchange.audit_failed
        async with operator(pki, "op1", b.port) as op:
            resp = await op.suspend("USA", "test: the log is writable again")
            assert resp.WhichOneof("result") == "applied"
        assert not b.exchange.audit_failed
        gbr, usa = await _changes(b), await _changes(b, "USA")
        assert gbr[-1].seq < usa[-1].seq and gbr[-1].time_ms <= usa[-1].time_ms
        assert await b.registry.read_outbox(0, 10) == []
    finally:
        await b.stop(grace=1)
