"""bench.seal_v2: v1 beside v2 at every batch size, with the counts its per-message costs use."""

from __future__ import annotations

import math

from bench import seal_v2


def test_comparison_counts_one_root_check_per_batch_and_one_decapsulation_per_epoch() -> None:
    messages = 40
    c = seal_v2.compare(messages)
    v1, *v2 = c.rows
    assert (v1.version, v1.broker_signature_checks, v1.recipient_decapsulations) == (
        "v1",
        messages,
        messages,
    )
    assert [r.batch for r in v2] == list(seal_v2.BATCH_SIZES)
    for r in v2:
        batches = math.ceil(messages / r.batch)
        assert r.broker_signature_checks == r.recipient_signature_checks == batches
        assert r.recipient_decapsulations == 1  # one epoch: fewer messages than it allows
    text = seal_v2.table(c)
    for size in seal_v2.BATCH_SIZES:
        assert f"v2{size:>11}" in text
    assert "batch  16: recipient PK" in text and "batch 256: recipient PK" in text
    assert set(seal_v2.as_json(c)) >= {"units", "rows"}
