"""Operating a federation: `coalition-admin federation` against real national brokers,
the two-person admission of a peer, who may not speak for a federated nation, the
per-peer counters, and the trust file's refusals."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coalition.federation import FederationError, parse_trust_file
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2
from tests.federation_rig import (
    Nation,
    admit,
    admit_partners,
    federate,
    make_pkis,
    partner_policy,
    recipient,
    seal,
    start_all,
    stop_all,
)
from tests.test_admin_cli import ROOT, _env
from tests.test_federation import audit, deliveries

NATIONS = {"NATO": ["NATO"], "KOR": ["KOR"]}


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = make_pkis(tmp_path_factory.mktemp("nations"), NATIONS)
    from coalition.pki import issue_partner
    from tests.helpers import now_ms

    issue_partner(out["NATO"], "KOR-X", now_ms())  # a local partner speaking for KOR
    return out


@pytest.fixture
async def unlinked(pkis: dict[str, Path], tmp_path: Path) -> AsyncIterator[dict[str, Nation]]:
    nations = federate(tmp_path, pkis, [("NATO", "KOR")])
    try:
        await start_all(nations)
        for n in nations.values():
            await admit_partners(n, NATIONS[n.code])
        yield nations
    finally:
        stop_all(nations)


async def admin(nation: Nation, *args: str, op: str = "op1") -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "clients.admin.cli", "--broker", nation.target]
    argv += ["--identity", str(nation.pki / "operators" / op), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def add_by_cli(here: Nation, peer: Nation) -> None:
    flags = ["--clearance", "NATO=SECRET", "--ceiling", "NATO=SECRET"]
    flags += ["--publish", "intel.>", "--subscribe", "intel.>", "--reason", "bilateral MoU"]
    ca = here.trust_file.parent / f"{peer.code}-ca.crt"
    code, out, err = await admin(
        here, "--json", "federation", "add", peer.code, "--ca", str(ca), *flags
    )
    assert code == 0, err
    pid = json.loads(out)["proposal"]["proposal_id"]
    code, out, err = await admin(here, "policy", "approve", pid, "--reason", "ok", op="op2")
    assert code == 0, err


async def test_operators_add_list_suspend_and_resume_a_peer(unlinked: dict[str, Nation]) -> None:
    nato, kor = unlinked["NATO"], unlinked["KOR"]
    code, out, _ = await admin(nato, "--json", "federation", "list")
    assert code == 0
    [peer] = json.loads(out)["peers"]
    assert peer["nation"] == "KOR" and peer.get("status", "PARTNER_STATUS_UNSPECIFIED") in (
        "PARTNER_STATUS_UNSPECIFIED",
        0,
    )
    # A peer's gateway is admitted with the CA the trust file names, not any other.
    wrong = nato.pki / "ca" / "ca.crt"
    code, _, err = await admin(
        nato,
        "federation",
        "add",
        "KOR",
        "--ca",
        str(wrong),
        "--clearance",
        "NATO=SECRET",
        "--reason",
        "x",
    )
    assert code == 3 and "CA certificate as the federation trust file names it" in err
    await add_by_cli(nato, kor)
    await add_by_cli(kor, nato)
    # who-receives shows a peer's gateway by its release decision (it has no key bundle).
    args = ("who-receives", "--label", "NATO SECRET // REL TO KOR", "--topic", "intel.x")
    code, out, err = await admin(nato, "--json", *args)
    rows = {d["partner"]: d for d in json.loads(out)["decisions"]}
    assert code == 0 and rows["KOR"]["allowed"] and rows["KOR"]["reason"] == "allow", err
    env = seal(
        nato.creds("NATO"), [recipient(kor.creds("KOR"))], parse_label("NATO SECRET // REL TO KOR")
    )
    async with nato.partner("NATO") as pub, kor.partner("KOR") as rcv:
        assert (await pub.publish([env]))[0].outcome == exchange_pb2.ACCEPTED
        await deliveries(rcv, 1)
    async with asyncio.timeout(20):
        while True:
            code, out, _ = await admin(nato, "--json", "federation", "list")
            [peer] = json.loads(out)["peers"]
            if int(peer.get("receipts", 0)) == 1:
                break
            await asyncio.sleep(0.2)
    assert peer["status"] == "ACTIVE" and peer["connected"] and int(peer["forwarded"]) == 1
    code, out, _ = await admin(kor, "--json", "federation", "show", "NATO")
    assert code == 0 and int(json.loads(out)["peer"]["received"]) == 1
    code, out, _ = await admin(nato, "federation", "list")
    assert code == 0 and "KOR" in out and "up" in out
    # Suspended by one operator at once; resumed only by two.
    code, _, err = await admin(nato, "federation", "suspend", "KOR", "--reason", "test")
    assert code == 0, err
    code, out, _ = await admin(nato, "--json", "federation", "show", "KOR")
    assert json.loads(out)["peer"]["status"] == "SUSPENDED"
    code, out, err = await admin(nato, "--json", "federation", "resume", "KOR", "--reason", "back")
    assert code == 0 and "proposal" in json.loads(out), err


async def test_a_local_partner_may_not_speak_for_a_federated_nation(
    unlinked: dict[str, Nation],
) -> None:
    nato = unlinked["NATO"]
    creds = nato.creds("KOR-X")
    async with nato.operator("op1") as op1:
        from clients.sdk import ClientError
        from coalition.policy import policy_to_proto

        with pytest.raises(ClientError) as exc:
            await op1.admit(
                "KOR-X", creds.signing_cert_der, policy_to_proto(partner_policy("KOR-X")), "x"
            )
    assert "federated nation" in str(exc.value)
    # And a certificate of this nation's CA naming the federated nation is refused on the
    # Exchange even before any registry lookup.
    from clients.sdk import ClientError as CE

    kor_here = nato.pki / "partners" / "KOR-X"
    from clients.sdk import PartnerClient
    from coalition.pki import load_partner

    async with PartnerClient(load_partner(kor_here), nato.target) as c:
        with pytest.raises(CE):
            await c.directory(refresh=True)
    assert "federated_nation" in {e.decision for e in await audit(nato, "auth.refused")}
    assert "federated_nation" in {e.decision for e in await audit(nato, "admin.refused")}
    _ = admit  # the rig's admission helper is the RPC form of `federation add`


def test_the_trust_file_refuses_what_would_blur_who_speaks_for_whom(tmp_path: Path) -> None:
    pkis = make_pkis(tmp_path, {"KOR": [], "USA": []})
    ca = {c: (pkis[c] / "ca" / "ca.crt").read_bytes() for c in pkis}

    def parse(text: str) -> None:
        parse_trust_file(text, lambda name: ca[name])

    ok = 'nation = "NATO"\n[[peers]]\nnation = "KOR"\nca = "KOR"\nendpoint = "h:1"\n'
    parse(ok)
    bad = {
        "overlap with itself": ok.replace('nation = "KOR"', 'nation = "NATO-K"'),
        "overlap between peers": ok + '[[peers]]\nnation = "KOR-N"\nca = "USA"\nendpoint = "h:2"\n',
        "one CA for two": ok + '[[peers]]\nnation = "USA"\nca = "KOR"\nendpoint = "h:2"\n',
        "no port": ok.replace('"h:1"', '"h"'),
        "unknown key": ok + "trust_all = true\n",
        "bad code": ok.replace('"KOR"', '"kor"', 1),
    }
    for why, text in bad.items():
        with pytest.raises(FederationError):
            parse(text)
            raise AssertionError(why)


async def test_each_load_of_the_trust_file_is_audited_with_what_changed(
    unlinked: dict[str, Nation],
) -> None:
    import signal

    nato = unlinked["NATO"]
    [first] = await audit(nato, "federation.trust_loaded")
    assert json.loads(first.detail_json)["changed"] == {"first_load": True}
    text = nato.trust_file.read_text()
    nato.trust_file.write_text(text.replace("127.0.0.1:", "localhost:"))
    nato.broker.signal(signal.SIGTERM)
    assert await nato.broker.wait_exit() == 0
    await nato.broker.start()
    loads = await audit(nato, "federation.trust_loaded")
    assert len(loads) == 2
    detail = json.loads(loads[1].detail_json)
    assert detail["changed"] == {"same_file": False, "added": [], "removed": [], "changed": ["KOR"]}
    assert detail["peers"]["KOR"]["endpoint"].startswith("localhost:")


def test_a_receipt_verifies_only_as_signed_by_the_receivers_broker(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from coalition.federation import sign_receipt, verify_receipt
    from coalition.pki import load_broker, load_ca, load_partner
    from coalition.v1 import federation_pb2
    from tests.helpers import now_ms

    pkis = make_pkis(tmp_path, {"KOR": ["KOR"], "USA": []})
    kor = load_broker(pkis["KOR"])
    assert kor.audit_cert is not None
    der = kor.audit_cert.public_bytes(serialization.Encoding.DER)
    receipt = federation_pb2.CustodyReceipt(
        message_id="m1", outcome=federation_pb2.RECEIPT_STORED, audit_seq=7
    )
    signed = sign_receipt(receipt, kor.audit_key, der)
    kor_ca, usa_ca = load_ca(pkis["KOR"]).cert, load_ca(pkis["USA"]).cert
    assert verify_receipt(signed, kor_ca, now_ms()).audit_seq == 7
    bad = {
        "another nation's CA": (signed, usa_ca),
        "altered": (
            federation_pb2.SignedReceipt(
                receipt=signed.receipt.replace(b"m1", b"m2"),
                signature=signed.signature,
                signer_cert=signed.signer_cert,
            ),
            kor_ca,
        ),
    }
    # A partner's signing certificate of the same CA is not a broker's audit certificate.
    partner = load_partner(pkis["KOR"] / "partners" / "KOR")
    bad["a partner's key"] = (
        sign_receipt(receipt, partner.signing_key, partner.signing_cert_der),
        kor_ca,
    )
    for why, (s, ca) in bad.items():
        with pytest.raises(FederationError):
            verify_receipt(s, ca, now_ms())
            raise AssertionError(why)


async def test_the_metrics_count_each_peers_traffic(pkis: dict[str, Path], tmp_path: Path) -> None:
    import urllib.request

    from tests.test_broker_faults import free_port

    port = free_port()
    extra = {"NATO": f'[metrics]\nlisten = "127.0.0.1:{port}"\n'}
    nations = federate(tmp_path, pkis, [("NATO", "KOR")], extra=extra)
    nato, kor = nations["NATO"], nations["KOR"]
    try:
        await start_all(nations)
        for n in nations.values():
            await admit_partners(n, NATIONS[n.code])
        await add_by_cli(nato, kor)
        await add_by_cli(kor, nato)
        env = seal(
            nato.creds("NATO"),
            [recipient(kor.creds("KOR"))],
            parse_label("NATO SECRET // REL TO KOR"),
        )
        async with nato.partner("NATO") as pub, kor.partner("KOR") as rcv:
            assert (await pub.publish([env]))[0].outcome == exchange_pb2.ACCEPTED
            await deliveries(rcv, 1)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())

        want = 'coalition_federation_receipts_total{peer="KOR"} 1.0'
        async with asyncio.timeout(20):
            while want not in (text := await asyncio.to_thread(scrape)):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        assert 'coalition_federation_forwarded_total{peer="KOR"} 1.0' in text
        assert 'coalition_federation_link_up{peer="KOR"} 1.0' in text
        assert 'coalition_federation_lag_messages{peer="KOR"} 0.0' in text
    finally:
        stop_all(nations)


def test_a_broker_refuses_to_start_on_a_bad_trust_file_or_without_its_gateway(
    tmp_path: Path,
) -> None:
    import subprocess

    from coalition.pki import make_dev_pki
    from tests.helpers import now_ms

    make_dev_pki(tmp_path / "pki", [], ["op1"], now_ms())
    make_dev_pki(tmp_path / "kor", [], [], now_ms())
    (tmp_path / "kor-ca.crt").write_bytes((tmp_path / "kor" / "ca" / "ca.crt").read_bytes())
    peer = '[[peers]]\nnation = "KOR"\nca = "kor-ca.crt"\nendpoint = "127.0.0.1:1"\n'
    cfg = tmp_path / "broker.toml"
    cfg.write_text('[federation]\nfile = "federation.toml"\n')

    def start(trust: str) -> str:
        (tmp_path / "federation.toml").write_text(trust)
        argv = [sys.executable, "-m", "broker.cli", "serve", "--config", str(cfg)]
        argv += ["--pki", str(tmp_path / "pki"), "--data", str(tmp_path / "data")]
        argv += ["--listen", "127.0.0.1:0", "--operators", "op1"]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("coalition-broker:")]
        return line

    assert "overlaps" in start('nation = "KOR-N"\n' + peer)
    assert "coalition-keys issue-gateway" in start('nation = "NATO"\n' + peer)


async def test_a_trust_file_naming_another_ca_does_not_let_it_in_without_the_operators(
    unlinked: dict[str, Nation], tmp_path: Path
) -> None:
    """Someone who can edit the trust file swaps KOR's CA for their own: the admission
    two operators made pins KOR's real CA, so the impostor's KOR gateway is refused."""
    import signal

    import grpc

    from coalition.pki import issue_gateway, make_dev_pki
    from tests.federation_rig import forward_as, item
    from tests.helpers import now_ms

    nato, kor = unlinked["NATO"], unlinked["KOR"]
    await add_by_cli(nato, kor)
    rogue = tmp_path / "rogue"
    make_dev_pki(rogue, [], [], now_ms())
    issue_gateway(rogue, "KOR", now_ms())
    ca = nato.trust_file.parent / "KOR-ca.crt"
    ca.write_bytes((rogue / "ca" / "ca.crt").read_bytes())
    nato.broker.signal(signal.SIGTERM)
    assert await nato.broker.wait_exit() == 0
    await nato.broker.start()
    env = seal(
        kor.creds("KOR"), [recipient(nato.creds("NATO"))], parse_label("NATO SECRET // REL TO NATO")
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await forward_as(rogue, "KOR", nato, [item(env, kor.creds("KOR").signing_cert_der)])
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "ca_not_admitted" in {e.decision for e in await audit(nato, "auth.refused")}
    code, out, _ = await admin(nato, "--json", "federation", "show", "KOR")
    assert code == 0 and json.loads(out)["peer"]["status"] == "ACTIVE"  # not under this CA
