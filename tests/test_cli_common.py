"""The five command lines behave alike: --version, one exit-status table, one duration syntax.

Real subprocesses (the installed entry points) against a real broker over mutual TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import pytest

from broker.server import Broker
from coalition import cli_common
from coalition.cli_common import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    duration_days,
    duration_ms,
    duration_s,
    parse_duration_ms,
    parse_time_ms,
)
from tests.helpers import admit, policy, running_broker
from tests.node_helpers import REPO, free_port, write_config

BIN = Path(sys.executable).parent
PROGRAMS = [
    "coalition-broker",
    "coalition-node",
    "coalition-admin",
    "coalition-keys",
    "coalition-demo",
]


async def run(*argv: str, cwd: Path = REPO, stdin: bytes = b"") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_")}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / argv[0]),
        *argv[1:],
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("prog", PROGRAMS)
async def test_version(prog: str) -> None:
    code, out, err = await run(prog, "--version")
    assert (code, err) == (0, ""), err
    assert out.strip() == f"{prog} {metadata.version('coalition')}"


@pytest.mark.parametrize("prog", PROGRAMS)
async def test_help_states_the_exit_statuses(prog: str) -> None:
    code, out, _ = await run(prog, "--help")
    assert code == 0
    assert "3 refused by the broker" in out and "4 broker unreachable" in out, out
    assert "500ms, 30s, 15m, 2h, 7d" in out


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    await admit(pki, b.port, policy("KOR"))
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def test_exit_statuses_are_the_same_everywhere(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    """Bad usage, a refusal and an unreachable broker, across the command lines."""
    closed = free_port()
    op = str(pki / "operators" / "op1")
    kor = write_config(tmp_path / "kor.toml", pki, "KOR", broker.port)
    kor_away = write_config(tmp_path / "away" / "kor.toml", pki, "KOR", closed)
    publish = ("publish", "--topic", "intel.ground", "--label")
    admin = ("coalition-admin", "--identity", op, "--broker")
    here, away = f"127.0.0.1:{broker.port}", f"127.0.0.1:{closed}"
    secret, top = "NATO SECRET // REL TO KOR", "NATO TOP SECRET // REL TO KOR"
    cases: list[tuple[str, list[str], int]] = [
        # bad usage: argparse's status 2, and a bad duration is bad usage too
        ("broker serve --bogus", ["coalition-broker", "serve", "--bogus"], EXIT_USAGE),
        ("broker bad duration", ["coalition-broker", "serve", "--clock-skew-ms", "soon"], 2),
        ("node no command", ["coalition-node"], EXIT_USAGE),
        ("node bad timeout", ["coalition-node", *publish, "X", "--timeout", "1y", "-"], 2),
        ("admin unknown command", ["coalition-admin", "bogus"], EXIT_USAGE),
        ("admin bad timeout", ["coalition-admin", "--timeout", "-1s", "stats"], EXIT_USAGE),
        ("keys bad validity", ["coalition-keys", "init-ca", "x", "--valid-days", "36h"], 2),
        ("demo bad deadline", ["coalition-demo", "--deadline-ms", "fast"], EXIT_USAGE),
        ("demo two scenarios", ["coalition-demo", "--cluster", "--federation"], EXIT_USAGE),
        # refused by the broker or by policy
        (
            "admin not found",
            [*admin, here, "partners", "show", "ZZZ"],
            EXIT_REFUSED,
        ),
        (
            "node no eligible recipient",
            ["coalition-node", *publish, secret, "--config", str(kor), "-"],
            EXIT_REFUSED,
        ),
        (
            "node above its ceiling",
            ["coalition-node", *publish, top, "--config", str(kor), "-"],
            EXIT_REFUSED,
        ),
        # unreachable
        (
            "admin unreachable",
            [*admin, away, "--timeout", "3s", "stats"],
            EXIT_UNREACHABLE,
        ),
        (
            "node unreachable",
            ["coalition-node", *publish, secret, "--config", str(kor_away), "--timeout", "3s", "-"],
            EXIT_UNREACHABLE,
        ),
    ]
    results = await asyncio.gather(*(run(*argv, cwd=tmp_path, stdin=b"x") for _, argv, _ in cases))
    got = {name: code for (name, _, _), (code, _, _) in zip(cases, results, strict=True)}
    want = {name: code for name, _, code in cases}
    assert got == want, [r[2] for r in results]
    for (name, _, _), (_, _, err) in zip(cases, results, strict=True):
        assert "Traceback" not in err, (name, err)


@pytest.mark.parametrize(
    ("text", "bare", "ms"),
    [
        ("500ms", "s", 500),
        ("30s", "s", 30_000),
        ("15m", "s", 900_000),
        ("2h", "s", 7_200_000),
        ("7d", "s", 604_800_000),
        ("1.5s", "s", 1500),
        (" 2H ", "s", 7_200_000),
        ("10", "s", 10_000),  # a bare number keeps the option's old unit
        ("250", "ms", 250),
        ("90", "d", 90 * 86_400_000),
        ("0", "ms", 0),
    ],
)
def test_parse_duration(text: str, bare: str, ms: int) -> None:
    assert parse_duration_ms(text, bare=bare) == ms


@pytest.mark.parametrize("text", ["", "soon", "1y", "-5s", "5 s", "ms", "1e3", "1.2.3s", "5sm"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration: use a number and a unit"):
        parse_duration_ms(text)


def test_duration_argparse_types() -> None:
    assert duration_s()("500ms") == 0.5 and duration_s()("10") == 10.0
    assert duration_ms()("2s") == 2000 and duration_ms()("2000") == 2000
    assert duration_days("90") == 90 and duration_days("48h") == 2 and duration_days("1d") == 1
    for bad, parse in (("0s", duration_s()), ("36h", duration_days), ("0d", duration_days)):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_parse_time() -> None:
    now = 1_750_000_000_000
    assert parse_time_ms("15m", now_ms=now) == now - 900_000
    assert parse_time_ms("500ms", now_ms=now) == now - 500
    assert parse_time_ms("1717228800000", now_ms=now) == 1717228800000
    assert parse_time_ms("2024-06-01T08:00:00Z") == 1717228800000
    assert parse_time_ms("2024-06-01T08:00:00") == 1717228800000
    with pytest.raises(ValueError, match="is not a time"):
        parse_time_ms("yesterday")


def test_exit_table_is_documented_once() -> None:
    """README.md carries the table; each --help carries the one-line form."""
    readme = (REPO / "README.md").read_text()
    for code in (
        cli_common.EXIT_OK,
        cli_common.EXIT_ERROR,
        cli_common.EXIT_USAGE,
        cli_common.EXIT_REFUSED,
        cli_common.EXIT_UNREACHABLE,
        cli_common.EXIT_AUDIT_BROKEN,
    ):
        assert f"\n| {code} |" in readme, code
