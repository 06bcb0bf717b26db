"""Turn raw per-message records into row metrics; print the table; write latest.json."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OURS = "coalition"
LOADS = ("500", "2000")
# The calm windows (see calm_latency): slices of this many ms of sends, kept while their
# slowest delivery is under CALM_BELOW_MS.
CALM_WINDOW_MS = 250.0
CALM_BELOW_MS = 50.0


@dataclass
class PhaseRecord:
    """What the orchestrator saw of one phase."""

    name: str
    kind: str
    rate: int
    start: int  # index of the first message of the phase in the workload
    stop: int
    server_cpu_s: float
    client_cpu_s: float
    wall_s: float
    round: int = 1
    server_cpu_by_kind: dict[str, float] = field(default_factory=dict)  # a cluster's parts


@dataclass
class RowResult:
    system: str
    phases: list[PhaseRecord] = field(default_factory=list)
    sent_at: dict[str, int] = field(default_factory=dict)
    opened: dict[str, dict[str, int]] = field(default_factory=dict)  # receiver -> id -> ns
    message_ids: list[str] = field(default_factory=list)  # the workload order
    peak_rss_mb: float = 0.0
    refused: int = 0
    seconds: float = 0.0
    error: str | None = None

    def merge(self, other: RowResult) -> None:
        """Add another round of the same row (its phases use other messages)."""
        self.phases += other.phases
        self.sent_at.update(other.sent_at)
        for code, opened in other.opened.items():
            self.opened.setdefault(code, {}).update(opened)
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)
        self.refused += other.refused
        self.seconds += other.seconds
        self.error = self.error or other.error


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def calm_latency(
    deliveries: Iterable[tuple[object, int, float]],
    window_ms: float = CALM_WINDOW_MS,
    below_ms: float = CALM_BELOW_MS,
) -> dict[str, float]:
    """Latency over the calm windows of open-loop phases.

    deliveries: (phase key, scheduled send ns, latency ms), one per delivery. Each phase
    is cut into window_ms slices of send time from its first send; the slices whose
    slowest delivery is under below_ms are kept. Returns their share of all deliveries
    (0..1), p50 and p99 (NaN when no slice is calm). The rows run one after another, so
    a stall of the host lands on one row only; the calm percentiles leave those out.
    """
    items = list(deliveries)
    starts: dict[object, int] = {}
    for key, sent, _ in items:
        starts[key] = min(starts.get(key, sent), sent)
    slices: dict[tuple[object, int], list[float]] = {}
    for key, sent, ms in items:
        at = int((sent - starts[key]) // (window_ms * 1e6))
        slices.setdefault((key, at), []).append(ms)
    kept = sorted(x for v in slices.values() if max(v) < below_ms for x in v)
    return {
        "share": len(kept) / len(items) if items else 0.0,
        "p50": percentile(kept, 50),
        "p99": percentile(kept, 99),
    }


@dataclass
class _Phase:
    """One phase's deliveries, as row_metrics reads them."""

    expected: int = 0
    delivered: int = 0
    first_send: int = 0  # ns
    last_open: int = 0  # ns
    latencies: list[float] = field(default_factory=list)  # ms, sorted
    sends: list[tuple[object, int, float]] = field(default_factory=list)  # for calm_latency


def _phase_deliveries(r: RowResult, ph: PhaseRecord) -> _Phase:
    """What was expected and delivered in one phase, and when (each delivery's send time
    and latency keyed by the phase, for calm_latency)."""
    out = _Phase()
    key = (ph.round, ph.start)
    for mid in r.message_ids[ph.start : ph.stop]:
        sent = r.sent_at.get(mid)
        if sent is None:
            continue
        out.first_send = sent if out.first_send == 0 else min(out.first_send, sent)
        for opened in r.opened.values():
            out.expected += 1
            t = opened.get(mid)
            if t is None:
                continue
            out.delivered += 1
            out.last_open = max(out.last_open, t)
            ms = (t - sent) / 1e6
            out.latencies.append(ms)
            out.sends.append((key, sent, ms))
    out.latencies.sort()
    return out


