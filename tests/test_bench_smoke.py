"""The benchmark harness runs end to end in its tiny mode and writes the documented JSON.

Timings are never asserted (the machine is shared and noisy); only the shape of the
report and that every row delivered every message to every recipient.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rows.nats import nats_server_binary
from bench.workload import RECEIVERS

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"system", "delivered_per_s", "latency_ms", "cpu_s_per_msg", "peak_rss_mb"}


def _nats_runs() -> bool:
    binary = nats_server_binary()
    if binary is None:
        return False
    try:
        subprocess.run([binary, "--version"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.mark.timeout(120)
def test_smoke_run_writes_every_row_with_every_message_delivered(tmp_path: Path) -> None:
    nats = ["nats-core", "jetstream-r3", "coalition-cluster"] if _nats_runs() else []
    rows = ["coalition", "grpc-relay", *nats]
    out = tmp_path / "results" / "latest.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"date": "2000-01-01T00:00:00Z", "rows": []}))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--rows", ",".join(rows), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "saturation" in proc.stderr  # progress, one line per phase
    assert "ratios, coalition / other" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["mode"] == "smoke" and doc["quick"] is True
    # Every row sends envelope v2 by default, sealed in batches under one root.
    assert doc["workload"]["envelope"] == "v2" and doc["workload"]["seal_batch"] > 1
    assert {"date", "machine", "git_commit", "durations"} <= doc.keys()
    assert [r["system"] for r in doc["rows"]] == rows
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS
        assert row["delivered_per_s"] > 0
        assert row["cpu_s_per_msg"] >= 0  # /proc counts 10 ms ticks: a tiny run may read 0
        assert row["peak_rss_mb"] > 0
        assert set(row["latency_ms"]) == {"500", "2000"}
        for stats in row["latency_ms"].values():
            assert set(stats) == {"p50", "p99", "p999"}
            assert 0 < stats["p50"] <= stats["p99"] <= stats["p999"]
        details = doc["details"][row["system"]]
        # Every phase ran once per round, and the headline rate is the rounds' median.
        rounds = doc["workload"]["rounds"]
        assert rounds == 2
        by_round = details["delivered_per_s_by_round"]
        assert len(by_round) == rounds and all(r > 0 for r in by_round)
        assert row["delivered_per_s"] == pytest.approx(statistics.median(by_round), abs=0.1)
        calm = details["calm_latency_ms"]  # the open-loop phases without the host's stalls
        assert set(calm) == {"window_ms", "below_ms", "500", "2000"}
        for load in ("500", "2000"):
            assert set(calm[load]) == {"share", "p50", "p99"}
            assert 0 <= calm[load]["share"] <= 1
        for p in details["phases"]:  # open-loop phases also report their own round
            if p["name"].startswith("load-"):
                assert 0 < p["latency_ms"]["p50"] <= p["latency_ms"]["p99"], p
        ran = sorted((p["name"], p["round"]) for p in details["phases"])
        names = sorted({p["name"] for p in details["phases"]})
        assert ran == sorted((n, r) for n in names for r in range(1, rounds + 1))
        assert details["lost"] == 0, details
        assert details["refused"] == 0, details
        assert details["deliveries"] == details["deliveries_expected"] > 0
    assert set(doc["ratios"]) == set(rows) - {"coalition"}
    assert all("calm_p99_500" in e for e in doc["ratios"].values())
    # The previous result was kept, not overwritten.
    assert (out.parent / "history" / "2000-01-01T000000Z.json").exists()


def test_the_workload_seals_v1_or_v2_and_every_opener_opens_it(tmp_path: Path) -> None:
    """--envelope v1 keeps the old workload (for before/after runs); v2 shares roots."""
    from bench.workload import RECEIVERS, SEAL_BATCH, Opener, load_workload, seal_workload
    from coalition import envelope_v2
    from coalition.pki import make_dev_pki
    from coalition.v1 import envelope_pb2

    for version, ml_dsa in (("v1", False), ("v2", True)):
        pki = tmp_path / version / "pki"
        make_dev_pki(
            pki, ("KOR", "USA", *RECEIVERS), ("op1", "op2"), 1_700_000_000_000, ml_dsa=ml_dsa
        )
        out = tmp_path / version / "w.pkl"
        seal_workload(pki, 2 * (SEAL_BATCH + 3), out, version)
        sealed = load_workload(out)
        envs = [envelope_pb2.Envelope.FromString(m.data) for m in sealed]
        assert all(envelope_v2.is_v2(e) == (version == "v2") for e in envs)
        if version == "v2":
            roots = {bytes(e.batch.root) for e in envs}
            assert len(roots) == 4  # two publishers, SEAL_BATCH + 3 each: two batches each
        opener = Opener(pki, RECEIVERS[0])
        assert [opener.open(m.data) for m in sealed] == [m.message_id for m in sealed]


@pytest.mark.timeout(120)
def test_dumped_deliveries_are_every_open_loop_delivery_and_bench_tail_reads_them(
    tmp_path: Path,
) -> None:
    out, dump = tmp_path / "latest.json", tmp_path / "deliveries.csv"
    argv = [sys.executable, "-m", "bench.run", "--smoke", "--rows", "coalition", "--rounds", "1"]
    argv += ["--out", str(out), "--dump-deliveries", str(dump)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["workload"]["rounds"] == 1
    with dump.open(newline="") as f:
        rows = list(csv.DictReader(f))
    phases = [p for p in doc["details"]["coalition"]["phases"] if p["name"].startswith("load-")]
    assert len(rows) == sum(p["deliveries_expected"] for p in phases) > 0
    assert {r["phase"] for r in rows} == {"load-500", "load-2000"}
    assert {r["recipient"] for r in rows} == set(RECEIVERS)
    for r in rows:
        ms = (int(r["opened_ns"]) - int(r["sent_ns"])) / 1e6
        assert float(r["ms"]) == pytest.approx(ms, abs=0.001)
    tail = subprocess.run(
        [sys.executable, "-m", "bench.tail", str(dump)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tail.returncode == 0, tail.stderr
    assert "coalition load-500" in tail.stdout
    assert "deliveries: p50" in tail.stdout and "stalls" in tail.stdout
