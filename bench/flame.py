"""Summarize py-spy collapsed stacks: ``python -m bench.flame FILE [--top N] [--filter S]``.

``bench.run --profile DIR`` writes one file per profiled process. This prints the
functions with the largest *self* share and the largest *inclusive* share (a function
counted once per sample however deep it recurs), so "where does the time go" has a
number beside each answer.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        stacks.append((frames, int(count)))
    return stacks


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    name, _, where = frame.partition(" (")
    if where:
        where = where.rstrip(")")
        file, _, line = where.rpartition(":")
        file = "/".join(file.split("/")[-2:])
        return f"{name} ({file}:{line})" if line.isdigit() else f"{name} ({where})"
    return name


def summarize(stacks: list[tuple[list[str], int]], top: int, contains: str) -> str:
    total = sum(c for _, c in stacks)
    if contains:
        stacks = [(f, c) for f, c in stacks if any(contains in x for x in f)]
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, c in stacks:
        if frames:
            self_c[_short(frames[-1])] += c
        for f in {_short(x) for x in frames}:
            incl[f] += c
    lines = [
        f"{total} samples"
        + (f"; {sum(c for _, c in stacks)} through {contains!r}" if contains else "")
    ]
    lines.append("\nself")
    for f, c in self_c.most_common(top):
        lines.append(f"{100 * c / total:6.1f}%  {f}")
    lines.append("\ninclusive")
    for f, c in incl.most_common(top):
        lines.append(f"{100 * c / total:6.1f}%  {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="collapsed stacks from bench.run --profile")
    p.add_argument("--top", type=int, default=30, help="rows per list (default 30)")
    p.add_argument("--filter", default="", help="only samples with a frame containing this")
    args = p.parse_args(argv)
    print(summarize(load(args.file), args.top, args.filter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
