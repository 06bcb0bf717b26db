"""``coalition-keys`` as a user runs it: output, exit codes, no private key material."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clients.keys.cli import main

SUBCOMMANDS = [
    "init-ca",
    "issue-partner",
    "issue-operator",
    "issue-broker",
    "dev-pki",
    "show",
    "inspect",
    "rotate-hpke",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def show_json(capsys: pytest.CaptureFixture[str], root: Path) -> dict[str, Any]:
    code, out, _ = run(capsys, "show", str(root), "--json")
    assert code == 0
    info: dict[str, Any] = json.loads(out)
    return info


@pytest.fixture
def root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    d = tmp_path / "pki"
    assert run(capsys, "dev-pki", str(d), "--partners", "KOR,USA", "--operators", "op1")[0] == 0
    return d


def test_dev_pki_as_a_subprocess_makes_the_default_partners(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    done = subprocess.run(
        [sys.executable, "-m", "clients.keys.cli", "dev-pki", str(d)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "KOR, USA, GBR, UKR, NATO" in done.stdout
    assert sorted(p.name for p in (d / "partners").iterdir()) == [
        "GBR",
        "KOR",
        "NATO",
        "UKR",
        "USA",
    ]
    assert sorted(p.name for p in (d / "operators").iterdir()) == ["op1", "op2"]


def test_show_json_lists_every_identity(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = show_json(capsys, root)
    assert info["ca"]["key_type"] == "ECDSA secp256r1"
    assert info["broker"]["tls"]["identity"] == "urn:coalition:broker:broker"
    assert info["broker"]["audit"]["key_type"] == "Ed25519"
    assert [p["code"] for p in info["partners"]] == ["KOR", "USA"]
    kor = info["partners"][0]
    assert kor["tls"]["identity"] == kor["signing"]["identity"] == "urn:coalition:partner:KOR"
    assert kor["signing"]["key_type"] == "Ed25519 + ML-DSA-65"
    assert kor["tls"]["status"] == "valid"
    assert kor["hpke_key_ids"] == [kor["bundle"]["key_id"]]
    assert [o["name"] for o in info["operators"]] == ["op1"]


def test_show_text_never_prints_private_keys(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "show", str(root))
    assert code == 0
    assert "partner KOR" in out and "operator op1" in out and "signing" in out
    assert "PRIVATE KEY" not in out


def test_inspect_certificate(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", str(root / "partners/KOR/signing.crt"), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["identity"] == "urn:coalition:partner:KOR"
    assert info["issuer"] == "CN=Coalition CA,O=Coalition"
    assert info["key_type"] == "Ed25519 + ML-DSA-65"
    assert len(info["sha256_fingerprint"]) == 64
    assert {"subject", "serial", "not_before", "not_after"} <= set(info)


def test_inspect_bundle_verifies_against_sibling_signing_cert(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "inspect", str(root / "partners/KOR/bundle.bin"))
    assert code == 0
    assert "MLKEM768-X25519" in out
    assert "verified:" in out and "ok against" in out


def test_inspect_refuses_private_keys(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ["tls.key", "signing.key", "signing-ml-dsa.key"]:
        code, out, err = run(capsys, "inspect", str(root / "partners/KOR" / name))
        assert code == 1
        assert out == "" and "private key" in err and "BEGIN" not in err
    hpke = next((root / "partners/KOR").glob("hpke-*.key"))
    assert run(capsys, "inspect", str(hpke))[0] == 1


def test_rotate_hpke_keeps_old_key_and_changes_bundle_key_id(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = show_json(capsys, root)["partners"][0]
    code, out, _ = run(capsys, "rotate-hpke", str(root), "KOR", "--valid-days", "30")
    assert code == 0 and "new HPKE key id" in out
    after = show_json(capsys, root)["partners"][0]
    assert after["bundle"]["key_id"] != before["bundle"]["key_id"]
    assert set(after["hpke_key_ids"]) == {before["bundle"]["key_id"], after["bundle"]["key_id"]}
    assert after["signing"]["serial"] == before["signing"]["serial"]


def test_missing_ca_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "issue-partner", str(tmp_path / "nowhere"), "KOR")
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("coalition-keys: error: no CA in")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["rotate-hpke", "{root}", "XYZ"], "unknown partner XYZ"),
        (["issue-partner", "{root}", "kor"], "invalid partner name"),
        (["dev-pki", "{root}"], "already holds a PKI"),
        (["issue-partner", "{root}", "KOR"], "already exists"),
        (["show", "{root}/partners"], "no PKI in"),
        (["inspect", "{root}/nope.crt"], "no such file"),
    ],
)
def test_errors_exit_non_zero_with_one_line(
    root: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, _, err = run(capsys, *[a.format(root=root) for a in argv])
    assert code == 1
    assert err.count("\n") == 1 and expected in err
    assert "Traceback" not in err


def test_force_replaces_an_identity(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = show_json(capsys, root)["partners"][0]["signing"]["serial"]
    assert run(capsys, "issue-partner", str(root), "KOR", "--force")[0] == 0
    assert show_json(capsys, root)["partners"][0]["signing"]["serial"] != before


def test_step_by_step_matches_dev_pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    for argv in (
        ["init-ca", d, "--valid-days", "100"],
        ["issue-broker", d, "--name", "broker-eu"],
        ["issue-partner", d, "UKR"],
        ["issue-operator", d, "alice"],
    ):
        assert run(capsys, *argv)[0] == 0, argv
    info = show_json(capsys, Path(d))
    assert info["broker"]["tls"]["identity"] == "urn:coalition:broker:broker-eu"
    assert info["partners"][0]["code"] == "UKR"
    assert info["operators"][0]["tls"]["identity"] == "urn:coalition:operator:alice"
    # Nothing outlives the CA that issued it.
    assert info["partners"][0]["tls"]["not_after"] <= info["ca"]["not_after"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help_with_examples(
    sub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"coalition-keys {sub}" in out and "examples:" in out


def test_top_level_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out
