"""The wire fuzzer (tests/fuzz.py), short: 10,000 mutated requests over every RPC of the
Exchange and Admin services against a broker process. ``make fuzz`` runs a longer one."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fuzz import fuzz


async def test_fuzzed_requests_get_a_status_an_answer_and_an_audit_entry(
    tmp_path: Path,
) -> None:
    n = int(os.environ.get("FUZZ_TEST_N", "10000"))
    rep = await fuzz(n, seed=int(os.environ.get("FUZZ_SEED", "7")), workdir=tmp_path)
    summary = rep.as_dict()
    assert rep.cases == n and rep.calls >= n, summary
    assert rep.alive and rep.serving, summary
    assert not rep.problems, summary
    for bad in ("UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED"):
        assert rep.statuses[bad] == 0, summary
    # Every refusal has its entry, kind by kind, and the fuzz did refuse some of each.
    assert rep.expected_kinds == rep.audited_kinds, summary
    for kind in ("auth.refused", "request.malformed", "publish.refused", "admin.refused"):
        assert rep.expected_kinds[kind] > 0, summary
    assert rep.statuses["OK"] > 0, summary
