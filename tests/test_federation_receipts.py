"""A compromised peer cannot make the sending nation record a custody receipt it did not
sign for what was really sent.

NATO's broker is a real process; the peer KOR is played by this test holding KOR's own
broker certificate and audit key (what a compromised KOR broker holds). It answers
NATO's link with receipts that are wrong in one way each; NATO must record none of them
in its audit chain and must send the envelope again, until an honest receipt comes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from coalition.federation import load_trust_file, sign_receipt, verify_receipt
from coalition.labels import parse_label
from coalition.pki import load_broker
from coalition.v1 import exchange_pb2, federation_pb2, federation_pb2_grpc
from tests.federation_rig import (
    Nation,
    admit_partners,
    federate,
    link,
    make_pkis,
    recipient,
    seal,
    stop_all,
)
from tests.helpers import now_ms
from tests.test_federation import audit

NATIONS = {"NATO": ["NATO"], "KOR": ["KOR"]}

Signer = Callable[[federation_pb2.CustodyReceipt], federation_pb2.SignedReceipt]


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pkis(tmp_path_factory.mktemp("nations"), NATIONS)


class RoguePeer(federation_pb2_grpc.FederationServicer):
    """KOR's Federation service as a compromised KOR broker runs it: the n-th request is
    answered by signers[n] (the last one for every later request)."""

    def __init__(self, signers: list[tuple[str, Signer, bool]]) -> None:
        self.signers = signers
        self.seen: list[tuple[str, str]] = []  # (what answered, envelope sha256)

    async def Forward(
        self, request_iterator: AsyncIterator[federation_pb2.ForwardRequest], context: Any
    ) -> AsyncIterator[federation_pb2.ForwardResponse]:
        async for req in request_iterator:
            name, signer, digest_ok = self.signers[min(len(self.seen), len(self.signers) - 1)]
            receipts = []
            for item in req.items:
                digest = hashlib.sha256(item.envelope).digest()
                self.seen.append((name, digest.hex()))
                receipt = federation_pb2.CustodyReceipt(
                    envelope_sha256=digest if digest_ok else hashlib.sha256(b"other").digest(),
                    outcome=federation_pb2.RECEIPT_STORED,
                    audit_seq=7,
                    receiver_nation="KOR",
                    gateway="NATO",
                    time_ms=now_ms(),
                )
                receipts.append(signer(receipt))
            yield federation_pb2.ForwardResponse(batch_id=req.batch_id, receipts=receipts)

    async def Directory(
        self, request: federation_pb2.FederationDirectoryRequest, context: Any
    ) -> federation_pb2.FederationDirectoryResponse:
        return federation_pb2.FederationDirectoryResponse()  # no partner offered


async def serve_rogue(kor: Nation, nato: Nation, rogue: RoguePeer) -> grpc.aio.Server:
    """The rogue on the port NATO's trust file names for KOR, with KOR's broker TLS
    certificate, accepting only clients certified by NATO's CA."""
    creds = load_broker(kor.pki)
    server = grpc.aio.server()
    federation_pb2_grpc.add_FederationServicer_to_server(rogue, server)
    tls = grpc.ssl_server_credentials(
        [(creds.tls_key_pem, creds.tls_cert_pem)],
        root_certificates=(nato.pki / "ca" / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(kor.target, tls)
    await server.start()
    return server


async def test_a_peer_cannot_forge_a_custody_receipt(pkis: dict[str, Path], tmp_path: Path) -> None:
    nations = federate(tmp_path, pkis, [("NATO", "KOR")])
    nato, kor = nations["NATO"], nations["KOR"]
    kor_broker, nato_broker = load_broker(kor.pki), load_broker(nato.pki)
    assert kor_broker.audit_cert is not None and nato_broker.audit_cert is not None
    kor_cert = kor_broker.audit_cert.public_bytes(Encoding.DER)
    nato_cert = nato_broker.audit_cert.public_bytes(Encoding.DER)
    stranger = Ed25519PrivateKey.generate()

    def honest(r: federation_pb2.CustodyReceipt) -> federation_pb2.SignedReceipt:
        return sign_receipt(r, kor_broker.audit_key, kor_cert)

    rogue = RoguePeer(
        [
            # KOR's audit certificate, but a signature by a key it does not certify.
            ("bad signature", lambda r: sign_receipt(r, stranger, kor_cert), True),
            # A valid broker audit signature, under NATO's CA, not KOR's.
            ("another CA", lambda r: sign_receipt(r, nato_broker.audit_key, nato_cert), True),
            # KOR's own valid signature, for an envelope that was not the one sent.
            ("other digest", honest, False),
            ("honest", honest, True),
        ]
    )
    await nato.broker.start()
    server = await serve_rogue(kor, nato, rogue)
    try:
        await admit_partners(nato, ["NATO"])
        await link(nato, kor)
        env = seal(
            nato.creds("NATO"),
            [recipient(kor.creds("KOR"))],
            parse_label("NATO SECRET // REL TO KOR"),
        )
        async with nato.partner("NATO") as pub:
            [res] = await pub.publish([env])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        async with asyncio.timeout(30):
            while not await audit(nato, "federation.receipt"):  # noqa: ASYNC110 - a process
                await asyncio.sleep(0.1)
        # The same envelope went four times: each bad receipt made NATO send it again.
        digest = hashlib.sha256(env.SerializeToString()).hexdigest()
        assert rogue.seen[:4] == [
            ("bad signature", digest),
            ("another CA", digest),
            ("other digest", digest),
            ("honest", digest),
        ]
        # Exactly one receipt recorded: the honest one, verifying under KOR's CA.
        [rec] = await audit(nato, "federation.receipt")
        detail = json.loads(rec.detail_json)
        signed = federation_pb2.SignedReceipt(
            receipt=base64.b64decode(detail["receipt"]),
            signature=base64.b64decode(detail["signature"]),
            signer_cert=base64.b64decode(detail["signer_cert"]),
        )
        kor_ca = load_trust_file(nato.trust_file).peers["KOR"].ca_cert
        assert verify_receipt(signed, kor_ca, now_ms()).envelope_sha256.hex() == digest
        assert detail["sha256"] == digest and rec.message_id == res.message_id
    finally:
        await server.stop(None)
        stop_all({"NATO": nato})
