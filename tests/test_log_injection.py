"""Log injection: whatever a client sends, the broker's log stays one line per record and
carries no raw control character. A real broker process, its real stderr; plus the
formatter itself, in text and JSON mode."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coalition import envelope as env
from coalition.hpke import HpkePrivateKey
from coalition.labels import label_to_proto, parse_label
from coalition.logfmt import StructuredFormatter, escape, text_value
from coalition.pki import load_partner
from coalition.v1 import envelope_pb2, exchange_pb2
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, now_ms, partner, policy

FORGED = "2026-11-30T00:00:00.000Z info    forged line partner=ROGUE reason=admitted"
# A newline, a carriage return, a forged record, and ANSI escapes (clear screen, red).
EVIL_ID = f"m1\n{FORGED}\r\n{FORGED}\x1b[2J\x1b[31m"


@pytest.fixture
def broker_proc(pki: Path, tmp_path: Path) -> Iterator[ConfiguredBroker]:
    b = ConfiguredBroker(pki, tmp_path / "data")
    try:
        yield b
    finally:
        b.cleanup()


async def test_forged_message_id_cannot_forge_a_log_line(
    pki: Path, broker_proc: ConfiguredBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await broker_proc.start()
    port = broker_proc.port
    await admit(pki, port, policy("KOR"))
    kor = load_partner(pki / "partners" / "KOR")

    def sealed(message_id: str) -> envelope_pb2.Envelope:
        # Signed with a key that is not KOR's certified key, and v1 where KOR's certificate
        # asks for v2 (hybrid_key_required): refused whatever else holds.
        return env.seal(
            plaintext=b"x",
            message_id=message_id,
            sender="KOR",
            signing_key=Ed25519PrivateKey.generate(),
            signing_key_id=kor.signing_key_id,
            sequence=1,
            topic="intel.a",
            label=label_to_proto(parse_label("NATO SECRET // REL TO KOR, USA")),
            precedence=1,
            content_type=env.INTEL_SUMMARY,
            recipients=[env.Recipient("USA", "k1", HpkePrivateKey.generate().public_key())],
            created_ms=now_ms(),
        )

    plain = sealed("m0")
    # An attacker does not use our seal(): switch off the header bounds it applies to
    # itself, so the broker sees the forged id (and refuses it as malformed).
    monkeypatch.setattr(env, "_scalar_problem", lambda header: "")
    evil = sealed(EVIL_ID)
    async with partner(pki, "KOR", port) as c:
        results = await c.publish([plain, evil])
    assert [(r.outcome, r.reason_code) for r in results] == [
        (exchange_pb2.REFUSED, "hybrid_key_required"),
        (exchange_pb2.REFUSED, "malformed"),
    ]
    assert "message_id" in results[1].reason
    broker_proc.signal(signal.SIGTERM)
    assert await broker_proc.wait_exit() == 0
    raw = broker_proc.log_bytes()
    text = raw.decode("utf-8", "replace")
    # No line of the log is the forged one, and no raw control byte got through ...
    forged = [line for line in text.splitlines() if line.startswith(FORGED[:24])]
    assert forged == [], text
    assert b"\x1b" not in raw
    assert b"\r" not in raw
    # ... and both refusals were logged, each on its own line.
    refusals = [line for line in text.splitlines() if "publish refused" in line]
    assert len(refusals) == 2, text
    assert "reason=malformed" in refusals[1]


# -- the formatter --------------------------------------------------------------------------


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("coalition.test", logging.INFO, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain", "plain"),
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("tab\there", "tab\\there"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("nul\x00del\x7fc1\x85", "nul\\x00del\\x7fc1\\x85"),
        ("line\u2028sep\u2029", "line\\u2028sep\\u2029"),
        ("back\\nslash", "back\\\\nslash"),  # a literal backslash-n stays distinguishable
        ("é ok", "é ok"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("abc", "abc"),
        ("a b", '"a b"'),
        ("k=v", '"k=v"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("", '""'),
        (42, "42"),
        (None, "None"),
        ("x\ny=1", '"x\\ny=1"'),
    ],
)
def test_text_value_quotes_what_could_split_a_field(value: object, shown: str) -> None:
    assert text_value(value) == shown


def test_text_mode_keeps_one_record_on_one_line() -> None:
    fmt = StructuredFormatter(as_json=False)
    line = fmt.format(
        _record(
            "refused %s",
            f"x\n{FORGED}\x1b[0m",
            message_id=EVIL_ID,
            reason="bad signature",
            partner="KOR",
        )
    )
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    # Every field still reads back: split on the spaces outside quotes.
    assert line.endswith(" partner=KOR")
    assert ' reason="bad signature" ' in line
    assert 'message_id="m1\\n2026-11-30T00:00:00.000Z info    forged line' in line


def test_json_mode_escapes_every_control_character() -> None:
    fmt = StructuredFormatter(as_json=True)
    out = fmt.format(_record("m\n%s", "\x1b[2J", message_id=EVIL_ID + "\x7f\x85\u2028"))
    assert "\n" not in out and "\r" not in out
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
    doc = json.loads(out)
    assert doc["message_id"] == EVIL_ID + "\x7f\x85\u2028"  # lossless
    assert doc["msg"] == "m\n\x1b[2J"


def test_the_node_format_escapes_its_message_too() -> None:
    fmt = StructuredFormatter(as_json=False, show_extra=False)
    line = fmt.format(_record("received %s", "id\n" + FORGED))
    assert "\n" not in line
    assert line.endswith("received id\\n" + FORGED)


def test_a_traceback_stays_on_its_record_line() -> None:
    try:
        raise ValueError(f"bad id\n{FORGED}")
    except ValueError:
        rec = logging.LogRecord(
            "coalition.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = StructuredFormatter(as_json=False).format(rec)
    assert "\n" not in line
    assert ' failed exc="Traceback (most recent call last):\\n' in line
    assert "ValueError: bad id\\n2026-11-30T00:00:00.000Z info    forged line" in line
    doc = json.loads(StructuredFormatter(as_json=True).format(rec))
    assert doc["exc"].endswith(f"ValueError: bad id\n{FORGED}")
