"""bench.tail on a hand-made deliveries file: the stalls and the calm windows."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
