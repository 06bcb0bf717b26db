"""A partner moves from v1 to v2 in place: operators replace its signing certificate (two
of them), and what is stored under the old one is still delivered and opened.

Real broker over mTLS on each backend (SQLite and a JetStream cluster), the partners' own
SDK clients, a PKI copied per test (the rekeyed partner's keys are issued again with
``coalition-keys reissue-signing``'s function)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from broker.server import Broker
from clients.keys import cli as keys_cli
from clients.node.inbox import Inbox
from clients.node.receive import Outcome, handle
from clients.sdk import PartnerClient, Sequencer
from clients.sdk.errors import ClientError
from coalition import envelope_v2
from coalition.identity import Identity
from coalition.labels import parse_label
from coalition.pki import (
    create_ca,
    issue_signing_cert,
    load_ca,
    load_partner,
    reissue_signing,
)
from coalition.v1 import directory_pb2, exchange_pb2, intel_pb2
from tests import test_registry_contract as contract
from tests.helpers import admit, now_ms, operator, policy, running_broker
from tests.test_admin_cli import cli, one_error_line
from tests.test_registry_contract import opener  # noqa: F401  (a registry of each backend)

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")


@pytest.fixture
def own_pki(pki: Path, tmp_path: Path) -> Path:
    """The session PKI copied, KOR's signing key issued again Ed25519-only (a v1
    partner, as before hybrid keys)."""
    d = tmp_path / "pki"
    shutil.copytree(pki, d)
    reissue_signing(d, "KOR", now_ms(), ml_dsa=False)
    return d


@pytest.fixture
async def broker(
    own_pki: Path, tmp_path: Path, backend: dict[str, object]
) -> AsyncIterator[Broker]:
    b = await running_broker(own_pki, tmp_path / "broker", **backend)
    for code in ("KOR", "USA", "GBR"):
        await admit(own_pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def rekey(pki: Path, port: int, code: str, cert_der: bytes) -> None:
    """op1 proposes the new certificate; op1 cannot approve it; op2 does."""
    async with operator(pki, "op1", port) as op1, operator(pki, "op2", port) as op2:
        resp = await op1.rekey(code, cert_der, "hybrid signing key")
        assert resp.WhichOneof("result") == "proposal"
        pid = resp.proposal.proposal_id
        with pytest.raises(ClientError) as self_approval:
            await op1.approve(pid, "my own")
        assert self_approval.value.status == grpc.StatusCode.PERMISSION_DENIED
        done = await op2.approve(pid, "checked the certificate")
        assert done.WhichOneof("result") == "applied"
        assert "ML-DSA-65" in done.applied.diff[0]


async def receive(client: PartnerClient, n: int) -> list[exchange_pb2.Delivery]:
    sub = client.subscribe(("intel.>",))
    got: list[exchange_pb2.Delivery] = []
    try:
        async with asyncio.timeout(30):
            async for d in sub:
                got.append(d)
                await sub.ack([d.offset])
                if len(got) == n:
                    break
    finally:
        await sub.aclose()
    return got


def report(title: str) -> bytes:
    return intel_pb2.IntelSummary(title=title, summary="body").SerializeToString()


async def test_a_v1_partner_is_rekeyed_to_v2_and_an_offline_node_opens_both(
    own_pki: Path, broker: Broker, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{broker.port}"
    old = load_partner(own_pki / "partners" / "KOR")
    assert old.hybrid_signing_key is None
    sequencer = Sequencer(
        per_recipient=True
    )  # the partner's numbering goes on across the key change
    kor = PartnerClient(old, target, sequencer=sequencer)
    await kor.register_keys()
    usa = PartnerClient(load_partner(own_pki / "partners" / "USA"), target)
    await usa.register_keys()
    sent_v1 = [
        await kor.seal(report(f"v1 report {i}"), topic="intel.a", label=LABEL) for i in (1, 2)
    ]
    assert not any(envelope_v2.is_v2(s.envelope) for s in sent_v1)
    results = await kor.publish([s.envelope for s in sent_v1])
    assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * 2, results

    # KOR's keys are issued again with an ML-DSA-65 key; operators replace its certificate.
    reissue_signing(own_pki, "KOR", now_ms())
    new = load_partner(own_pki / "partners" / "KOR")
    assert new.hybrid_signing_key is not None and new.signing_key_id != old.signing_key_id
    await rekey(own_pki, broker.port, "KOR", new.signing_cert_der)
    [proposed] = await broker.audit.query(kind="partner.rekey_proposed")
    assert (proposed.actor, proposed.partner) == ("op1", "KOR")
    [change] = await broker.audit.query(kind="policy.change", partner="KOR", tail=True, limit=1)
    assert json.loads(change.detail_json)["approved_by"] == "op2"
    assert new.signing_key_id in json.loads(change.detail_json)["diff"][0]

    # Between the change and the re-registration: no key bundle for KOR (signed under the
    # old key), so nobody seals to it; the directory carries the earlier certificate.
    async with operator(own_pki, "op1", broker.port) as op1:
        shown = await op1.show("KOR")
    assert not shown.directory.HasField("key_bundle")
    assert list(shown.directory.previous_signing_certs) == [old.signing_cert_der]
    assert shown.directory.signing_cert == new.signing_cert_der
    # The old bundle again (a node still running with the old keys): refused, not current.
    with pytest.raises(ClientError) as stale:
        await kor.register_keys()
    assert stale.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "key bundle refused" in stale.value.message
    assert broker.registry.get("KOR").bundle is None  # type: ignore[union-attr]
    decisions = {d.partner: d for d in broker.admin.who_receives(LABEL, "intel.a")}
    assert decisions["KOR"].eligibility.reason == "no_key_bundle"

    # A v1 publish under the old certificate is refused and audited: no downgrade.
    late = await kor.seal(report("v1 after the change"), topic="intel.a", label=LABEL)
    [r] = await kor.publish([late.envelope])
    assert r.outcome == exchange_pb2.REFUSED and r.reason_code == "unknown_signing_key", r
    [entry] = await broker.audit.query(kind="publish.refused", tail=True, limit=1)
    assert entry.partner == "KOR" and entry.decision == "unknown_signing_key"
    kor.discard(late)  # refused: its numbers go to the next message
    await kor.close()

    # The partner re-registers its keys under the new key and sends v2.
    kor2 = PartnerClient(new, target, sequencer=sequencer)
    await kor2.register_keys()
    sent_v2 = await kor2.seal(report("v2 report 3"), topic="intel.a", label=LABEL)
    assert envelope_v2.is_v2(sent_v2.envelope)
    [r] = await kor2.publish([sent_v2.envelope])
    assert r.outcome == exchange_pb2.ACCEPTED, r
    await kor2.close()

    # USA was offline throughout: it catches up and opens all three, in order, no gap,
    # through the node's receive path (verify, check, store or quarantine, gaps).
    got = await receive(usa, 3)
    inbox = Inbox(tmp_path / "inbox.db")
    handled = [
        await handle(d, me="USA", opener=usa.open, inbox=inbox, now_ms=now_ms()) for d in got
    ]
    assert [h.outcome for h in handled] == [Outcome.STORED] * 3, handled
    assert inbox.counts() == (3, 0)  # stored, quarantined
    assert not inbox.take_unreported_gaps()
    assert [e.title for e in inbox.entries()] == ["v1 report 1", "v1 report 2", "v2 report 3"]
    opened = [await usa.open(d) for d in got]
    assert [o.version for o in opened] == [1, 1, 2]
    assert [o.header.signing_key_id for o in opened] == [old.signing_key_id] * 2 + [
        new.signing_key_id
    ]
    assert [o.recipient_sequence for o in opened] == [1, 2, 3]
    await usa.close()


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


async def test_a_rekey_with_a_wrong_certificate_is_refused_and_audited(
    own_pki: Path, broker: Broker
) -> None:
    gbr = load_partner(own_pki / "partners" / "GBR")
    key = Ed25519PrivateKey.generate().public_key()
    ca = load_ca(own_pki)
    expired = issue_signing_cert(
        ca, Identity.partner("KOR"), key, now_ms() - 10 * 86_400_000, valid_days=1
    )
    foreign = issue_signing_cert(create_ca(now_ms()), Identity.partner("KOR"), key, now_ms())
    current = load_partner(own_pki / "partners" / "KOR").signing_cert_der
    cases = {
        "another partner's": gbr.signing_cert_der,
        "expired": _der(expired),
        "not the CA's": _der(foreign),
        "the current": current,
    }
    async with operator(own_pki, "op1", broker.port) as op1:
        for what, der in cases.items():
            with pytest.raises(ClientError) as refused:
                await op1.rekey("KOR", der, f"{what} certificate")
            assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT, what
            assert "signing certificate refused" in refused.value.message, what
        assert not await op1.proposals()
    entries = await broker.audit.query(kind="admin.refused", tail=True, limit=len(cases))
    assert [e.decision for e in entries] == ["bad_signing_cert"] * len(cases)
    assert {json.loads(e.detail_json)["action"] for e in entries} == {"rekey"}
    rec = broker.registry.get("KOR")
    assert rec is not None and rec.signing_cert == current and rec.previous_certs == []


async def test_a_hybrid_partner_cannot_be_rekeyed_back_to_v1(own_pki: Path, broker: Broker) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    v1_cert = issue_signing_cert(load_ca(own_pki), Identity.partner("USA"), key, now_ms())
    async with operator(own_pki, "op1", broker.port) as op1:
        with pytest.raises(ClientError) as refused:
            await op1.rekey("USA", _der(v1_cert), "downgrade")
    assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "back to v1" in refused.value.message
    [entry] = await broker.audit.query(kind="admin.refused", tail=True, limit=1)
    assert entry.decision == "bad_signing_cert" and entry.partner == "USA"


async def test_the_registry_keeps_earlier_certificates_across_a_reopen(
    opener: contract.Opener,  # noqa: F811  (the fixture imported above)
) -> None:
    """On each backend: approving a rekey proposal replaces the certificate, keeps the old
    one, drops the bundle signed under it, in one commit; a reopened registry (another
    broker, a restart) sees the same."""
    reg = await opener()
    await contract.register(reg, "KOR")
    pv = await reg.apply(
        policy("KOR"), changed_by="op1", approved_by="op2", reason="admit", diff=["a"], now_ms=2
    )
    bundle = directory_pb2.SignedKeyBundle(bundle=b"b", signature=b"s")
    await reg.set_bundle("KOR", "k1", bundle, 3)
    prop = await reg.propose(
        policy("KOR"),
        base_version=pv.version,
        proposed_by="op1",
        reason="rekey",
        diff=["signing certificate 1 -> 2"],
        now_ms=4,
        signing_cert=b"cert-KOR-2",
    )
    found = await reg.proposal(prop.proposal_id)
    assert found is not None and found[0].signing_cert == b"cert-KOR-2"
    done = await reg.approve(
        prop.proposal_id,
        decided_by="op2",
        now_ms=5,
        audit=lambda v: [contract.item("policy.change", "KOR", version=v)],
    )
    assert done is not None and done.version == pv.version + 1
    for r in (reg, await opener()):
        rec = r.get("KOR")
        assert rec is not None
        assert (rec.signing_cert, rec.previous_certs) == (b"cert-KOR-2", [b"cert-KOR"])
        assert rec.bundle is None and rec.key_id == ""
        assert rec.version == pv.version + 1
    # A bundle registered after the change is the current one, across a reopen too.
    await reg.set_bundle("KOR", "k2", bundle, 6)
    rec = (await opener()).get("KOR")
    assert rec is not None and rec.key_id == "k2" and rec.previous_certs == [b"cert-KOR"]


async def test_the_commands_rekey_a_partner_and_say_why_they_refuse(
    own_pki: Path, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """coalition-keys reissue-signing, then coalition-admin partners rekey (--json),
    approved by a second operator; partners show lists the earlier certificate."""
    old = load_partner(own_pki / "partners" / "KOR")
    assert keys_cli.main(["reissue-signing", str(own_pki), "KOR"]) == 0
    new = load_partner(own_pki / "partners" / "KOR")
    assert f"signing key id {new.signing_key_id}, Ed25519 + ML-DSA-65" in capsys.readouterr().out
    cert = str(own_pki / "partners" / "KOR" / "signing.crt")
    r = await cli("partners", "rekey", "KOR", "--signing-cert", cert, "--reason", "v2",
                  "--json", broker=broker, pki=own_pki)  # fmt: skip
    assert r.code == 0, r
    prop = r.json()["proposal"]
    assert prop["state"] == "PROPOSAL_PENDING" and prop["proposed_by"] == "op1"
    assert prop["diff"] == [
        f"signing certificate {old.signing_key_id} -> {new.signing_key_id} "
        "(with an ML-DSA-65 key: envelope v2)"
    ]
    r = await cli("policy", "approve", prop["proposal_id"], "--reason", "checked",
                  broker=broker, pki=own_pki, op="op2")  # fmt: skip
    assert r.code == 0 and "applied as version" in r.out, r
    r = await cli("partners", "show", "KOR", broker=broker, pki=own_pki)
    assert r.code == 0, r
    assert f"earlier signing certs:  {old.signing_key_id}\n" in r.out, r.out
    usa = str(own_pki / "partners" / "USA" / "signing.crt")
    r = await cli("partners", "rekey", "KOR", "--signing-cert", usa, "--reason", "x",
                  broker=broker, pki=own_pki)  # fmt: skip
    line = one_error_line(r, 3)
    assert "INVALID_ARGUMENT: signing certificate refused" in line, line
