"""`coalition-demo --cluster` as an integration test: three nats-server and two brokers
on the JetStream backend as real processes, the nations spread over both brokers; the
eight steps pass as on SQLite, then a nats-server and a broker are killed in the middle
of a burst and nothing acknowledged is lost, no inbox holds a duplicate, no node raised
a gap alarm and the audit chain verifies."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    d = tmp_path_factory.mktemp("demo-cluster")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clients.demo",
            "--cluster",
            "--deadline-ms",
            "10s",
            "--report",
            str(d / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=290,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc: dict[str, Any] = json.loads((d / "report.json").read_text())
    return doc, proc.stdout


@pytest.mark.timeout(300)
def test_the_eight_steps_pass_on_two_brokers(demo: tuple[dict[str, Any], str]) -> None:
    report, out = demo
    assert report["ok"] is True
    steps = {c["step"] for c in report["checks"]}
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= steps
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    assert "3 nats-server clustered on loopback" in out
    assert out.count("JetStream backend") >= 2  # two brokers started


@pytest.mark.timeout(300)
def test_a_lost_nats_server_and_broker_lose_nothing(demo: tuple[dict[str, Any], str]) -> None:
    report, out = demo
    failover = {c["expectation"]: c["ok"] for c in report["checks"] if c["step"] == "9"}
    assert failover == {
        "every one of KOR's 60 reports acknowledged": True,
        "USA holds every acknowledged report": True,
        "UKR holds every acknowledged report": True,
        "NATO holds every acknowledged report": True,
        "GBR (suspended) holds none of them": True,
        "no inbox holds a duplicate": True,
        "no node raised a gap alarm": True,
        "the audit chain verifies through the surviving broker": True,
    }
    assert "SIGKILL nats-server" in out and "SIGKILL broker 2" in out
