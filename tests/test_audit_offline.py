"""`coalition-admin audit verify --file EXPORT --ca CA_CERT`: an export verified with no broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.admin import cli as admin_cli
from coalition.audit_chain import entry_hash, sign_checkpoint
from coalition.identity import Identity
from coalition.labels import parse_label
from coalition.pki import create_ca, issue_signing_cert
from coalition.v1 import audit_pb2
from tests.helpers import admit, now_ms, partner, policy, running_broker
from tests.test_admin_cli import cli

EXIT_AUDIT_BROKEN = 5
LABEL = parse_label("NATO SECRET // REL TO USA")
TOPIC = "intel.ground"


@pytest.fixture
async def export(pki: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """A real broker's log (several checkpoints) exported by the CLI; the broker is then gone."""
    broker = await running_broker(pki, tmp_path / "broker", audit_checkpoint_every=3)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, broker.port, policy(code))
        # Published and delivered messages: entries drained from the store's outbox.
        async with partner(pki, "USA", broker.port) as usa, partner(pki, "KOR", broker.port) as kor:
            await usa.register_keys()
            sealed = [await kor.seal(b"r%d" % i, topic=TOPIC, label=LABEL, recipients=["USA"])
                      for i in range(3)]  # fmt: skip
            await kor.publish([s.envelope for s in sealed])
            sub = usa.subscribe(["intel.>"])
            it = aiter(sub)
            got = [await asyncio.wait_for(anext(it), 10) for _ in sealed]
            await sub.ack([d.offset for d in got])
            await sub.aclose()
        out = tmp_path / "export.jsonl"
        r = await cli("audit", "export", "--out", str(out), broker=broker, pki=pki)
        assert r.code == 0, r
    finally:
        await broker.stop(grace=1)
    return [json.loads(line) for line in out.read_text().splitlines()]


