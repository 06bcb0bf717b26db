"""What every Coalition command line shares: the version, the exit statuses, durations.

Exit statuses (the same for coalition-broker, -node, -admin, -keys and -demo):

====  ==========================================================================
0     done
1     failed: an error not listed below (a local file, a message not found, a
      demo expectation that did not hold, a broker that cannot start)
2     bad usage or local input: arguments, config file, identity, label, file
3     refused by the broker or by policy (nothing changed on the broker's side)
4     the broker is unreachable or did not answer in time
5     ``coalition-admin audit verify`` found the audit chain broken
130   interrupted (Ctrl-C)
====  ==========================================================================

Durations are written with a unit: ``500ms``, ``30s``, ``15m``, ``2h``, ``7d``. A bare
number keeps the unit the option always had (``--timeout 10`` is ten seconds,
``--clock-skew-ms 500`` half a second, ``--valid-days 90`` ninety days).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from collections.abc import Callable
from importlib import metadata

from coalition.clock import wall_clock_ms

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4
EXIT_AUDIT_BROKEN = 5
EXIT_INTERRUPTED = 130

EXIT_EPILOG = (
    "exit status: 0 done, 1 failed, 2 bad usage or input, 3 refused by the broker or\n"
    "policy, 4 broker unreachable or no answer in time, 5 audit chain broken (see README.md).\n"
    "durations: 500ms, 30s, 15m, 2h, 7d (a bare number keeps the option's own unit)."
)

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_AGE = re.compile(r"\d+(?:\.\d+)?(?:ms|s|m|h|d)")


def version(prog: str) -> str:
    """``coalition-node 0.1.0``: the program name and the installed package's version."""
    try:
        v = metadata.version("coalition")
    except metadata.PackageNotFoundError:  # running from a tree that was never installed
        v = "0+unknown"
    return f"{prog} {v}"


def add_version(p: argparse.ArgumentParser, prog: str) -> None:
    """``--version``: print the program and package version, exit 0."""
    p.add_argument("--version", action="version", version=version(prog))


def parse_duration_ms(text: str, *, bare: str = "s") -> int:
    """``500ms``, ``30s``, ``15m``, ``2h``, ``7d`` -> milliseconds; a bare number is in `bare`.

    Raises ValueError with a sentence naming the accepted forms.
    """
    m = _DURATION.fullmatch(text.strip().lower())
    if not m:
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit, e.g. 500ms, 30s, 15m, 2h, 7d"
        )
    value, unit = float(m.group(1)), m.group(2) or bare
    return round(value * _UNIT_MS[unit])


def duration_s(bare: str = "s") -> Callable[[str], float]:
    """An argparse ``type=``: a positive duration in seconds (float)."""

    def parse(text: str) -> float:
        ms = _checked(text, bare)
        if ms <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive")
        return ms / 1000

    parse.__name__ = "duration"
    return parse


def duration_ms(bare: str = "ms") -> Callable[[str], int]:
    """An argparse ``type=``: a duration in whole milliseconds (int, zero allowed)."""

    def parse(text: str) -> int:
        return _checked(text, bare)

    parse.__name__ = "duration"
    return parse


def duration_days(text: str) -> int:
    """An argparse ``type=``: a validity in whole days (``90``, ``90d``, ``48h``)."""
    ms = _checked(text, "d")
    days, rest = divmod(ms, _UNIT_MS["d"])
    if rest or days < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of days, e.g. 90 or 90d")
    return days


def _checked(text: str, bare: str) -> int:
    try:
        return parse_duration_ms(text, bare=bare)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_time_ms(text: str, *, now_ms: int | None = None) -> int:
    """A point in time -> Unix milliseconds.

    ISO-8601 (UTC unless a zone is given), Unix milliseconds (digits only), or an age
    with a unit (``15m``, ``2h``, ``7d``: that long before now). Raises ValueError.
    """
    t = text.strip()
    if t.isdigit():
        return int(t)
    if _AGE.fullmatch(t.lower()):
        now = wall_clock_ms() if now_ms is None else now_ms
        return now - parse_duration_ms(t)
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO-8601 (2025-05-01T12:00:00Z), Unix ms, "
            "or an age (30s, 15m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)
