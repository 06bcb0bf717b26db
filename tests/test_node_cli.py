"""`coalition-node` as real subprocesses against a real broker over mTLS."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.server import Broker
from clients.node.inbox import Inbox
from coalition.labels import Classification
from tests.helpers import admit, eventually, partner, policy, running_broker
from tests.node_helpers import free_port, node, start_daemon, stop, write_config

SECRET = "NATO SECRET // REL TO KOR, USA"
BODY = "Armour moving north of the river\nthree companies, fuel trucks, no air cover seen\n"


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    await admit(pki, b.port, policy("GBR", level=Classification.CONFIDENTIAL))
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def wait_for_text(path: Path, text: str, timeout: float = 20.0) -> None:
    await eventually(lambda: path.exists() and text in path.read_text(), timeout)


HOOK = """import json, os, pathlib, sys
doc = json.load(sys.stdin)
out = pathlib.Path(sys.argv[1]) / (os.environ["COALITION_MESSAGE_ID"] + ".json")
out.write_text(json.dumps(doc))
"""


async def test_daemon_stores_and_commands_show_it(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (tmp_path / "hook.py").write_text(HOOK)
    usa = write_config(
        tmp_path / "usa" / "node.toml",
        pki,
        "USA",
        broker.port,
        extra=f'[hook]\ncommand = ["{sys.executable}", "{tmp_path / "hook.py"}", "{hooks}"]\n',
    )
    kor = write_config(tmp_path / "kor" / "node.toml", pki, "KOR", broker.port)
    log = tmp_path / "usa.log"
    daemon = await start_daemon(usa, log)
    try:
        await wait_for_text(log, "connected to")
        await wait_for_text(log, "caught up")
        pub = ("publish", "--config", str(kor), "--topic", "intel.ground", "--label", SECRET)
        first = await node(
            *pub, "--precedence", "FLASH", "--area", "Sector 4", "-", stdin=BODY.encode()
        )
        assert first.code == 0, first.err
        assert first.out.startswith("published ") and first.out.strip().endswith("sealed for USA")
        msg_id = first.out.split()[1]
        doc = json.dumps({"title": "Bridge down", "summary": "span collapsed", "reliability": "B"})
        second = await node(*pub, "--json", "-", stdin=doc.encode())
        assert second.code == 0, second.err
        res = json.loads(second.out)
        assert res["recipients"] == ["USA"] and res["recipient_sequences"] == {"USA": 2}

        inbox = Inbox(usa.parent / "usa-inbox.db")
        await eventually(lambda: inbox.counts() == (2, 0), 20)
        inbox.close()

        listing = await node("inbox", "--config", str(usa))
        assert listing.code == 0
        lines = listing.out.splitlines()
        assert lines[0].split()[:6] == ["TIME", "SENDER", "PRECEDENCE", "LABEL", "TOPIC", "TITLE"]
        assert "FLASH" in lines[1] and SECRET in lines[1] and "Armour moving north" in lines[1]
        assert "Bridge down" in lines[2]
        as_json = json.loads((await node("inbox", "--config", str(usa), "--json")).out)
        assert [e["title"] for e in as_json] == ["Armour moving north of the river", "Bridge down"]
        assert [e["recipient_sequence"] for e in as_json] == [1, 2]
        assert as_json[0]["sequence"] < as_json[1]["sequence"]  # across two publish processes
        filtered = await node("inbox", "--config", str(usa), "--topic", "intel.air.>", "--json")
        assert json.loads(filtered.out) == []

        shown = await node("show", "--config", str(usa), msg_id[:10])
        assert shown.code == 0
        assert "three companies" in shown.out and "area: Sector 4" in shown.out
        assert "grading: F6" in shown.out
        full = json.loads((await node("show", "--config", str(usa), msg_id, "--json")).out)
        assert full["content"]["summary"].startswith("Armour") and full["sender"] == "KOR"
        missing = await node("show", "--config", str(usa), "ffffffffff")
        assert missing.code == 1 and len(missing.err.strip().splitlines()) == 1

        status = json.loads((await node("status", "--config", str(usa), "--json")).out)
        assert status["quarantined"] == 0 and status["gaps"] == []
        assert status["last_connected_ms"] and status["senders"] == {"KOR": 2}
        plain = await node("status", "--config", str(usa))
        assert "2 messages, 0 quarantined" in plain.out

        await eventually(lambda: len(list(hooks.iterdir())) == 2, 20)
        hooked = json.loads((hooks / f"{msg_id}.json").read_text())
        assert hooked["sender"] == "KOR" and hooked["label"] == SECRET
        assert hooked["content"]["summary"].startswith("Armour")
    finally:
        assert await stop(daemon) == 0
    text = log.read_text()
    assert "stopped; inbox holds 2 messages" in text
    assert "three companies" not in text and "span collapsed" not in text  # never plaintext


async def test_publish_failures_are_one_line(pki: Path, tmp_path: Path, broker: Broker) -> None:
    async with partner(pki, "USA", broker.port) as usa:
        await usa.register_keys()
    kor = write_config(tmp_path / "kor.toml", pki, "KOR", broker.port)
    gbr = write_config(tmp_path / "gbr.toml", pki, "GBR", broker.port)
    base = ("publish", "--topic", "intel.ground", "-")

    none = await node(
        *base, "--config", str(kor), "--label", "NATO SECRET // REL TO KOR", stdin=b"x"
    )
    assert none.code == 3 and "no eligible recipient" in none.err
    assert len(none.err.strip().splitlines()) == 1

    # Above KOR's ceiling: the broker does not say who could receive it.
    above = await node(
        *base, "--config", str(kor), "--label", "NATO TOP SECRET // REL TO USA", stdin=b"x"
    )
    assert above.code == 3 and "above_origination_ceiling" in above.err, above.err
    assert "USA" not in above.err.replace("REL TO USA", "")
    assert len(above.err.strip().splitlines()) == 1

    # GBR may originate only up to CONFIDENTIAL; the broker refuses with a reason code.
    refused = await node(
        *base, "--config", str(gbr), "--label", "NATO SECRET // REL TO USA", stdin=b"x"
    )
    assert refused.code == 3, refused.err
    assert "above_origination_ceiling" in refused.err
    assert len(refused.err.strip().splitlines()) == 1

    bad_label = await node(*base, "--config", str(kor), "--label", "NATO SEKRET", stdin=b"x")
    assert bad_label.code == 2 and len(bad_label.err.strip().splitlines()) == 1

    empty = await node(*base, "--config", str(kor), "--label", SECRET, stdin=b"")
    assert empty.code == 2 and "empty" in empty.err


async def test_bad_config_and_keys_are_one_line(pki: Path, tmp_path: Path) -> None:
    missing = await node("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.code == 2 and "does not exist" in missing.err
    assert len(missing.err.strip().splitlines()) == 1

    bad = tmp_path / "bad.toml"
    bad.write_text("broker = [")
    malformed = await node("status", "--config", str(bad))
    assert malformed.code == 2 and "not valid TOML" in malformed.err

    # A partner directory whose signing key is another partner's.
    ident = tmp_path / "pki" / "partners" / "KOR"
    shutil.copytree(pki / "partners" / "KOR", ident)
    shutil.copytree(pki / "ca", tmp_path / "pki" / "ca")
    shutil.copy(pki / "partners" / "USA" / "signing.key", ident / "signing.key")
    cfg = write_config(tmp_path / "kor.toml", tmp_path / "pki", "KOR", 1)
    wrong = await node("run", "--config", str(cfg))
    assert wrong.code == 2 and "does not match" in wrong.err
    assert len(wrong.err.strip().splitlines()) == 1

    shutil.copy(pki / "partners" / "KOR" / "signing.key", ident / "signing.key")
    (ident / "tls.key").write_text("not a key")
    unreadable = await node(  # TLS key unreadable
        "publish", "--config", str(cfg), "--topic", "intel.x", "--label", SECRET, "-", stdin=b"x"
    )
    assert unreadable.code == 2 and "tls.key" in unreadable.err
    (ident / "tls.key").write_bytes((pki / "partners" / "USA" / "tls.key").read_bytes())
    mismatched = await node("status", "--config", str(cfg))
    assert mismatched.code == 0  # status reads the inbox only; no keys needed
    run = await node("run", "--config", str(cfg))
    assert run.code == 2 and "tls.key does not match" in run.err


async def test_daemon_waits_for_admission_and_reports_status(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    cfg = write_config(tmp_path / "ukr.toml", pki, "UKR", broker.port)
    log = tmp_path / "ukr.log"
    daemon = await start_daemon(cfg, log)
    try:
        await wait_for_text(log, "not admitted")
        assert "retrying in" in log.read_text()
        await admit(pki, broker.port, policy("UKR", level=Classification.RESTRICTED))
        await wait_for_text(log, "connected to")
    finally:
        assert await stop(daemon) == 0


async def test_unreachable_broker_is_retried_with_a_clear_status(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "usa.toml", pki, "USA", port)
    log = tmp_path / "usa.log"
    daemon = await start_daemon(cfg, log)
    try:
        await wait_for_text(log, f"broker 127.0.0.1:{port} unreachable")
        await wait_for_text(log, "retrying in")
    finally:
        assert await stop(daemon) == 0
    pub = await node(
        "publish", "--config", str(cfg), "--topic", "intel.x", "--label", SECRET, "-", stdin=b"x"
    )
    assert pub.code == 4 and len(pub.err.strip().splitlines()) == 1


async def test_sender_text_cannot_drive_the_terminal(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    """A title and summary holding ANSI escapes (clear screen, a forged line) are shown
    escaped by `inbox` and `show`: what a partner wrote never reaches the terminal raw."""
    usa = write_config(tmp_path / "usa" / "node.toml", pki, "USA", broker.port)
    kor = write_config(tmp_path / "kor" / "node.toml", pki, "KOR", broker.port)
    log = tmp_path / "usa.log"
    daemon = await start_daemon(usa, log)
    try:
        await wait_for_text(log, "caught up")
        evil = {"title": "ok\x1b[2J\rFORGED", "summary": "line one\nline two\x1b[31m red"}
        pub = ("publish", "--config", str(kor), "--topic", "intel.ground", "--label", SECRET)
        sent = await node(*pub, "--json", "-", stdin=json.dumps(evil).encode())
        assert sent.code == 0, sent.err
        msg_id = json.loads(sent.out)["message_id"]
        inbox = Inbox(usa.parent / "usa-inbox.db")
        await eventually(lambda: inbox.counts() == (1, 0), 20)
        inbox.close()
        listing = await node("inbox", "--config", str(usa))
        shown = await node("show", "--config", str(usa), msg_id)
        for out in (listing.out, shown.out):
            assert "\x1b" not in out and "\r" not in out, out
        assert "ok\\x1b[2J\\rFORGED" in listing.out
        assert "line one\nline two\\x1b[31m red" in shown.out  # its own lines are kept
        # --json carries the exact text (JSON escapes it).
        raw = json.loads((await node("inbox", "--config", str(usa), "--json")).out)
        assert raw[0]["title"] == evil["title"]
    finally:
        assert await stop(daemon) == 0
