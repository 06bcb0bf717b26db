"""National brokers for the federation tests: one PKI directory per nation (its own CA,
broker, operators op1/op2, partners and gateway certificate), one real broker process
each over mTLS, trust files naming the peers, gateways admitted by two operators, and
the pieces a test needs to seal for and open from another nation with only the kernel.

    pkis = make_pkis(root, {"NATO": ["NATO"], "KOR": ["KOR"]})   # once per module
    nations = federate(tmp_path, pkis, [("NATO", "KOR")])         # per test
    await start_all(nations); await link_all(nations)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from clients.sdk import OperatorClient, PartnerClient
from coalition import envelope_v2
from coalition.envelope import Recipient
from coalition.epoch import RecipientEpochs, SenderEpochs
from coalition.federation import load_trust_file
from coalition.hybrid import HybridPublicKey
from coalition.identity import certified_hybrid_key, verify_signing_cert
from coalition.labels import Classification, Label, label_to_proto
from coalition.pki import (
    PartnerCredentials,
    gateway_dir,
    issue_gateway,
    load_ca,
    load_gateway,
    load_operator,
    load_partner,
    make_dev_pki,
)
from coalition.policy import PartnerPolicy, PartnerStatus, policy_to_proto
from coalition.v1 import envelope_pb2, federation_pb2, federation_pb2_grpc
from tests.broker_process import ConfiguredBroker
from tests.helpers import now_ms
from tests.test_broker_faults import free_port


def make_pkis(root: Path, nations: Mapping[str, Sequence[str]]) -> dict[str, Path]:
    """A PKI directory per nation with its partners, op1 and op2, and its gateway."""
    out = {}
    for code, partners in nations.items():
        d = root / code
        make_dev_pki(d, partners, ("op1", "op2"), now_ms(), force=True)
        issue_gateway(d, code, now_ms())
        out[code] = d
    return out


@dataclass
class Nation:
    """One nation's broker process and the way to talk to it."""

    code: str
    pki: Path
    broker: ConfiguredBroker
    trust_file: Path
    peers: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def partner(self, code: str) -> PartnerClient:
        return PartnerClient(self.creds(code), self.target)

    def creds(self, code: str) -> PartnerCredentials:
        return load_partner(self.pki / "partners" / code)

    def operator(self, name: str = "op1") -> OperatorClient:
        return OperatorClient(load_operator(self.pki / "operators" / name), self.target)

    def ca_der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return load_ca(self.pki).cert.public_bytes(serialization.Encoding.DER)


def federate(
    tmp: Path,
    pkis: dict[str, Path],
    links: Iterable[tuple[str, str]],
    extra: Mapping[str, str] | None = None,
) -> dict[str, Nation]:
    """A Nation per PKI (not started), each trust file naming the nations it links to.

    extra: TOML appended to a nation's broker config (e.g. a [store] section)."""
    ports = {code: free_port() for code in pkis}
    peers: dict[str, list[str]] = {code: [] for code in pkis}
    for a, b in links:
        peers[a].append(b)
        peers[b].append(a)
    out = {}
    for code, pki in pkis.items():
        d = tmp / code
        d.mkdir()
        lines = [f'nation = "{code}"']
        for peer in peers[code]:
            ca = d / f"{peer}-ca.crt"
            ca.write_bytes((pkis[peer] / "ca" / "ca.crt").read_bytes())
            lines += ["", "[[peers]]", f'nation = "{peer}"', f'ca = "{ca.name}"']
            lines.append(f'endpoint = "127.0.0.1:{ports[peer]}"')
        trust = d / "federation.toml"
        trust.write_text("\n".join(lines) + "\n")
        cfg = d / "broker.toml"
        cfg.write_text(f'[federation]\nfile = "{trust.name}"\n' + (extra or {}).get(code, ""))
        proc = ConfiguredBroker(pki, d / "data", ports[code], extra_args=["--config", str(cfg)])
        out[code] = Nation(code, pki, proc, trust, peers[code])
    return out


async def start_all(nations: dict[str, Nation]) -> None:
    await asyncio.gather(*(n.broker.start() for n in nations.values()))


def stop_all(nations: dict[str, Nation]) -> None:
    for n in nations.values():
        n.broker.cleanup()


def partner_policy(
    code: str, *, groups: Iterable[str] = (), topics: Sequence[str] = ("intel.>",)
) -> PartnerPolicy:
    """A policy cleared to NATO SECRET on topics, releasable by REL TO code or groups."""
    return PartnerPolicy(
        partner=code,
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": Classification.SECRET},
        groups=frozenset(groups),
        categories={},
        publish_topics=tuple(topics),
        subscribe_topics=tuple(topics),
        origination_ceilings={"NATO": Classification.SECRET},
    )


