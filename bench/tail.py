"""Where a row's latency tail comes from: ``python -m bench.tail DELIVERIES.csv``.

Reads the CSV ``python -m bench.run --dump-deliveries`` writes and prints, per row and
offered load:

- the latency percentiles over every delivery (as the bench computes them);
- the slow messages (a delivery at or above the p99): how many were slow for every
  recipient at once (a stall of the server: everything in flight waited) rather than
  for one (a slow recipient), and how many were sent by each publisher;
- the stalls: slow messages grouped when sent within ``--gap`` ms of each other, with
  when they started (seconds into the phase), how long they lasted and the worst
  latency, and the gaps between consecutive stalls (a periodic cause shows as a steady
  gap).

Times are the scheduled send times of the open loop, so a stall shows as a run of
consecutive slow messages whatever the publisher did.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import CALM_BELOW_MS, CALM_WINDOW_MS, calm_latency, percentile


@dataclass
class Message:
    sent_ns: int
    sender: str
    latency_ms: dict[str, float] = field(default_factory=dict)  # by recipient


def load(path: Path) -> dict[tuple[str, str], dict[tuple[int, int], Message]]:
    """{(row, phase): {(round, index): Message}} from a --dump-deliveries CSV."""
    out: dict[tuple[str, str], dict[tuple[int, int], Message]] = defaultdict(dict)
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            if not r["ms"]:
                continue  # not delivered
            msgs = out[(r["row"], r["phase"])]
            key = (int(r["round"]), int(r["index"]))
            m = msgs.setdefault(key, Message(int(r["sent_ns"]), r["sender"]))
            m.latency_ms[r["recipient"]] = float(r["ms"])
    return out


def calm(
    msgs: dict[tuple[int, int], Message], window_ms: float, below_ms: float
) -> dict[str, float]:
    """bench.report.calm_latency over msgs (each round a phase of its own): the share of
    deliveries in calm window_ms slices (0..1), their p50_ms and p99_ms."""
    q = calm_latency(
        ((rnd, m.sent_ns, ms) for (rnd, _), m in msgs.items() for ms in m.latency_ms.values()),
        window_ms,
        below_ms,
    )
    return {"share": q["share"], "p50_ms": q["p50"], "p99_ms": q["p99"]}


def stalls_of(
    msgs: dict[tuple[int, int], Message], p99: float, gap_ms: float
) -> list[list[tuple[tuple[int, int], Message]]]:
    """The messages with a delivery at or above p99, in send order, grouped while sent
    within gap_ms of the previous one (of the same round)."""
    slow = sorted((k, m) for k, m in msgs.items() if max(m.latency_ms.values(), default=0) >= p99)
    stalls: list[list[tuple[tuple[int, int], Message]]] = []
    for k, m in slow:
        if (
            stalls
            and stalls[-1][-1][0][0] == k[0]
            and m.sent_ns - stalls[-1][-1][1].sent_ns < gap_ms * 1e6
        ):
            stalls[-1].append((k, m))
        else:
            stalls.append([(k, m)])
    return stalls


def summary(
    msgs: dict[tuple[int, int], Message],
    gap_ms: float = 20.0,
    window_ms: float = CALM_WINDOW_MS,
    calm_ms: float = CALM_BELOW_MS,
) -> dict[str, Any]:
    """Everything the report prints, as plain values (what --json writes)."""
    lat = sorted(x for m in msgs.values() for x in m.latency_ms.values())
    p99 = percentile(lat, 99)
    stalls = stalls_of(msgs, p99, gap_ms)
    slow = [m for s in stalls for _, m in s]
    senders: dict[str, int] = defaultdict(int)
    for m in slow:
        senders[m.sender] += 1
    starts: dict[int, int] = {}
    for (rnd, _), m in msgs.items():
        starts[rnd] = min(starts.get(rnd, m.sent_ns), m.sent_ns)
    found: list[dict[str, Any]] = []
    gaps: list[float] = []
    for i, s in enumerate(stalls):
        rnd = s[0][0][0]
        t0, t1 = s[0][1].sent_ns, s[-1][1].sent_ns
        found.append(
            {
                "round": rnd,
                "at_s": (t0 - starts[rnd]) / 1e9,
                "messages": len(s),
                "over_ms": (t1 - t0) / 1e6,
                "worst_ms": max(max(m.latency_ms.values()) for _, m in s),
            }
        )
        if i and stalls[i - 1][0][0][0] == rnd:
            gaps.append((t0 - stalls[i - 1][-1][1].sent_ns) / 1e6)
    return {
        "deliveries": len(lat),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": p99,
        "p999_ms": percentile(lat, 99.9),
        "max_ms": lat[-1] if lat else float("nan"),
        "calm": {"window_ms": window_ms, "below_ms": calm_ms, **calm(msgs, window_ms, calm_ms)},
        "slow_messages": len(slow),
        "slow_for_every_recipient": sum(1 for m in slow if min(m.latency_ms.values()) >= p99),
        "slow_by_sender": dict(sorted(senders.items())),
        "stall_gap_ms": gap_ms,
        "stalls": found,
        "gaps_between_stalls_ms": gaps,
    }


def report(
    msgs: dict[tuple[int, int], Message],
    gap_ms: float,
    window_ms: float = CALM_WINDOW_MS,
    calm_ms: float = CALM_BELOW_MS,
) -> list[str]:
    """summary(...) as the lines the command prints."""
    d = summary(msgs, gap_ms, window_ms, calm_ms)
    q = d["calm"]
    lines = [
        f"  {d['deliveries']} deliveries: p50 {d['p50_ms']:.1f}  p90 {d['p90_ms']:.1f}"
        f"  p99 {d['p99_ms']:.1f}  p99.9 {d['p999_ms']:.1f}  max {d['max_ms']:.1f} ms",
        f"  calm {window_ms:g} ms windows (slowest under {calm_ms:g} ms): "
        f"{q['share']:.0%} of deliveries, p50 {q['p50_ms']:.1f}  p99 {q['p99_ms']:.1f} ms",
        f"  {d['slow_messages']} messages with a delivery at or above the p99: "
        f"{d['slow_for_every_recipient']} slow for every recipient at once; "
        f"by sender {d['slow_by_sender']}",
        f"  {len(d['stalls'])} stalls (slow messages sent within {gap_ms:g} ms of each other):",
    ]
    for st in d["stalls"]:
        lines.append(
            f"    round {st['round']} at {st['at_s']:7.3f} s: {st['messages']:3} messages over "
            f"{st['over_ms']:6.1f} ms, worst {st['worst_ms']:6.1f} ms"
        )
    gaps = d["gaps_between_stalls_ms"]
    if len(gaps) >= 2:
        lines.append(
            f"  gaps between stalls: median {statistics.median(gaps):.0f} ms, "
            f"min {min(gaps):.0f}, max {max(gaps):.0f}"
        )
    return lines


def _no_nan(value: Any) -> Any:
    """value with every NaN (no calm slice, no delivery) as None: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Where the latency tail comes from (see docstring).")
    p.add_argument("csv", type=Path, help="a file written by bench.run --dump-deliveries")
    p.add_argument("--row", help="only this row")
    p.add_argument("--phase", default="load-500", help="open-loop phase (default load-500)")
    p.add_argument(
        "--gap", type=_positive, default=20.0, help="ms between slow messages of one stall"
    )
    p.add_argument(
        "--window",
        type=_positive,
        default=CALM_WINDOW_MS,
        help=f"ms per slice for the calm windows (default {CALM_WINDOW_MS:g})",
    )
    p.add_argument(
        "--calm",
        type=_positive,
        default=CALM_BELOW_MS,
        help=f"a slice is calm while its slowest delivery is under this many ms "
        f"(default {CALM_BELOW_MS:g})",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per row and phase")
    args = p.parse_args(argv)
    for (row, phase), msgs in sorted(load(args.csv).items()):
        if phase != args.phase or (args.row and row != args.row):
            continue
        if args.json:
            doc = summary(msgs, args.gap, args.window, args.calm)
            print(json.dumps(_no_nan({"row": row, "phase": phase, **doc})))
            continue
        print(f"{row} {phase}")
        print("\n".join(report(msgs, args.gap, args.window, args.calm)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
