"""What a publish is told while the audit log cannot be written, on each backend.

On SQLite the log is a local file and the likely cause is a full disk: the refusal is
RESOURCE_EXHAUSTED ``audit_unavailable`` and says so. On JetStream the log is a
replicated stream and the cause is the cluster (the audit stream electing a leader, or
no quorum), which passes by itself: the refusal is UNAVAILABLE and says the cluster,
never the broker's disk. Provoking a real election takes 4 to 9 s and lands on a random
moment, so the end-to-end case injects the audit log's failure at its interface (as
tests/test_audit_outbox.py does); the election itself is exercised by the fault tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from broker.audit import AuditError
from broker.audit.items import OutboxEntry
from broker.audit_keeping import unavailable
from broker.grpc.status import status_of
from broker.server import Broker
from broker.store import StoreError, StoreFull
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2
from tests.helpers import admit, eventually, partner, policy, running_broker

LABEL = parse_label("NATO SECRET // REL TO USA")


def test_sqlite_refusal_is_resource_exhausted_and_names_the_disk() -> None:
    err = unavailable("sqlite", AuditError("disk I/O error"), "publishes are refused until it can")
    assert err.code == "audit_unavailable"
    assert status_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk" in err.message and "cluster" not in err.message


@pytest.mark.parametrize("exc", [AuditError("no leader"), StoreError("timed out")])
def test_jetstream_refusal_is_unavailable_and_names_the_cluster(exc: Exception) -> None:
    err = unavailable("jetstream", exc, "publishes are refused until it can")
    assert err.code == "audit_unavailable"
    assert status_of(err) == grpc.StatusCode.UNAVAILABLE
    assert "cluster" in err.message and "disk" not in err.message
    assert err.message.endswith("publishes are refused until it can")


def test_a_full_jetstream_stream_stays_resource_exhausted() -> None:
    err = unavailable("jetstream", StoreFull("stream full"), "deliveries resume once it can")
    assert status_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED


def _break_audit_log(b: Broker) -> None:
    """Every write of the audit log fails from now on (its records stay in the outboxes)."""

    async def record(**_: object) -> None:
        raise AuditError("injected: the audit log cannot be written")

    async def append_outbox(source: str, rows: Sequence[OutboxEntry]) -> int:
        raise AuditError("injected: the audit log cannot be written")

    b.audit.record = record  # type: ignore[assignment,method-assign]
    b.audit.append_outbox = append_outbox  # type: ignore[method-assign]


async def test_a_publish_while_the_audit_log_fails_is_refused_as_the_backend_says(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    b = await running_broker(pki, tmp_path / "broker", **backend)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "USA", b.port) as usa, partner(pki, "KOR", b.port) as kor:
            await usa.register_keys()
            await kor.register_keys()
            _break_audit_log(b)
            first = await kor.seal(b"stored with its record", topic="intel.x", label=LABEL)
            [r] = await kor.publish([first.envelope])
            assert r.outcome == exchange_pb2.ACCEPTED  # its record waits in the outbox
            await eventually(lambda: b.exchange.audit_failed, 10)
            second = await kor.seal(b"refused whole", topic="intel.x", label=LABEL)
            [refused] = await kor.publish([second.envelope])
        assert refused.outcome == exchange_pb2.REFUSED
        assert refused.reason_code == "audit_unavailable"
        if backend:  # JetStream
            assert refused.status == "UNAVAILABLE", refused
            assert "cluster" in refused.reason and "disk" not in refused.reason
        else:
            assert refused.status == "RESOURCE_EXHAUSTED", refused
            assert "disk" in refused.reason
    finally:
        await b.stop()
