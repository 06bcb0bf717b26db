"""Every stored message has its publish.accepted audit entry, and every registry change
(admission, policy change, proposal, decision, key bundle) its entry, exactly once, even
when the entry's commit was cut off (audit failure, or a crash between the two commits):
the store's audited mark and the registry's audit outbox say what may be missing, and the
broker records it when the audit log is writable again and before it serves after a
restart.

Real broker over mTLS, real SQLite files. The audit failure is injected at the audit
log's record_many for publish.accepted entries only (the disk-full test makes the whole
log fail for real; the SIGKILL test in test_broker_faults cuts it off for real).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.audit import AuditError, AuditItem
from broker.server import Broker
from broker.store import SqliteMessageStore
from clients.sdk import PartnerClient
from coalition.labels import parse_label
from coalition.v1 import audit_pb2, exchange_pb2
from tests.helpers import admit, operator, partner, policy, running_broker

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


def _fail_entries(b: Broker, *, times: int, kind: str = "publish.accepted") -> list[int]:
    """Make the next `times` writes of entries of kind fail; returns a counter."""
    inner = b.audit.record_many
    failed = [0]

    async def record_many(items: Sequence[AuditItem], *, now_ms: int) -> list[int]:
        if failed[0] < times and any(i.kind == kind for i in items):
            failed[0] += 1
            raise AuditError("injected: the audit log cannot be written")
        return await inner(items, now_ms=now_ms)

    b.audit.record_many = record_many  # type: ignore[method-assign]
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


async def test_an_acceptance_the_audit_log_missed_is_recorded_once_it_recovers(
    pki: Path, tmp_path: Path
) -> None:
    b = await _start(pki, tmp_path / "broker", admit_partners=True)
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()
        failed = _fail_entries(b, times=1)
        first = await _publish(kor, b"stored, but its acceptance entry failed")
        # Stored and acknowledged: the store made it durable; the entry did not commit.
        assert first.outcome == exchange_pb2.ACCEPTED and failed == [1]
        assert b.exchange.audit_failed
        assert [m.offset for m in await b.store.unaudited()] == [first.offset]
        assert await _accepted(b) == []
        # The next publish finds the log writable again and records the missing entry
        # before its own.
        second = await _publish(kor, b"after the log recovered")
        assert second.outcome == exchange_pb2.ACCEPTED
        entries = await _accepted(b)
        assert [e.message_id for e in entries] == [first.message_id, second.message_id]
        recovered, normal = (_detail(e) for e in entries)
        assert recovered["recovered"] is True and recovered["offset"] == first.offset
        assert recovered["stored_ms"] > 0 and recovered["digest"]
        assert "recovered" not in normal
        [probe] = await b.audit.query(kind="audit.recovered")
        assert probe.seq < entries[0].seq
        # The recovered one is marked; the second stays listed until the next append
        # marks it in its own transaction.
        assert [m.offset for m in await b.store.unaudited()] == [second.offset]
        await _chain_ok(pki, b)
    finally:
        await kor.close()
        await b.stop(grace=1)


async def test_a_restart_records_acceptances_that_never_committed(
    pki: Path, tmp_path: Path
) -> None:
    data = tmp_path / "broker"
    b = await _start(pki, data, admit_partners=True)
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()
        _fail_entries(b, times=1)
        lost = await _publish(kor, b"its entry never commits")
        assert lost.outcome == exchange_pb2.ACCEPTED
    finally:
        await kor.close()
        await b.stop(grace=1)  # as after a crash: the entry is not in the log
    b = await _start(pki, data, admit_partners=False)
    try:
        [entry] = await _accepted(b)
        assert entry.message_id == lost.message_id and entry.partner == "KOR"
        assert _detail(entry)["recovered"] is True
        assert await b.store.unaudited() == []
        await _chain_ok(pki, b)
    finally:
        await b.stop(grace=1)


async def test_an_entry_that_committed_is_not_recorded_again(pki: Path, tmp_path: Path) -> None:
    data = tmp_path / "broker"
    b = await _start(pki, data, admit_partners=True)
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()

        async def crash_before_marking() -> None:
            return None  # the crash came after the entry's commit, before the store heard

        b.exchange.flush_audited = crash_before_marking  # type: ignore[method-assign]
        done = await _publish(kor, b"its entry commits; the store is never told")
        assert done.outcome == exchange_pb2.ACCEPTED
        assert len(await b.store.unaudited()) == 1
    finally:
        await kor.close()
        await b.stop(grace=1)
    b = await _start(pki, data, admit_partners=False)
    try:
        [entry] = await _accepted(b)
        assert entry.message_id == done.message_id
        assert "recovered" not in _detail(entry)
        assert await b.store.unaudited() == []
    finally:
        await b.stop(grace=1)


async def test_normal_publishing_leaves_nothing_unaudited(pki: Path, tmp_path: Path) -> None:
    data = tmp_path / "broker"
    b = await _start(pki, data, admit_partners=True)
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()
        for i in range(5):
            r = await _publish(kor, b"%d" % i)
            assert r.outcome == exchange_pb2.ACCEPTED
            # Each append marks the acceptances committed before it: only the newest
            # message is still listed.
            assert [m.offset for m in await b.store.unaudited()] == [r.offset]
        assert len(await _accepted(b)) == 5
    finally:
        await kor.close()
        await b.stop(grace=1)
    # Shutdown marks the last one.
    store = await SqliteMessageStore.open(data / "messages.db", max_bytes=1 << 30)
    try:
        assert await store.unaudited() == []
    finally:
        await store.close()


# -- registry changes ------------------------------------------------------------------


async def _suspend_gbr(pki: Path, b: Broker) -> None:
    async with operator(pki, "op1", b.port) as op:
        resp = await op.suspend("GBR", "test: a lowering change applies at once")
        assert resp.WhichOneof("result") == "applied"


async def _changes(b: Broker, partner: str = "GBR") -> list[audit_pb2.AuditEntry]:
    return await b.audit.query(kind="policy.change", partner=partner)


async def test_a_policy_change_the_audit_log_missed_is_recorded_once_it_recovers(
    pki: Path, tmp_path: Path
) -> None:
    b = await _start(pki, tmp_path / "broker", admit_partners=True)
    await admit(pki, b.port, policy("GBR"))
    kor = partner(pki, "KOR", b.port)
    try:
        await kor.register_keys()
        before = len(await _changes(b))
        failed = _fail_entries(b, times=1, kind="policy.change")
        # The change is durable and the operator is told so; its entry waits in the
        # registry's outbox, and publishes are refused until the log recovers.
        await _suspend_gbr(pki, b)
        assert failed == [1] and b.exchange.audit_failed
        assert len(await _changes(b)) == before
        [(_, waiting, _)] = await b.registry.pending_audit()
        assert waiting.kind == "policy.change" and waiting.partner == "GBR"
        # The next publish finds the log writable again and records it first.
        assert (await _publish(kor, b"after the log recovered")).outcome == exchange_pb2.ACCEPTED
        entries = await _changes(b)
        assert len(entries) == before + 1
        detail = _detail(entries[-1])
        assert detail["recovered"] is True and detail["ref"].startswith("registry:")
        assert detail["diff"] and detail["changed_ms"] > 0
        assert await b.registry.pending_audit() == []
        await _chain_ok(pki, b)
    finally:
        await kor.close()
        await b.stop(grace=1)


async def test_a_restart_records_registry_changes_that_never_audited(
    pki: Path, tmp_path: Path
) -> None:
    data = tmp_path / "broker"
    b = await _start(pki, data, admit_partners=True)
    await admit(pki, b.port, policy("GBR"))
    try:
        before = len(await _changes(b))
        _fail_entries(b, times=1, kind="policy.change")
        await _suspend_gbr(pki, b)
    finally:
        await b.stop(grace=1)  # as after a crash: the entry is only in the outbox
    b = await _start(pki, data, admit_partners=False)
    try:
        entries = await _changes(b)
        assert len(entries) == before + 1 and _detail(entries[-1])["recovered"] is True
        assert await b.registry.pending_audit() == []
    finally:
        await b.stop(grace=1)


async def test_a_registry_entry_that_committed_is_not_recorded_again(
    pki: Path, tmp_path: Path
) -> None:
    data = tmp_path / "broker"
    b = await _start(pki, data, admit_partners=True)
    await admit(pki, b.port, policy("GBR"))
    try:

        async def crash_before_forgetting(ids: list[int]) -> None:
            return None  # the entry committed; the crash came before the outbox heard

        b.registry.audit_recorded = crash_before_forgetting  # type: ignore[method-assign]
        await _suspend_gbr(pki, b)
        entries = await _changes(b)
        assert len(await b.registry.pending_audit()) >= 1
    finally:
        await b.stop(grace=1)
    b = await _start(pki, data, admit_partners=False)
    try:
        again = await _changes(b)
        assert [e.seq for e in again] == [e.seq for e in entries]
        assert not any(_detail(e).get("recovered") for e in again)
        assert await b.registry.pending_audit() == []
    finally:
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
        assert await b.registry.pending_audit() == []
    finally:
        await b.stop(grace=1)


async def test_the_next_registry_change_records_the_one_the_log_missed_first(
    pki: Path, tmp_path: Path
) -> None:
    b = await _start(pki, tmp_path / "broker", admit_partners=True)
    await admit(pki, b.port, policy("GBR"))
    try:
        _fail_entries(b, times=1, kind="policy.change")
        await _suspend_gbr(pki, b)
        assert b.exchange.audit_failed
        async with operator(pki, "op1", b.port) as op:
            resp = await op.suspend("USA", "test: the log is writable again")
            assert resp.WhichOneof("result") == "applied"
        assert not b.exchange.audit_failed
        gbr, usa = await _changes(b), await _changes(b, "USA")
        # Both come from the recovery pass (marked so, with the change's own time), the
        # missed one first.
        assert _detail(gbr[-1])["recovered"] is True and _detail(usa[-1])["recovered"] is True
        assert gbr[-1].seq < usa[-1].seq
        assert _detail(gbr[-1])["changed_ms"] <= _detail(usa[-1])["changed_ms"]
        assert await b.registry.pending_audit() == []
    finally:
        await b.stop(grace=1)
