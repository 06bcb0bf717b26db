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
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import percentile


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


def report(msgs: dict[tuple[int, int], Message], gap_ms: float) -> list[str]:
    lat = sorted(x for m in msgs.values() for x in m.latency_ms.values())
    p99 = percentile(lat, 99)
    lines = [
        f"  {len(lat)} deliveries: p50 {percentile(lat, 50):.1f}  p90 {percentile(lat, 90):.1f}"
        f"  p99 {p99:.1f}  p99.9 {percentile(lat, 99.9):.1f}  max {lat[-1]:.1f} ms"
    ]
    slow = sorted((k, m) for k, m in msgs.items() if max(m.latency_ms.values(), default=0) >= p99)
    every = sum(1 for _, m in slow if min(m.latency_ms.values()) >= p99)
    senders: dict[str, int] = defaultdict(int)
    for _, m in slow:
        senders[m.sender] += 1
    lines.append(
        f"  {len(slow)} messages with a delivery at or above the p99: {every} slow for every "
        f"recipient at once; by sender {dict(sorted(senders.items()))}"
    )
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
    starts: dict[int, int] = {}
    for (rnd, _), m in msgs.items():
        starts[rnd] = min(starts.get(rnd, m.sent_ns), m.sent_ns)
    lines.append(f"  {len(stalls)} stalls (slow messages sent within {gap_ms:g} ms of each other):")
    gaps: list[float] = []
    for i, s in enumerate(stalls):
        rnd = s[0][0][0]
        t0, t1 = s[0][1].sent_ns, s[-1][1].sent_ns
        worst = max(max(m.latency_ms.values()) for _, m in s)
        lines.append(
            f"    round {rnd} at {(t0 - starts[rnd]) / 1e9:7.3f} s: {len(s):3} messages over "
            f"{(t1 - t0) / 1e6:6.1f} ms, worst {worst:6.1f} ms"
        )
        if i and stalls[i - 1][0][0][0] == rnd:
            gaps.append((t0 - stalls[i - 1][-1][1].sent_ns) / 1e6)
    if len(gaps) >= 2:
        lines.append(
            f"  gaps between stalls: median {statistics.median(gaps):.0f} ms, "
            f"min {min(gaps):.0f}, max {max(gaps):.0f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Where the latency tail comes from (see docstring).")
    p.add_argument("csv", type=Path, help="a file written by bench.run --dump-deliveries")
    p.add_argument("--row", help="only this row")
    p.add_argument("--phase", default="load-500", help="open-loop phase (default load-500)")
    p.add_argument("--gap", type=float, default=20.0, help="ms between slow messages of one stall")
    args = p.parse_args(argv)
    for (row, phase), msgs in sorted(load(args.csv).items()):
        if phase != args.phase or (args.row and row != args.row):
            continue
        print(f"{row} {phase}")
        print("\n".join(report(msgs, args.gap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