async def admit(nation: Nation, code: str, cert_der: bytes, pol: PartnerPolicy) -> None:
    """op1 proposes, op2 approves (a partner with its signing certificate, a peer's
    gateway with that nation's CA certificate)."""
    async with nation.operator("op1") as op1, nation.operator("op2") as op2:
        resp = await op1.admit(code, cert_der, policy_to_proto(pol), "test")
        assert resp.WhichOneof("result") == "proposal", resp
        done = await op2.approve(resp.proposal.proposal_id, "approved in test")
        assert done.WhichOneof("result") == "applied", done


async def admit_partners(nation: Nation, codes: Iterable[str]) -> None:
    for code in codes:
        # In its nation's group: REL TO KOR releases to KOR-2 too.
        pol = partner_policy(code, groups=(code.split("-")[0],))
        await admit(nation, code, nation.creds(code).signing_cert_der, pol)


async def link(a: Nation, b: Nation, **policy: object) -> None:
    """a admits b's gateway (a's release policy for b) with b's CA."""
    await admit(a, b.code, b.ca_der(), partner_policy(b.code, **policy))  # type: ignore[arg-type]


async def admit_and_link(
    a: Nation, b: Nation, members: Mapping[str, Sequence[str]], *, register_keys: bool = False
) -> None:
    """Each nation admits its own partners (members[code]), which register their key
    bundles if asked, and then the two nations link both ways."""
    for n in (a, b):
        await admit_partners(n, members[n.code])
        if register_keys:
            for code in members[n.code]:
                async with n.partner(code) as c:
                    await c.register_keys()
    await link(a, b)
    await link(b, a)


def recipient(creds: PartnerCredentials) -> Recipient:
    """What a sender in another nation needs to wrap a key for this partner."""
    kid = creds.current_key_id
    return Recipient(creds.code, kid, creds.hpke_keys[kid].public_key())


def seal(
    sender: PartnerCredentials,
    recipients: Sequence[Recipient],
    label: Label,
    *,
    topic: str = "intel.report",
    sequence: int = 1,
    payload: bytes = b"summary",
    epochs: SenderEpochs | None = None,
) -> envelope_pb2.Envelope:
    """One v2 envelope signed by sender (both halves), keys wrapped for recipients."""
    assert sender.hybrid_signing_key is not None
    numbered = [Recipient(r.partner, r.key_id, r.public_key, sequence) for r in recipients]
    msg = envelope_v2.Message(
        plaintext=payload,
        topic=topic,
        label=label_to_proto(label),
        precedence=1,
        content_type="text/plain",
        recipients=numbered,
        sequence=sequence,
        created_ms=now_ms(),
        message_id=os.urandom(16).hex(),
    )
    [env] = envelope_v2.seal_batch(
        [msg],
        sender=sender.code,
        signing_key=sender.hybrid_signing_key,
        signing_key_id=sender.signing_key_id,
        epochs=epochs or SenderEpochs(sender.code),
        created_ms=now_ms(),
    )
    return env


def open_foreign(
    env: envelope_pb2.Envelope, me: PartnerCredentials, trust_file: Path, sender_cert: bytes
) -> envelope_v2.OpenedV2:
    """Open a delivery as a node does for a foreign sender: the sender's certificate
    verified against the CA this node's own trust file names for the sender's nation."""
    trust = load_trust_file(trust_file)

    def signer(sender: str, key_id: str) -> HybridPublicKey:
        peer = trust.peer_for(sender)
        if peer is None:
            raise KeyError(sender)
        verify_signing_cert(sender_cert, peer.ca_cert, sender, now_ms())
        from cryptography import x509

        key = certified_hybrid_key(x509.load_der_x509_certificate(sender_cert))
        if key is None:
            raise KeyError(sender)
        return key

    return envelope_v2.open(env, epochs=RecipientEpochs(me.code, me.hpke_keys), signer=signer)


async def forward_as(
    pki: Path, gateway: str, to: Nation, items: Sequence[federation_pb2.ForwardedEnvelope]
) -> list[federation_pb2.SignedReceipt]:
    """Call to's Federation.Forward with the gateway certificate pki issued for gateway,
    as a (possibly compromised) national broker would. Raises grpc.aio.AioRpcError."""
    creds = load_gateway(gateway_dir(pki, gateway))
    tls = grpc.ssl_channel_credentials(
        root_certificates=(to.pki / "ca" / "ca.crt").read_bytes(),
        private_key=creds.tls_key_pem,
        certificate_chain=creds.tls_cert_pem,
    )
    async with grpc.aio.secure_channel(to.target, tls) as channel:
        call = federation_pb2_grpc.FederationStub(channel).Forward(
            iter([federation_pb2.ForwardRequest(batch_id=1, items=items)])
        )
        out: list[federation_pb2.SignedReceipt] = []
        async for resp in call:
            out.extend(resp.receipts)
        return out


def item(env: envelope_pb2.Envelope, cert_der: bytes) -> federation_pb2.ForwardedEnvelope:
    return federation_pb2.ForwardedEnvelope(envelope=env.SerializeToString(), signing_cert=cert_der)