def row_metrics(r: RowResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the row as latest.json's ``rows`` holds it, the details beside it).

    Over several rounds: delivered/s is the median of the rounds' saturation rates;
    CPU per delivery is all saturation CPU over all its deliveries; latency percentiles
    are taken over every delivery of every round at that offered load.
    """
    row: dict[str, Any] = {
        "system": r.system,
        "delivered_per_s": None,
        "latency_ms": {},
        "cpu_s_per_msg": None,
        "peak_rss_mb": round(r.peak_rss_mb, 1) if r.peak_rss_mb else None,
    }
    details: dict[str, Any] = {"system": r.system, "phases": [], "refused": r.refused}
    if r.error:
        details["error"] = r.error
    expected_all = delivered_all = 0
    rates: list[float] = []
    sat_cpu = sat_ccpu = 0.0
    sat_delivered = 0
    sat_parts: dict[str, float] = {}
    latencies: dict[int, list[float]] = {}
    sends: dict[int, list[tuple[object, int, float]]] = {}
    for ph in r.phases:
        got = _phase_deliveries(r, ph)
        expected, delivered, lat = got.expected, got.delivered, got.latencies
        first, last = got.first_send, got.last_open
        if ph.name != "warmup":
            expected_all += expected
            delivered_all += delivered
        span_s = (last - first) / 1e9 if last > first else float("nan")
        info: dict[str, Any] = {
            "name": ph.name,
            "round": ph.round,
            "messages_sent": expected // max(1, len(r.opened)),
            "deliveries_expected": expected,
            "deliveries": delivered,
            "span_s": round(span_s, 3),
            "server_cpu_s": round(ph.server_cpu_s, 3),
            "client_cpu_s": round(ph.client_cpu_s, 3),
        }
        if ph.kind == "closed" and ph.name == "saturation" and delivered:
            info["delivered_per_s"] = round(delivered / span_s, 1)
            rates.append(delivered / span_s)
            sat_cpu += ph.server_cpu_s
            sat_ccpu += ph.client_cpu_s
            sat_delivered += delivered
            for kind, cpu in ph.server_cpu_by_kind.items():
                sat_parts[kind] = sat_parts.get(kind, 0.0) + cpu
        if ph.kind == "open":
            latencies.setdefault(ph.rate, []).extend(lat)
            sends.setdefault(ph.rate, []).extend(got.sends)
            info["achieved_per_s"] = round(delivered / span_s, 1) if delivered else 0.0
            if lat:  # this round alone: on a noisy host the rounds can differ a lot
                ordered = sorted(lat)
                info["latency_ms"] = {
                    "p50": round(percentile(ordered, 50), 2),
                    "p99": round(percentile(ordered, 99), 2),
                }
        details["phases"].append(info)
    if rates:
        row["delivered_per_s"] = round(statistics.median(rates), 1)
        row["cpu_s_per_msg"] = round(sat_cpu / sat_delivered, 7)
        details["client_cpu_s_per_msg"] = round(sat_ccpu / sat_delivered, 7)
        if sat_parts:  # a cluster row: whose CPU (brokers, nats-server processes)
            details["server_cpu_s_per_msg_by_kind"] = {
                k: round(v / sat_delivered, 7) for k, v in sorted(sat_parts.items())
            }
        details["delivered_per_s_by_round"] = [round(x, 1) for x in rates]
    for rate, lat in latencies.items():
        lat.sort()
        row["latency_ms"][str(rate)] = {
            "p50": round(percentile(lat, 50), 2),
            "p99": round(percentile(lat, 99), 2),
            "p999": round(percentile(lat, 99.9), 2),
        }
    if sends:
        details["calm_latency_ms"] = {
            "window_ms": CALM_WINDOW_MS,
            "below_ms": CALM_BELOW_MS,
            **{
                str(rate): {k: _rounded(v) for k, v in calm_latency(d).items()}
                for rate, d in sends.items()
            },
        }
    details["deliveries_expected"] = expected_all
    details["deliveries"] = delivered_all
    details["lost"] = expected_all - delivered_all
    details["seconds"] = round(r.seconds, 1)
    return row, details


def _rounded(v: float) -> float | None:
    """v to 3 places; None for NaN (JSON has no NaN)."""
    return None if v != v else round(v, 3)


def _calm_p99(details: Mapping[str, Any] | None, load: str) -> float | None:
    if not details:
        return None
    value = details.get("calm_latency_ms", {}).get(load, {}).get("p99")
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return round(a / b, 3)


def ratios(
    rows: Sequence[Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, float | None]]:
    """ours / theirs for every other row (>1 means ours is higher: better for delivered/s);
    with details, also the calm windows' p99 at 500/s (calm_p99_500)."""
    details = details or {}
    ours = next((r for r in rows if r["system"] == OURS), None)
    if ours is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if r["system"] == OURS:
            continue
        entry: dict[str, float | None] = {
            "delivered_per_s": _ratio(ours["delivered_per_s"], r["delivered_per_s"]),
            "cpu_s_per_msg": _ratio(ours["cpu_s_per_msg"], r["cpu_s_per_msg"]),
            "peak_rss_mb": _ratio(ours["peak_rss_mb"], r["peak_rss_mb"]),
        }
        for load in LOADS:
            a = ours["latency_ms"].get(load, {}).get("p99")
            b = r["latency_ms"].get(load, {}).get("p99")
            entry[f"p99_{load}"] = _ratio(a, b)
        entry["calm_p99_500"] = _ratio(
            _calm_p99(details.get(OURS), "500"), _calm_p99(details.get(r["system"]), "500")
        )
        out[r["system"]] = entry
    return out


def targets(
    rows: Sequence[Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The speed targets, each with the measured value and whether it is met."""
    details = details or {}
    by = {r["system"]: r for r in rows}
    ours = by.get(OURS)
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out[name] = {"value": value, "goal": goal, "met": met}

    cluster, r3 = by.get("coalition-cluster"), by.get("jetstream-r3")
    if cluster is not None and r3 is not None:
        v = _ratio(cluster["delivered_per_s"], r3["delivered_per_s"])
        put("cluster_delivered_vs_r3", v, ">= 0.5x", None if v is None else v >= 0.5)
        a = cluster["latency_ms"].get("500", {}).get("p99")
        b = r3["latency_ms"].get("500", {}).get("p99")
        v = _ratio(a, b)
        put("cluster_p99_500_vs_r3", v, "<= 2x", None if v is None else v <= 2)
    if ours is None:
        return out

    for other, goal in (("nats-core", 0.5), ("jetstream-sync", 1.0)):
        if other in by:
            v = _ratio(ours["delivered_per_s"], by[other]["delivered_per_s"])
            put(f"delivered_vs_{other}", v, f">= {goal}x", None if v is None else v >= goal)
    p99 = ours["latency_ms"].get("500", {}).get("p99")
    put("p99_ms_at_500", p99, "<= 50 ms", None if p99 is None else p99 <= 50)
    js = by.get("jetstream-sync")
    if js is not None:
        # At or below JetStream's p99 at 500/s in the same run: as measured, and over
        # the calm windows of both (the host's stalls left out).
        v = _ratio(p99, js["latency_ms"].get("500", {}).get("p99"))
        put("p99_500_vs_jetstream-sync", v, "<= 1x", None if v is None else v <= 1)
        v = _ratio(_calm_p99(details.get(OURS), "500"), _calm_p99(details.get(js["system"]), "500"))
        put("calm_p99_500_vs_jetstream-sync", v, "<= 1x", None if v is None else v <= 1)
    rss = ours["peak_rss_mb"]
    put("peak_rss_mb", rss, "< 256 MiB", None if rss is None else rss < 256)
    return out


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None or v != v else format(v, fmt)


def table(rows: Sequence[Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]]) -> str:
    head = (
        f"{'system':17} {'deliv/s':>8} {'p50@500':>8} {'p99@500':>8} {'p999@500':>9} "
        f"{'p50@2k':>8} {'p99@2k':>8} {'p999@2k':>8} {'srv ms/msg':>10} {'cli ms/msg':>10} "
        f"{'RSS MiB':>8} {'lost':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lat5 = r["latency_ms"].get("500", {})
        lat2 = r["latency_ms"].get("2000", {})
        d = details.get(r["system"], {})
        cpu = r["cpu_s_per_msg"]
        ccpu = d.get("client_cpu_s_per_msg")
        lines.append(
            f"{r['system']:17} {_f(r['delivered_per_s'], '.0f'):>8} "
            f"{_f(lat5.get('p50'), '.1f'):>8} {_f(lat5.get('p99'), '.1f'):>8} "
            f"{_f(lat5.get('p999'), '.1f'):>9} {_f(lat2.get('p50'), '.1f'):>8} "
            f"{_f(lat2.get('p99'), '.1f'):>8} {_f(lat2.get('p999'), '.1f'):>8} "
            f"{_f(cpu * 1000 if cpu else None, '.3f'):>10} "
            f"{_f(ccpu * 1000 if ccpu else None, '.3f'):>10} "
            f"{_f(r['peak_rss_mb'], '.1f'):>8} {d.get('lost', '—')!s:>5}"
        )
        if d.get("error"):
            lines.append(f"  ! {r['system']} failed: {str(d['error']).splitlines()[-1]}")
    calm = [(r["system"], details.get(r["system"], {}).get("calm_latency_ms", {})) for r in rows]
    if any(c.get("500") for _, c in calm):
        lines += [
            "",
            f"calm windows at 500/s ({CALM_WINDOW_MS:g} ms of sends whose slowest delivery "
            f"is under {CALM_BELOW_MS:g} ms; the host's stalls left out)",
        ]
        for system, c in calm:
            q = c.get("500") or {}
            share = q.get("share")
            lines.append(
                f"  {system:17} {_f(share * 100 if share is not None else None, '.0f'):>4}% "
                f"of deliveries  p50 {_f(q.get('p50'), '.1f'):>6}  p99 {_f(q.get('p99'), '.1f'):>6}"
            )
    rat = ratios(rows, details)
    if rat:
        lines += ["", f"ratios, {OURS} / other (deliv/s: >1 better; p99, cpu, RSS: <1 better)"]
        h2 = (
            f"{'vs':17} {'deliv/s':>8} {'p99@500':>8} {'calm p99':>8} {'p99@2k':>8} "
            f"{'srv cpu':>8} {'RSS':>8}"
        )
        lines += [h2, "-" * len(h2)]
        for system, e in rat.items():
            lines.append(
                f"{system:17} {_f(e['delivered_per_s'], '.2f'):>8} "
                f"{_f(e['p99_500'], '.2f'):>8} {_f(e['calm_p99_500'], '.2f'):>8} "
                f"{_f(e['p99_2000'], '.2f'):>8} "
                f"{_f(e['cpu_s_per_msg'], '.2f'):>8} {_f(e['peak_rss_mb'], '.2f'):>8}"
            )
    tg = targets(rows, details)
    if tg:
        lines += ["", "targets:"]
        for name, t in tg.items():
            verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            lines.append(f"  {name:32} {_f(t['value'], '.2f'):>8}  goal {t['goal']:10} {verdict}")
    return "\n".join(lines)


def write(out: Path, doc: Mapping[str, Any]) -> Path | None:
    """Write out (keeping the previous one under history/); returns the history copy."""
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = None
    if out.exists():
        try:
            stamp = str(json.loads(out.read_text()).get("date", "")).replace(":", "")
        except (OSError, ValueError, AttributeError):
            stamp = ""
        history = out.parent / "history"
        history.mkdir(exist_ok=True)
        kept = history / f"{stamp or 'unknown'}.json"
        shutil.copy2(out, kept)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return kept


def dump_deliveries(out: Path, results: Iterable[RowResult], senders: Sequence[str]) -> None:
    """Every delivery of the open-loop phases as CSV, one line each (``--dump-deliveries``).

    Message k of the workload was sent by ``senders[k % len(senders)]``; times are
    ``time.time_ns()`` (the send time is the scheduled one), latency in ms.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["row", "round", "phase", "index", "sender", "recipient", "sent_ns", "opened_ns", "ms"]
        )
        for r in results:
            for ph in r.phases:
                if ph.kind != "open":
                    continue
                for k in range(ph.start, ph.stop):
                    mid = r.message_ids[k]
                    sent = r.sent_at.get(mid)
                    if sent is None:
                        continue
                    sender = senders[k % len(senders)]
                    for code, opened in sorted(r.opened.items()):
                        t = opened.get(mid)
                        at, ms = ("", "") if t is None else (t, f"{(t - sent) / 1e6:.3f}")
                        w.writerow([r.system, ph.round, ph.name, k, sender, code, sent, at, ms])


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (rounds, rows, repeats)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return n
