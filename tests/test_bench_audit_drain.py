"""bench.audit_drain: real SQLite files, the real drainer; every drain takes the rows
written for it, and the chain it leaves verifies."""

from __future__ import annotations

from bench import audit_drain


def test_the_records_are_the_mix_of_a_message_and_its_three_deliveries() -> None:
    kinds = [r.kind for r in audit_drain.records(8)]
    assert kinds == ["publish.accepted", "deliver", "deliver", "deliver"] * 2


async def test_a_small_run_drains_every_row_and_reports_each_part() -> None:
    r = await audit_drain.run(40, 3)  # asserts each drain takes its 40 rows, and verify
    assert r["rows"] == 40
    assert set(r) >= {"encode_us_per_record", "decode_build_us_per_record", "drain_cpu_ms"}
    assert all(v >= 0 for v in r.values())
