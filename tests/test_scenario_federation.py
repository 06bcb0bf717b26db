"""`coalition-demo --federation` as an integration test: three national brokers (NATO,
KOR, USA), each with its own CA, operators and partner node daemons, all real processes;
checked through the JSON the command prints with --json."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run() -> tuple[dict[str, Any], str]:
    """Run the demo once: its JSON result (stdout) and its steps (stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "clients.demo", "--federation", "--deadline-ms", "10s", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc, proc.stderr


@pytest.mark.timeout(250)
def test_every_expectation_held(run: tuple[dict[str, Any], str]) -> None:
    report, steps = run
    assert report["ok"] is True
    assert {c["step"] for c in report["checks"]} == {"1", "2", "3", "4", "5", "6", "7"}
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    assert "expectations met" in steps and "FAIL" not in steps


def test_three_nations_each_with_its_own_broker(run: tuple[dict[str, Any], str]) -> None:
    report, steps = run
    nations = report["nations"]
    assert set(nations) == {"NATO", "KOR", "USA"}
    assert len({n["broker"] for n in nations.values()}) == 3
    for code, n in nations.items():
        assert all(p.startswith(code + "-") for p in n["partners"])
        assert f"{code}: own CA" in steps
    # One gateway admitted with the operators' real command, under the two-person rule.
    assert "coalition-admin federation add NATO --ca nato-ca.crt" in steps
    assert "cannot also approve it" in steps


def test_who_received_what_across_the_borders(run: tuple[dict[str, Any], str]) -> None:
    m = run[0]["matrix"]
    # KOR's summary released to NATO: the NATO partners and USA's partner in the NATO
    # group; USA's own policy keeps it from USA-INDOPACOM; nothing else in KOR.
    got = {c for c, v in m["kor-summary"].items() if v == "received"}
    assert got == {"NATO-HQ", "NATO-MARCOM", "USA-EUCOM"}
    # The SIGINT item stays in the nations whose release policies carry SIGINT, and
    # there with the one partner that holds it.
    assert {c for c, v in m["kor-sigint"].items() if v == "received"} == {"USA-INDOPACOM"}
    # NATO's report to every nation, in the triangle: everyone, once (checked in step 4).
    assert {c for c, v in m["nato-report"].items() if v == "received"} == {
        "NATO-MARCOM",
        "KOR-JCS",
        "KOR-NIS",
        "USA-EUCOM",
        "USA-INDOPACOM",
    }
    # NATO releases a maritime report to USA; USA's origination policy for NATO takes
    # ground reports only, so it is refused at USA's border (and receipted so to NATO).
    row = m["nato-maritime"]
    assert {c for c, v in row.items() if v == "received"} == {"NATO-MARCOM"}
    assert row["USA-EUCOM"] == "border_topic_not_permitted"
    # After KOR suspended the KOR-NATO link: USA still receives, NATO does not; nor
    # does KOR receive what NATO, which has not suspended KOR, sealed for its partners.
    got = {c for c, v in m["after-suspension"].items() if v == "received"}
    assert got == {"USA-EUCOM"}
    assert m["after-suspension"]["NATO-HQ"] == "suspended"
    row = m["nato-after-suspension"]
    assert {c for c, v in row.items() if v == "received"} == {"USA-INDOPACOM"}
    assert row["KOR-JCS"] == row["KOR-NIS"] == "gateway_suspended"


def test_receipts_and_the_three_audit_chains_verify(run: tuple[dict[str, Any], str]) -> None:
    report = run[0]
    receipts = report["receipts"]
    # KOR's summary to NATO and USA, its SIGINT item to USA, NATO's report to KOR and
    # USA, its maritime report to USA (refused there), KOR's last summary to USA: at
    # least seven envelopes at a border, each receipted.
    assert len(receipts) >= 7 and all(r["ok"] for r in receipts)
    assert {r["outcome"] for r in receipts} == {"RECEIPT_STORED", "RECEIPT_REFUSED"}
    # Each names the receiving nation's own record, found in its exported chain.
    assert {r["peer_record"] for r in receipts} == {"federation.received", "federation.refused"}
    assert {(r["from"], r["to"]) for r in receipts} >= {
        ("KOR", "NATO"),
        ("KOR", "USA"),
        ("NATO", "KOR"),
        ("NATO", "USA"),
    }
    assert set(report["audits"]) == {"NATO", "KOR", "USA"}
    assert all(a["exit"] == 0 and a["ok"] for a in report["audits"].values())
    assert report["audit"]["ok"] is True
