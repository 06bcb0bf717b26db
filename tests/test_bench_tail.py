"""bench.tail on a hand-made deliveries file: the stalls and the calm windows."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.tail import calm, load, summary

ROOT = Path(__file__).resolve().parent.parent
RECIPIENTS = ("GBR", "UKR", "NATO")
MS = 1_000_000


def write(path: Path, lat_of: dict[int, float], rounds: int = 1, every_ms: int = 10) -> None:
    """Messages 0..n-1 sent every_ms apart in each round, each delivered to every
    recipient after lat_of[index] ms (1 ms apart between recipients)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["row", "round", "phase", "index", "sender", "recipient", "sent_ns", "opened_ns", "ms"]
        )
        for rnd in range(1, rounds + 1):
            base = rnd * 10**12
            for i, lat in lat_of.items():
                sent = base + i * every_ms * MS
                for j, r in enumerate(RECIPIENTS):
                    ms = lat + j
                    sender = "KOR" if i % 2 else "USA"
                    opened = sent + int(ms * MS)
                    w.writerow(["x", rnd, "load-500", i, sender, r, sent, opened, f"{ms:.3f}"])


def test_calm_windows_leave_out_exactly_the_slices_with_a_stall(tmp_path: Path) -> None:
    # 100 messages 10 ms apart: four 250 ms slices of 25 messages; the second holds a
    # 300 ms stall on messages 30..34, every other message takes 2 ms (+0, +1, +2).
    lat = {i: (300.0 if 30 <= i < 35 else 2.0) for i in range(100)}
    path = tmp_path / "d.csv"
    write(path, lat, rounds=2)
    msgs = load(path)[("x", "load-500")]
    got = calm(msgs, 250.0, 50.0)
    assert got["share"] == pytest.approx(0.75)  # three of the four slices, in each round
    assert got["p50_ms"] == 3.0 and got["p99_ms"] == 4.0
    # With every slice calm (a higher bar), the stall is counted.
    assert calm(msgs, 250.0, 1000.0)["p99_ms"] == 302.0
    # One slice of the whole phase: never calm.
    nothing = calm(msgs, 10_000.0, 50.0)
    assert nothing["share"] == 0.0 and math.isnan(nothing["p99_ms"])


def test_summary_groups_the_slow_messages_into_stalls(tmp_path: Path) -> None:
    # Slow deliveries on messages 10..12 and 60..61 (two stalls 480 ms apart).
    lat = {i: (100.0 if i in (10, 11, 12, 60, 61) else 2.0) for i in range(100)}
    path = tmp_path / "d.csv"
    write(path, lat)
    d = summary(load(path)[("x", "load-500")], gap_ms=20.0)
    assert d["deliveries"] == 300
    # The p99 of 300 deliveries is the 297th: 102 ms, which only the third recipient
    # (+2 ms) reaches, so each slow message is slow for one recipient, not all.
    assert d["p99_ms"] == 102.0
    assert d["slow_messages"] == 5 and d["slow_for_every_recipient"] == 0
    assert [(s["at_s"], s["messages"]) for s in d["stalls"]] == [(0.1, 3), (0.6, 2)]
    assert d["gaps_between_stalls_ms"] == [480.0]


def test_the_command_reports_calm_windows_and_json(tmp_path: Path) -> None:
    lat = {i: (300.0 if 30 <= i < 35 else 2.0) for i in range(100)}
    path = tmp_path / "d.csv"
    write(path, lat)
    run = [sys.executable, "-m", "bench.tail", str(path)]
    text = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert "calm 250 ms windows (slowest under 50 ms): 75% of deliveries" in text.stdout
    out = subprocess.run(
        [*run, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    doc = json.loads(out.stdout)
    assert doc["row"] == "x" and doc["calm"]["share"] == pytest.approx(0.75)
    bad = subprocess.run([*run, "--window", "0"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "must be above 0" in bad.stderr


def test_the_report_compares_p99_at_500_with_jetstream_as_measured_and_when_calm() -> None:
    def row(system: str, p99: float) -> dict[str, object]:
        return {
            "system": system,
            "delivered_per_s": 1000.0,
            "latency_ms": {"500": {"p50": 1.0, "p99": p99, "p999": p99}},
            "cpu_s_per_msg": 0.0001,
            "peak_rss_mb": 100.0,
        }

    rows = [row("coalition", 30.0), row("jetstream-sync", 300.0)]
    details = {
        "coalition": {"calm_latency_ms": {"500": {"share": 0.9, "p50": 5.0, "p99": 20.0}}},
        "jetstream-sync": {"calm_latency_ms": {"500": {"share": 0.8, "p50": 2.0, "p99": 8.0}}},
    }
    got = report.targets(rows, details)
    # A stall of the host in JetStream's run makes the raw comparison look met...
    assert got["p99_500_vs_jetstream-sync"] == {"value": 0.1, "goal": "<= 1x", "met": True}
    # ...the calm windows show the floors: 20 against 8 ms.
    assert got["calm_p99_500_vs_jetstream-sync"] == {"value": 2.5, "goal": "<= 1x", "met": False}
    assert report.ratios(rows, details)["jetstream-sync"]["calm_p99_500"] == 2.5
    text = report.table(rows, details)
    assert "calm windows at 500/s" in text and "calm p99" in text
    # Without details (or without calm windows) the calm ratio is unknown, not invented.
    assert report.targets(rows)["calm_p99_500_vs_jetstream-sync"]["met"] is None


def test_calm_latency_keeps_each_phase_slices_apart() -> None:
    # Two phases; phase "b" starts later, and its own first slice is calm.
    d = [("a", 0, 100.0), ("a", 10 * MS, 2.0), ("b", 10**12, 3.0), ("b", 10**12 + MS, 4.0)]
    got = report.calm_latency(d, 250.0, 50.0)
    assert got["share"] == 0.5 and got["p50"] == 3.0 and got["p99"] == 4.0
    assert math.isnan(report.calm_latency([], 250.0, 50.0)["p99"])
