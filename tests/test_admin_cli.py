"""`coalition-admin` as an operator runs it: real subprocesses against a real broker over mTLS."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.server import Broker
from clients.admin import cli as admin_cli
from clients.admin.policy_flags import FlagError, parse_level, parse_policy_level
from coalition.labels import Classification
from tests.helpers import admit, partner, policy, running_broker

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    try:
        yield b
    finally:
        await b.stop(grace=1)


_PYC: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Let the CLI subprocesses share compiled bytecode, kept outside the source tree."""
    _PYC.append(tmp_path_factory.mktemp("pyc"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_")}
    if _PYC:  # about a third of each run's CPU is compiling when bytecode is not written
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(_PYC[0])
    env.update(extra)
    return env


async def cli(
    *args: str,
    broker: Broker | None = None,
    pki: Path | None = None,
    op: str | None = "op1",
    env: dict[str, str] | None = None,
) -> Run:
    """Run coalition-admin in a subprocess; the in-process broker keeps serving meanwhile."""
    argv = [sys.executable, "-m", "clients.admin.cli"]
    if broker is not None:
        argv += ["--broker", f"127.0.0.1:{broker.port}"]
    if pki is not None and op is not None:
        argv += ["--identity", str(pki / "operators" / op)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        *args,
        cwd=ROOT,
        env=env if env is not None else _env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def one_error_line(r: Run, code: int) -> str:
    """Assert a failure with exit status `code` and exactly one stderr line; return it."""
    assert r.code == code, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("coalition-admin: ")
    assert "PRIVATE KEY" not in r.out + r.err
    return lines[0]


KOR_FLAGS = (
    "--clearance", "NATO=SECRET", "--ceiling", "NS", "--group", "NATO",
    "--publish", "intel.>", "--subscribe", "intel.>",
)  # fmt: skip


async def admit_kor(broker: Broker, pki: Path) -> None:
    """Set-up: KOR admitted in-process (op1 proposes, op2 approves) with KOR_FLAGS' policy."""
    await admit(pki, broker.port, policy("KOR"))


# -- the two-person rule, end to end ------------------------------------------------------


async def test_admit_needs_a_second_operator(broker: Broker, pki: Path) -> None:
    cert = str(pki / "partners" / "KOR" / "signing.crt")
    r = await cli("partners", "admit", "kor", "--signing-cert", cert, *KOR_FLAGS,
                  "--reason", "MoU 2025-14", broker=broker, pki=pki)  # fmt: skip
    assert r.code == 0, r
    assert "proposal " in r.out and "needs approval by a second operator" in r.out
    assert "+clearance NATO: SECRET" in r.out and "+group NATO" in r.out
    [props] = (await cli("policy", "proposals", "--json", broker=broker, pki=pki)).json().values()
    [prop] = props
    pid = prop["proposal_id"]
    assert (prop["state"], prop["proposed_by"], prop["policy"]["partner"]) == (
        "PROPOSAL_PENDING",
        "op1",
        "KOR",
    )
    assert prop["proposed_utc"].endswith("Z")

    line = one_error_line(await cli("policy", "approve", pid, broker=broker, pki=pki), 3)
    assert line.startswith("coalition-admin: PERMISSION_DENIED: operator op1 proposed")
    assert "cannot also approve it" in line

    listed = (await cli("partners", "list", "--json", broker=broker, pki=pki)).json()
    assert listed["partners"][0]["status"] == "PENDING"

    r = await cli("policy", "approve", pid, "--reason", "checked", broker=broker, pki=pki, op="op2")
    assert r.code == 0, r
    assert f"proposal {pid} approved: applied as version 2 of KOR" in r.out

    r = await cli("partners", "list", broker=broker, pki=pki)
    assert r.code == 0, r
    header, row = r.out.splitlines()
    assert header.split() == ["PARTNER", "STATUS", "VERSION", "CONNECTED", "KEY", "ID"]
    assert row.split()[:4] == ["KOR", "ACTIVE", "2", "no"]
    assert header.index("STATUS") == row.index("ACTIVE")  # aligned columns
    listed = (await cli("--json", "partners", "list", broker=broker, pki=pki)).json()
    assert [(p["partner"], p["status"]) for p in listed["partners"]] == [("KOR", "ACTIVE")]


async def test_admit_twice_and_bad_cert_are_refused(
    broker: Broker, pki: Path, tmp_path: Path
) -> None:
    await admit_kor(broker, pki)
    cert = str(pki / "partners" / "KOR" / "signing.crt")
    args = ("--clearance", "NATO=SECRET", "--reason", "again")
    r = await cli("partners", "admit", "KOR", "--signing-cert", cert, *args, broker=broker, pki=pki)
    assert "ALREADY_EXISTS: partner KOR is already registered" in one_error_line(r, 3)
    # USA's certificate offered for GBR: the broker checks the certificate names the partner.
    usa = str(pki / "partners" / "USA" / "signing.crt")
    r = await cli("partners", "admit", "GBR", "--signing-cert", usa, *args, broker=broker, pki=pki)
    assert "INVALID_ARGUMENT: signing certificate refused" in one_error_line(r, 3)
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")
    r = await cli("partners", "admit", "GBR", "--signing-cert", str(junk), *args,
                  broker=broker, pki=pki)  # fmt: skip
    assert "is not a PEM or DER certificate" in one_error_line(r, 2)


# -- policy -------------------------------------------------------------------------------


async def test_partners_show_and_policy_show(broker: Broker, pki: Path) -> None:
    await admit_kor(broker, pki)
    async with partner(pki, "KOR", broker.port) as kor:
        key_id = await kor.register_keys()
    r, js, p, pj, missing = await asyncio.gather(
        cli("partners", "show", "KOR", broker=broker, pki=pki),
        cli("partners", "show", "KOR", "--json", broker=broker, pki=pki),
        cli("policy", "show", "kor", broker=broker, pki=pki),
        cli("policy", "show", "KOR", "--json", broker=broker, pki=pki),
        cli("policy", "show", "XYZ", broker=broker, pki=pki),
    )
    assert r.code == 0, r
    assert "status:" in r.out and "ACTIVE" in r.out
    assert key_id in r.out and "signing cert sha256:" in r.out
    assert "approved by:" in r.out and "op2" in r.out
    shown = js.json()
    assert shown["summary"]["key_id"] == key_id
    assert shown["policy"]["policy"]["clearances"] == [{"policy": "NATO", "level": "SECRET"}]
    bytes.fromhex(shown["directory"]["signing_cert"])  # bytes are hex

    assert p.code == 0, p
    assert "clearances:" in p.out and "NATO SECRET" in p.out and "intel.>" in p.out
    v = pj.json()
    assert (v["version"], v["changed_by"], v["approved_by"]) == (2, "op1", "op2")
    assert v["policy"]["status"] == "ACTIVE"
    assert v["policy"]["origination_ceilings"] == [{"policy": "NATO", "level": "SECRET"}]
    assert isinstance(v["changed_ms"], int) and v["changed_utc"].endswith("Z")
    assert one_error_line(missing, 3).startswith("coalition-admin: NOT_FOUND:")


async def test_lowering_applies_at_once(broker: Broker, pki: Path) -> None:
    await admit_kor(broker, pki)
    r = await cli("policy", "set", "KOR", "--clearance", "nato=confidential",
                  "--remove-group", "NATO", "--reason", "downgrade",
                  broker=broker, pki=pki)  # fmt: skip
    assert r.code == 0, r
    assert "policy of KOR: applied as version 3\n" in r.out
    assert "clearance NATO: SECRET -> CONFIDENTIAL" in r.out and "-group NATO" in r.out
    r = await cli("policy", "set", "KOR", "--rate", "5", "--reason", "x", "--json",
                  broker=broker, pki=pki)  # fmt: skip
    assert r.code == 0, r  # 0 (broker default) -> 5 may raise: proposed
    assert r.json()["result"] == "proposal"
    r = await cli("policy", "propose", "KOR", "--remove-subscribe", "intel.>", "--json",
                  "--reason", "y", broker=broker, pki=pki)  # fmt: skip
    body = r.json()
    assert (body["result"], body["applied"]["version"], body["proposal"]) == ("applied", 4, None)
    assert body["applied"]["policy"]["subscribe_topics"] == []


async def test_raising_is_proposed_then_rejected(broker: Broker, pki: Path) -> None:
    await admit_kor(broker, pki)
    r = await cli("policy", "propose", "KOR", "--clearance", "NATO=TOP SECRET",
                  "--category", "OPS=alpha,BRAVO", "--reason", "op ALPHA",
                  broker=broker, pki=pki)  # fmt: skip
    assert r.code == 0, r
    assert "needs approval by a second operator" in r.out
    assert "clearance NATO: SECRET -> TOP SECRET" in r.out
    assert "+category OPS: ALPHA" in r.out and "+category OPS: BRAVO" in r.out
    r = await cli("policy", "proposals", broker=broker, pki=pki)
    assert r.code == 0, r
    header, row = r.out.splitlines()
    assert header.split()[:4] == ["ID", "PARTNER", "STATE", "BY"]
    pid = row.split()[0]
    assert row.split()[1:4] == ["KOR", "PENDING", "op1"]
    impact = (await cli("policy", "impact", pid, "--json", broker=broker, pki=pki)).json()
    assert impact["partner"] == "KOR" and impact["loses_receive"] == []
    assert "NATO TOP SECRET // REL TO KOR" in impact["gains_receive"]
    assert "NATO SECRET // REL TO KOR // RESTRICTIVE OPS: ALPHA" in impact["gains_receive"]
    assert "NATO SECRET // REL TO KOR // RESTRICTIVE OPS: BRAVO" in impact["gains_receive"]
    assert impact["gains_subscribe"] == impact["loses_publish"] == []
    text = (await cli("policy", "impact", pid, broker=broker, pki=pki)).out
    assert f"proposal {pid} for KOR:" in text and "  gains receive:" in text
    r = await cli("policy", "reject", pid, "--reason", "no", broker=broker, pki=pki, op="op2")
    assert r.code == 0, r
    assert f"proposal {pid} rejected by op2" in r.out
    assert "no pending proposal" in one_error_line(
        await cli("policy", "impact", pid, broker=broker, pki=pki), 2
    )
    assert (await cli("policy", "proposals", broker=broker, pki=pki)).out.splitlines()[1:] == []
    every = (await cli("policy", "proposals", "--all", "--json", broker=broker, pki=pki)).json()
    states = {p["proposal_id"]: p["state"] for p in every["proposals"]}
    assert states[pid] == "PROPOSAL_REJECTED"
    r = await cli("policy", "approve", pid, broker=broker, pki=pki, op="op2")
    assert "FAILED_PRECONDITION" in one_error_line(r, 3)
    assert (await cli("policy", "show", "KOR", "--json", broker=broker, pki=pki)).json()[
        "version"
    ] == 2


async def test_history_and_stale_version(broker: Broker, pki: Path) -> None:
    await admit_kor(broker, pki)
    r = await cli("policy", "set", "KOR", "--remove-publish", "intel.>", "--expected-version",
                  "1", "--reason", "late", broker=broker, pki=pki)  # fmt: skip
    line = one_error_line(r, 3)
    assert "FAILED_PRECONDITION: policy of KOR is at version 2, not 1" in line
    r = await cli("policy", "history", "KOR", broker=broker, pki=pki)
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "CHANGED"]
    assert [ln.split()[0] for ln in lines[1:]] == ["1", "2"]
    hist = (await cli("policy", "history", "KOR", "--json", broker=broker, pki=pki)).json()
    assert [v["version"] for v in hist["versions"]] == [1, 2]
    assert hist["versions"][1]["reason"] == "test" and hist["versions"][1]["approved_by"] == "op2"


async def test_suspend_applies_and_reinstate_is_a_proposal(broker: Broker, pki: Path) -> None:
    await admit_kor(broker, pki)
    r = await cli("suspend", "KOR", "--reason", "suspected compromise", broker=broker, pki=pki)
    assert r.code == 0, r
    assert "suspend KOR: applied as version 3\n" in r.out
    assert "status: ACTIVE -> SUSPENDED" in r.out
    r = await cli("reinstate", "KOR", "--reason", "keys rotated", "--json", broker=broker, pki=pki)
    assert r.code == 0, r
    pid = r.json()["proposal"]["proposal_id"]
    listed = (await cli("partners", "list", "--json", broker=broker, pki=pki)).json()
    assert listed["partners"][0]["status"] == "SUSPENDED"
    r = await cli("policy", "approve", pid, broker=broker, pki=pki, op="op2")
    assert r.code == 0 and "status: SUSPENDED -> ACTIVE" in r.out, r


# -- audit, stats, who-receives ------------------------------------------------------------


async def test_audit_tail_query_verify_export(broker: Broker, pki: Path, tmp_path: Path) -> None:
    await admit_kor(broker, pki)
    out = tmp_path / "audit.jsonl"
    r, tail, q1, q2, q3, q4, ver, verj, exp, exp_stdout = await asyncio.gather(
        cli("audit", "tail", "-n", "3", broker=broker, pki=pki),
        cli("audit", "tail", "-n", "2", "--json", broker=broker, pki=pki),
        cli("audit", "query", "--partner", "KOR", "--kind", "policy", "--since", "1h", "--json",
            broker=broker, pki=pki),
        cli("audit", "query", "--until", "2000-01-01T00:00:00Z", "--json", broker=broker, pki=pki),
        cli("audit", "query", "--limit", "1", broker=broker, pki=pki),
        cli("audit", "query", "--since", "yesterday", broker=broker, pki=pki),
        cli("audit", "verify", broker=broker, pki=pki),
        cli("audit", "verify", "--json", broker=broker, pki=pki),
        cli("audit", "export", "--out", str(out), broker=broker, pki=pki),
        cli("audit", "export", broker=broker, pki=pki),
    )  # fmt: skip
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "KIND", "ACTOR", "PARTNER", "DECISION", "DETAIL"]
    assert len(lines) == 4
    seqs = [e["seq"] for e in tail.json()["entries"]]
    assert len(seqs) == 2 and seqs == sorted(seqs)
    assert len(bytes.fromhex(tail.json()["entries"][0]["hash"])) == 32

    kinds = {e["kind"] for e in q1.json()["entries"]}
    assert kinds == {"policy.proposed", "policy.approved", "policy.change"}
    assert {e["partner"] for e in q1.json()["entries"]} == {"KOR"}
    assert q2.json() == {"entries": []}
    assert len(q3.out.splitlines()) == 2
    assert "is not a time" in one_error_line(q4, 2)

    assert ver.code == 0, ver
    assert ver.out.startswith("OK: ") and "entries chained" in ver.out
    v = verj.json()
    assert v["ok"] is True and v["entries"] > 0 and v["first_broken_seq"] == 0

    assert exp.code == 0 and "exported" in exp.out, exp
    records = [json.loads(line) for line in out.read_text().splitlines()]
    entries = [x for x in records if x["record"] == "entry"]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert entries[1]["prev_hash"] == entries[0]["hash"]
    assert [json.loads(line)["record"] for line in exp_stdout.out.splitlines()][:1] == ["entry"]


async def test_audit_verify_reports_the_first_broken_entry(
    broker: Broker, pki: Path, tmp_path: Path
) -> None:
    await admit_kor(broker, pki)
    with sqlite3.connect(tmp_path / "broker" / "audit.db") as raw:
        raw.execute("DROP TRIGGER IF EXISTS entries_append_only_update")
        raw.execute("UPDATE entries SET decision = 'forged' WHERE seq = 2")
    r = await cli("audit", "verify", broker=broker, pki=pki)
    assert r.code == 5, r
    assert r.out.startswith("BROKEN at entry 2:")
    v = await cli("audit", "verify", "--json", broker=broker, pki=pki)
    assert v.code == 5 and v.json()["first_broken_seq"] == 2


async def test_audit_tail_follow_prints_new_entries(broker: Broker, pki: Path) -> None:
    argv = [sys.executable, "-m", "clients.admin.cli", "--broker", f"127.0.0.1:{broker.port}",
            "--identity", str(pki / "operators" / "op1")]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, "audit", "tail", "-f", "--interval", "0.1", "--json",
        cwd=ROOT, env=_env(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        await admit_kor(broker, pki)
        seen: list[str] = []
        while "policy.change" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            seen.append(json.loads(line)["kind"])
        assert "partner.registered" in seen
    finally:
        proc.terminate()
        await proc.wait()


async def test_stats(broker: Broker, pki: Path) -> None:
    await admit_kor(broker, pki)
    r, js = await asyncio.gather(
        cli("stats", broker=broker, pki=pki), cli("stats", "--json", broker=broker, pki=pki)
    )
    assert r.code == 0, r
    assert "audit entries:" in r.out and "PUBLISHED" in r.out
    s = js.json()
    assert s["audit_entries"] > 0 and s["live_streams"] == 0
    assert s["partners"][0]["partner"] == "KOR" and s["partners"][0]["published"] == 0


async def test_who_receives_gives_reasons(broker: Broker, pki: Path) -> None:
    for code in ("KOR", "USA"):
        await admit(pki, broker.port, policy(code))
    await admit(pki, broker.port, policy("UKR", level=Classification.RESTRICTED))
    async with partner(pki, "KOR", broker.port) as kor:
        await kor.register_keys()
    args = ("who-receives", "--label", "NATO SECRET // REL TO KOR, UKR", "--topic", "intel.x")
    r, js, bad_label, bad_topic = await asyncio.gather(
        cli(*args, broker=broker, pki=pki),
        cli(*args, "--json", broker=broker, pki=pki),
        cli("who-receives", "--label", "NATO SECRET // REL TO", "--topic", "intel.x",
            broker=broker, pki=pki),
        cli("who-receives", "--label", "NS // REL TO KOR", "--topic", "Intel X",
            broker=broker, pki=pki),
    )  # fmt: skip
    assert r.code == 0, r
    assert "1 of 3 partners receive it" in r.out
    rows = {ln.split()[0]: ln.split()[1:3] for ln in r.out.splitlines()[2:]}
    assert rows == {
        "KOR": ["yes", "allow"],
        "USA": ["no", "not_releasable"],
        "UKR": ["no", "above_clearance"],
    }
    body = js.json()
    assert body["label"] == "NATO SECRET // REL TO KOR, UKR" and body["topic"] == "intel.x"
    why = {d["partner"]: d for d in body["decisions"]}
    assert why["KOR"]["allowed"] is True
    assert "RESTRICTED" in why["UKR"]["explanation"]
    assert "bad label" in one_error_line(bad_label, 2)
    assert "topic" in one_error_line(bad_topic, 2)


# -- identities and error paths --------------------------------------------------------------


async def test_unknown_operator_is_refused(broker: Broker, pki: Path) -> None:
    r = await cli("partners", "list", broker=broker, pki=pki, op="op3")
    line = one_error_line(r, 3)
    assert line == "coalition-admin: UNAUTHENTICATED: operator op3 is not authorized on this broker"


async def test_partner_certificate_is_not_an_operator(broker: Broker, pki: Path) -> None:
    r = await cli("--identity", str(pki / "partners" / "KOR"), "partners", "list", broker=broker)
    line = one_error_line(r, 2)
    assert "urn:coalition:partner:KOR" in line and "not an operator" in line


async def test_identity_missing_or_incomplete(broker: Broker, pki: Path, tmp_path: Path) -> None:
    half = tmp_path / "operators" / "op9"
    half.mkdir(parents=True)
    (half / "ca.crt").write_bytes((pki / "ca" / "ca.crt").read_bytes())
    # The environment names broker and identity just as well.
    env = _env(COALITION_BROKER=f"127.0.0.1:{broker.port}",
               COALITION_OPERATOR=str(pki / "operators" / "op2"))  # fmt: skip
    none, nodir, incomplete, from_env = await asyncio.gather(
        cli("partners", "list", broker=broker),
        cli("--identity", str(tmp_path / "nope"), "stats", broker=broker),
        cli("--identity", str(half), "stats", broker=broker),
        cli("stats", "--json", env=env),
    )
    assert "pass --identity DIR or set COALITION_OPERATOR" in one_error_line(none, 2)
    assert "no operator directory" in one_error_line(nodir, 2)
    assert "tls.crt" in one_error_line(incomplete, 2)
    assert from_env.code == 0 and "audit_entries" in from_env.json(), from_env


async def test_unreachable_broker(pki: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = await cli("--broker", f"127.0.0.1:{port}", "--timeout", "3", "partners", "list", pki=pki)
    line = one_error_line(r, 4)
    assert line.startswith(f"coalition-admin: broker at 127.0.0.1:{port} unreachable")
    r = await cli("--broker", "localhost", "stats", pki=pki)
    assert "expected HOST:PORT" in one_error_line(r, 2)


async def test_usage_errors(broker: Broker, pki: Path) -> None:
    await admit_kor(broker, pki)
    set_kor = ("--broker", f"127.0.0.1:{broker.port}", "--identity",
               str(pki / "operators" / "op1"), "policy", "set", "KOR")  # fmt: skip
    no_flag, bad_level, same, bad_topic, no_reason = await asyncio.gather(
        cli(*set_kor, "--reason", "x"),
        cli(*set_kor, "--clearance", "NATO=SEKRET", "--reason", "x"),
        cli(*set_kor, "--clearance", "NATO=SECRET", "--reason", "x"),
        cli(*set_kor, "--publish", "Intel..x", "--reason", "x"),
        cli("suspend", "KOR", broker=broker, pki=pki),
    )
    assert "give at least one policy flag" in one_error_line(no_flag, 2)
    assert "'SEKRET' is not a classification" in one_error_line(bad_level, 2)
    assert "nothing to change" in one_error_line(same, 2)
    assert "publish_topics" in one_error_line(bad_topic, 2)
    assert no_reason.code == 2 and "--reason" in no_reason.err
    r = await cli("--help")
    assert r.code == 0 and "examples:" in r.out and "exit status" in r.out, r


def test_every_command_has_help_with_examples() -> None:
    def leaves(p: argparse.ArgumentParser, path: str) -> list[tuple[str, str]]:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [(path, p.format_help())]
        return [x for name, c in subs[0].choices.items() for x in leaves(c, f"{path} {name}")]

    found = leaves(admin_cli.parser(), "coalition-admin")
    # The 17 Admin operations, audit tail, the propose alias and policy impact, and the
    # five federation commands.
    assert len(found) == 25
    for path, text in found:
        assert "examples:\n  coalition-admin" in text, path
        assert "--json" in text and "--identity" in text, path


def test_classification_words() -> None:
    assert parse_level("SECRET") is Classification.SECRET
    assert parse_level("top secret") is Classification.TOP_SECRET
    assert parse_level("TOP_SECRET") is parse_level("top-secret") is Classification.TOP_SECRET
    assert parse_level("NC") is Classification.CONFIDENTIAL
    assert parse_policy_level("NS") == ("NATO", Classification.SECRET)
    assert parse_policy_level("eu=restricted") == ("EU", Classification.RESTRICTED)
    with pytest.raises(FlagError):
        parse_policy_level("SECRET")


def test_tables_escape_what_partners_wrote() -> None:
    """Audit details and partner-supplied values reach an operator's terminal escaped."""
    from clients.admin.render import fields, table

    out = table(["KIND", "DETAIL"], [["publish.refused", '{"reason": "x\x1b[2J\nFORGED"}']])
    assert "\x1b" not in out and "\nFORGED" not in out
    assert "x\\x1b[2J\\nFORGED" in out
    assert fields([("reason", "a\rb")]) == "reason:  a\\rb"