def _write(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    f = tmp_path / "copy.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f


async def _verify(
    capsys: pytest.CaptureFixture[str], pki: Path, f: Path, *extra: str
) -> tuple[int, Any, str]:
    """Offline verify in-process (no broker address, no operator identity); --json verdict."""
    argv = ["audit", "verify", "--file", str(f), "--ca", str(pki / "ca" / "ca.crt"), "--json"]
    code = await asyncio.to_thread(admin_cli.main, [*argv, *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def _entries(records: list[dict[str, Any]]) -> list[int]:
    return [i for i, r in enumerate(records) if r["record"] == "entry"]


async def test_an_export_verifies_offline(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kinds = [r["record"] for r in export]
    assert kinds[-1] == "audit_certificate" and kinds.count("audit_certificate") == 1
    assert kinds.count("checkpoint") >= 3
    drained = [r["kind"] for r in export if r["record"] == "entry"]
    assert drained.count("publish.accepted") == 3 and "deliver" in drained
    code, v, err = await _verify(capsys, pki, _write(tmp_path, export))
    assert code == 0, v
    assert v["ok"] is True and v["broker"] == "broker"
    assert v["entries"] == kinds.count("entry") and v["checkpoints"] == kinds.count("checkpoint")
    # Human output, through a real subprocess with no broker anywhere.
    r = await cli("audit", "verify", "--file", str(_write(tmp_path, export)),
                  "--ca", str(pki / "ca" / "ca.crt"), op=None)  # fmt: skip
    assert r.code == 0 and r.out.startswith("OK: "), r
    # An older export without the certificate line verifies with --audit-cert.
    older = [r for r in export if r["record"] != "audit_certificate"]
    code, v, err = await _verify(capsys, pki, _write(tmp_path, older))
    assert code == 2 and v is None and "no audit certificate" in err, err
    code, v, err = await _verify(
        capsys, pki, _write(tmp_path, older), "--audit-cert", str(pki / "broker" / "audit.crt")
    )
    assert code == 0 and v["ok"] is True


async def test_a_changed_detail_names_its_entry(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    i = _entries(export)[3]
    export[i]["detail_json"] = export[i]["detail_json"].replace("}", ',"x":1}', 1)
    code, v, _err = await _verify(capsys, pki, _write(tmp_path, export))
    assert code == EXIT_AUDIT_BROKEN and v["first_broken_seq"] == export[i]["seq"] == 4, v
    assert "does not match its content" in v["problem"]


async def test_a_deleted_entry_is_named(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    del export[_entries(export)[4]]
    code, v, _err = await _verify(capsys, pki, _write(tmp_path, export))
    assert code == EXIT_AUDIT_BROKEN and v["first_broken_seq"] == 5, v
    assert "missing" in v["problem"]


async def test_reordered_entries_are_named(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _entries(export)[5], _entries(export)[6]
    export[a], export[b] = export[b], export[a]
    code, v, _err = await _verify(capsys, pki, _write(tmp_path, export))
    assert code == EXIT_AUDIT_BROKEN and v["first_broken_seq"] == 6, v


async def test_a_rechained_log_is_caught_by_the_next_checkpoint(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever rewrites an entry and recomputes every hash after it still lacks the key."""
    idx = _entries(export)
    export[idx[1]]["decision"] = "forged"
    prev = bytes.fromhex(export[idx[0]]["hash"])
    for i in idx[1:]:
        r = export[i]
        e = audit_pb2.AuditEntry(
            **{k: r[k] for k in ("seq", "time_ms", "kind", "actor", "partner", "message_id",
                                 "decision", "detail_json")}, prev_hash=prev)  # fmt: skip
        r["prev_hash"], r["hash"] = prev.hex(), entry_hash(prev, e).hex()
        prev = bytes.fromhex(r["hash"])
    code, v, _err = await _verify(capsys, pki, _write(tmp_path, export))
    first_cp = next(r["seq"] for r in export if r["record"] == "checkpoint" and r["seq"] >= 2)
    assert code == EXIT_AUDIT_BROKEN and v["first_broken_seq"] == first_cp, v
    assert "hash does not match the chain" in v["problem"]


async def test_a_forged_checkpoint_is_named(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    i = next(i for i, r in enumerate(export) if r["record"] == "checkpoint" and r["seq"] > 0)
    cp = export[i]
    fake = sign_checkpoint(cp["seq"], bytes.fromhex(cp["hash"]), cp["time_ms"] + 1,
                           Ed25519PrivateKey.generate())  # fmt: skip
    cp["time_ms"], cp["signature"] = fake.time_ms, fake.signature.hex()
    code, v, _err = await _verify(capsys, pki, _write(tmp_path, export))
    assert code == EXIT_AUDIT_BROKEN and v["first_broken_seq"] == cp["seq"], v
    assert "bad signature" in v["problem"]


async def test_a_certificate_from_another_ca_is_not_trusted(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A forger re-signs every checkpoint with their own 'broker' key: the CA does not vouch."""
    now = now_ms()
    other = create_ca(now)
    key = Ed25519PrivateKey.generate()
    cert = issue_signing_cert(other, Identity.broker("broker"), key.public_key(), now)
    for r in export:
        if r["record"] == "checkpoint":
            fake = sign_checkpoint(r["seq"], bytes.fromhex(r["hash"]), r["time_ms"], key)
            r["signature"] = fake.signature.hex()
        elif r["record"] == "audit_certificate":
            r["certificate_pem"] = cert.public_bytes(serialization.Encoding.PEM).decode()
    code, v, err = await _verify(capsys, pki, _write(tmp_path, export))
    assert code == 2 and v is None and "not trusted" in err, err


async def test_a_truncated_line_is_reported(
    export: list[dict[str, Any]], pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _write(tmp_path, export)
    lines = f.read_text().splitlines()
    lines[7] = lines[7][:20]
    f.write_text("\n".join(lines) + "\n")
    code, v, _err = await _verify(capsys, pki, f)
    assert code == EXIT_AUDIT_BROKEN and "line 8" in v["problem"], v
