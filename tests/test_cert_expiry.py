"""Certificates expire while the broker runs, and that takes effect then, not at the next
restart: a partner's signing key is cached with its certificate's validity and checked
against the broker's clock at every use (the broker's injectable clock); a live call ends
when its client TLS certificate expires (a certificate a few seconds from expiry, real
time). Real broker over mTLS."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.exchange import SigningCertNotValid
from broker.server import start_broker
from clients.sdk import ClientError, PartnerClient
from coalition.identity import Identity, signing_key_id
from coalition.labels import parse_label
from coalition.pki import PartnerCredentials, issue_signing_cert, load_ca, load_partner
from coalition.policy import policy_to_proto
from coalition.v1 import exchange_pb2
from tests.helpers import admit, broker_config, now_ms, operator, policy, running_broker
from tests.test_broker_ops import kor_with_cert, new_kor_tls, pem

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
DAY_MS = 86_400_000


def short_lived_kor(pki: Path, issued_ms: int) -> PartnerCredentials:
    """KOR's credentials with a new (Ed25519-only) signing key whose certificate is valid
    for one day."""
    key = Ed25519PrivateKey.generate()
    cert = issue_signing_cert(
        load_ca(pki), Identity.partner("KOR"), key.public_key(), issued_ms, valid_days=1
    )
    creds = load_partner(pki / "partners" / "KOR")
    return dataclasses.replace(
        creds,
        signing_key=key,
        signing_cert=cert,
        signing_key_id=signing_key_id(cert),
        hybrid_signing_key=None,
    )


async def test_expired_signing_cert_stops_verifying_without_a_restart(
    pki: Path, tmp_path: Path
) -> None:
    offset = [0]

    def clock() -> int:
        return now_ms() + offset[0]

    b = await start_broker(broker_config(pki, tmp_path / "broker"), clock=clock)
    try:
        kor_creds = short_lived_kor(pki, now_ms())
        async with operator(pki, "op1", b.port) as op1, operator(pki, "op2", b.port) as op2:
            resp = await op1.admit(
                "KOR", kor_creds.signing_cert_der, policy_to_proto(policy("KOR")), "test"
            )
            await op2.approve(resp.proposal.proposal_id, "approved in test")
        await admit(pki, b.port, policy("USA"))
        target = f"127.0.0.1:{b.port}"
        async with (
            PartnerClient(load_partner(pki / "partners" / "USA"), target, clock=clock) as usa,
            PartnerClient(kor_creds, target, clock=clock) as kor,
        ):
            await usa.register_keys()
            first = await kor.seal(b"before expiry", topic="intel.a", label=LABEL)
            [ok] = await kor.publish([first.envelope])
            assert ok.outcome == exchange_pb2.ACCEPTED, ok.reason

            offset[0] = 2 * DAY_MS  # the signing certificate (one day) has expired
            second = await kor.seal(b"after expiry", topic="intel.a", label=LABEL)
            [res] = await kor.publish([second.envelope])
            assert (res.outcome, res.status, res.reason_code) == (
                exchange_pb2.REFUSED,
                "UNAUTHENTICATED",
                "signing_cert_expired",
            ), res.reason
            assert "expired at" in res.reason and "KOR" in res.reason
            # Nothing more was stored.
            assert (await b.store.stats()).messages == 1

            # The clock going back before the certificate's start: not yet valid.
            offset[0] = -DAY_MS
            try:
                b.exchange.signer("KOR", kor_creds.signing_key_id)
            except SigningCertNotValid as exc:
                assert exc.code == "signing_cert_not_yet_valid"
                assert "not valid before" in exc.message
            else:
                raise AssertionError("a not-yet-valid signing certificate verified")
        [entry] = await b.audit.query(kind="publish.refused")
        assert entry.decision == "signing_cert_expired"
        assert entry.message_id == second.message_id
        assert "expired at" in json.loads(entry.detail_json)["reason"]
    finally:
        offset[0] = 0
        await b.stop(grace=1)


async def test_a_live_stream_ends_when_its_client_certificate_expires(
    pki: Path, tmp_path: Path
) -> None:
    b = await running_broker(pki, tmp_path / "broker")
    try:
        await admit(pki, b.port, policy("KOR"))
        # Issued "a day ago" for one day: it expires about five seconds from now.
        cert, key_pem = new_kor_tls(pki, now_ms() - DAY_MS + 5_000)
        async with PartnerClient(
            kor_with_cert(pki, pem(cert), key_pem), f"127.0.0.1:{b.port}"
        ) as kor:
            sub = kor.subscribe(["intel.>"])

            async def read_until_the_end() -> None:
                async for _ in sub:
                    pass

            with pytest.raises(ClientError) as info:
                await asyncio.wait_for(read_until_the_end(), 30)
            assert sub.caught_up.is_set()  # the stream was up and waiting
        assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
        assert "the client certificate expired at" in info.value.message
        [entry] = await b.audit.query(kind="auth.refused")
        assert (entry.decision, entry.partner) == ("cert_expired", "KOR")
        detail = json.loads(entry.detail_json)
        assert detail["method"] == "/coalition.v1.Exchange/Subscribe"
        assert "the call in progress was ended" in detail["reason"]
        assert b.auth is not None and b.auth.live_calls() == 0
    finally:
        await b.stop(grace=1)
