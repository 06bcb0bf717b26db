"""Sealing envelopes straight with the kernel for broker tests, whatever the SDK does.

``seal_v2`` makes one v2 batch (``envelope_v2.seal_batch``): a partner's client gives the
directory (recipients' key bundles, checked against the CA) and the sequence numbers;
the root is signed with the partner's hybrid key from its credentials. ``seal_v1`` makes
one v1 envelope (``coalition.envelope.seal``), which the broker takes only from a partner
whose signing certificate holds no ML-DSA-65 key: ``v1_only`` makes such credentials,
``admit_with`` admits a partner under them. ``opened`` and ``open_v1`` are the
recipient's side: verify and open a delivered envelope under the sender's certified key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.sdk import PartnerClient
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import RecipientEpochs, SenderEpochs
from coalition.hybrid import HybridPublicKey, HybridSigningKey
from coalition.identity import Identity, certified_hybrid_key, signing_key_id
from coalition.labels import Label, label_to_proto
from coalition.pki import PartnerCredentials, issue_signing_cert, load_ca, load_partner
from coalition.policy import PartnerPolicy, policy_to_proto
from coalition.v1 import envelope_pb2
from tests.helpers import now_ms, operator


def hybrid_key(creds: PartnerCredentials) -> HybridSigningKey:
    key = creds.hybrid_signing_key
    assert key is not None, f"{creds.code}'s credentials carry no ML-DSA-65 key"
    return key


async def seal_v2(
    client: PartnerClient,
    payloads: Sequence[bytes],
    *,
    topic: str,
    label: Label,
    recipients: Sequence[str],
    epochs: SenderEpochs | None = None,
    signing_key: HybridSigningKey | None = None,
) -> list[envelope_pb2.Envelope]:
    """One v2 batch from ``client``'s partner: one envelope per payload, in order."""
    d = await client.directory(refresh=True)
    chosen = []
    for name in recipients:
        peer = d.peers[name]
        assert peer.hpke_public is not None, f"no key bundle for {name}"
        chosen.append(env.Recipient(name, peer.key_id, peer.hpke_public))
    messages = []
    for p in payloads:
        alloc = client.sequencer.allocate(recipients)  # in batch order, as the SDK does
        messages.append(
            envelope_v2.Message(
                plaintext=p,
                topic=topic,
                label=label_to_proto(label),
                precedence=1,
                content_type=env.INTEL_SUMMARY,
                recipients=[
                    dataclasses.replace(r, sequence=alloc.per_recipient.get(r.partner, 0))
                    for r in chosen
                ],
                sequence=alloc.sequence,
                created_ms=client.clock(),
            )
        )
    return envelope_v2.seal_batch(
        messages,
        sender=client.code,
        signing_key=signing_key or hybrid_key(client.creds),
        signing_key_id=client.creds.signing_key_id,
        epochs=epochs or SenderEpochs(client.code),
        created_ms=client.clock(),
    )


def hybrid_signer(*creds: PartnerCredentials) -> envelope_v2.HybridSigner:
    """A recipient's signer: each partner's hybrid key read from its signing certificate."""
    keys: dict[tuple[str, str], HybridPublicKey] = {}
    for c in creds:
        key = certified_hybrid_key(x509.load_der_x509_certificate(c.signing_cert_der))
        assert key is not None, f"{c.code}'s signing certificate carries no ML-DSA-65 key"
        keys[(c.code, c.signing_key_id)] = key
    return lambda sender, key_id: keys[(sender, key_id)]


def opened(
    e: envelope_pb2.Envelope, me: PartnerCredentials, *senders: PartnerCredentials
) -> envelope_v2.OpenedV2:
    """Verify and open a delivered v2 envelope as ``me`` would."""
    epochs = RecipientEpochs(me.code, me.hpke_keys)
    return envelope_v2.open(e, epochs=epochs, signer=hybrid_signer(*senders))


def v1_only(pki: Path, code: str) -> PartnerCredentials:
    """code's credentials with a new Ed25519-only signing certificate (no ML-DSA-65 key):
    a partner that has not moved to hybrid keys. Fit to send only: its key bundle stays
    signed by the PKI's signing key, which this certificate does not certify."""
    key = Ed25519PrivateKey.generate()
    cert = issue_signing_cert(load_ca(pki), Identity.partner(code), key.public_key(), now_ms())
    creds = load_partner(pki / "partners" / code)
    return dataclasses.replace(
        creds,
        signing_key=key,
        signing_cert=cert,
        signing_key_id=signing_key_id(cert),
        hybrid_signing_key=None,
    )


async def admit_with(pki: Path, port: int, creds: PartnerCredentials, pol: PartnerPolicy) -> None:
    """Admit creds' partner under its signing certificate (op1 proposes, op2 approves)."""
    async with operator(pki, "op1", port) as op1, operator(pki, "op2", port) as op2:
        resp = await op1.admit(creds.code, creds.signing_cert_der, policy_to_proto(pol), "test")
        assert resp.WhichOneof("result") == "proposal"
        done = await op2.approve(resp.proposal.proposal_id, "approved in test")
        assert done.WhichOneof("result") == "applied"


async def seal_v1(
    client: PartnerClient,
    text: bytes,
    *,
    topic: str,
    label: Label,
    recipients: Sequence[str],
    sender: str | None = None,
) -> envelope_pb2.Envelope:
    """A v1 envelope from client's partner (or claiming ``sender``), Ed25519 only."""
    d = await client.directory(refresh=True)
    chosen = []
    for name in recipients:
        peer = d.peers[name]
        assert peer.hpke_public is not None, f"no key bundle for {name}"
        chosen.append(env.Recipient(name, peer.key_id, peer.hpke_public))
    return env.seal(
        plaintext=text,
        sender=sender or client.code,
        signing_key=client.creds.signing_key,
        signing_key_id=client.creds.signing_key_id,
        sequence=client.sequencer.allocate(recipients).sequence,
        topic=topic,
        label=label_to_proto(label),
        precedence=1,
        content_type=env.INTEL_SUMMARY,
        recipients=chosen,
        created_ms=client.clock(),
    )


def open_v1(
    e: envelope_pb2.Envelope, me: PartnerCredentials, sender: PartnerCredentials
) -> env.Opened:
    """Verify and open a delivered v1 envelope as ``me`` would (sender's Ed25519 key)."""
    key = sender.signing_key.public_key()
    return env.open(e, recipient=me.code, keys=me.hpke_keys, signer=lambda _s, _k: key)


def open_any(e: envelope_pb2.Envelope, me: PartnerCredentials, sender: PartnerCredentials) -> bytes:
    """The plaintext of a delivered envelope of either version."""
    if envelope_v2.is_v2(e):
        return opened(e, me, sender).plaintext
    return open_v1(e, me, sender).plaintext


def forged_signature(e: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """e with one bit of its signature flipped (v1: the header's; v2: the Ed25519 half of
    its batch root's), everything else kept: refused bad_signature either way."""
    out = envelope_pb2.Envelope()
    out.CopyFrom(e)
    if envelope_v2.is_v2(e):
        sig = out.batch.root_signature
        sig.ed25519 = bytes([sig.ed25519[0] ^ 1]) + sig.ed25519[1:]
    else:
        out.signature = bytes([out.signature[0] ^ 1]) + out.signature[1:]
    return out


def truncated(e: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """e with its header (v1) or v2 header cut to 40 bytes: a header that does not parse."""
    out = envelope_pb2.Envelope()
    out.CopyFrom(e)
    if envelope_v2.is_v2(e):
        out.header_v2 = out.header_v2[:40]
    else:
        out.header = out.header[:40]
    return out
