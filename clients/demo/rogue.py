"""A rogue process for the demo: it holds a valid partner certificate and misbehaves.

It tries impersonation (an envelope claiming another sender), a label downgrade
(a genuine envelope whose signed label is rewritten) and a replay (the same
envelope twice), each in the envelope version its credentials seal (v2 with a hybrid
signing key, v1 without). It prints one JSON object per attempt with the broker's answer.
Run: python -m clients.demo.rogue --identity pki/partners/UKR --broker 127.0.0.1:7443
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from clients.sdk import PartnerClient
from coalition import envelope as env
from coalition import envelope_v2, merkle
from coalition.clock import wall_clock_ms
from coalition.epoch import SenderEpochs
from coalition.labels import Classification, label_to_proto, parse_label
from coalition.pki import PartnerCredentials, load_partner
from coalition.v1 import envelope_pb2, exchange_pb2

LABEL = parse_label("NATO SECRET // REL TO NATO, UKR")


def _result(attack: str, claim: str, res: exchange_pb2.PublishResult) -> dict[str, Any]:
    return {
        "attack": attack,
        "claim": claim,
        "message_id": res.message_id,
        "accepted": res.outcome == exchange_pb2.ACCEPTED,
        "status": res.status,
        "reason_code": res.reason_code,
        "reason": res.reason,
    }


async def run(identity: Path, broker: str, victim: str) -> list[dict[str, Any]]:
    """Make the three attempts and return the broker's answers."""
    creds = load_partner(identity)
    out: list[dict[str, Any]] = []
    async with PartnerClient(creds, broker) as me:
        directory = await me.directory()
        target = directory.peers[victim]
        assert target.hpke_public is not None
        recipients = [env.Recipient(victim, target.key_id, target.hpke_public)]

        # 1. Impersonation: claim to be the victim, signing with our own key.
        forged = _impersonate(creds, victim, recipients, me.sequencer.next())
        [res] = await me.publish([forged])
        out.append(_result("impersonation", f"sender={victim} over {creds.code}'s connection", res))

        # 2. Label downgrade: a genuine signed envelope, its label rewritten to UNCLASSIFIED.
        genuine = await me.seal(
            b"genuine report", topic="intel.ground", label=LABEL, recipients=[victim]
        )
        downgraded = downgrade(genuine.envelope)
        [res] = await me.publish([downgraded])
        out.append(_result("label downgrade", "SECRET rewritten to UNCLASSIFIED", res))

        # 3. Replay: publish a genuine envelope, then the very same bytes again.
        [first] = await me.publish([genuine.envelope])
        out.append(_result("replay (first copy)", "genuine envelope", first))
        [res] = await me.publish([genuine.envelope])
        out.append(_result("replay", "the same envelope again", res))
    return out


def _impersonate(
    creds: PartnerCredentials, victim: str, recipients: list[env.Recipient], sequence: int
) -> envelope_pb2.Envelope:
    """An envelope naming ``victim`` as its sender, signed with our own key."""
    hybrid = creds.hybrid_signing_key
    if hybrid is not None:
        [forged] = envelope_v2.seal_batch(
            [
                envelope_v2.Message(
                    plaintext=b"fabricated report",
                    topic="intel.ground",
                    label=label_to_proto(LABEL),
                    precedence=1,
                    content_type=env.INTEL_SUMMARY,
                    recipients=recipients,
                    sequence=sequence,
                    created_ms=wall_clock_ms(),
                )
            ],
            sender=victim,
            signing_key=hybrid,
            signing_key_id=creds.signing_key_id,
            epochs=SenderEpochs(victim),
            created_ms=wall_clock_ms(),
        )
        return forged
    return env.seal(
        plaintext=b"fabricated report",
        sender=victim,
        signing_key=creds.signing_key,
        signing_key_id=creds.signing_key_id,
        sequence=sequence,
        topic="intel.ground",
        label=label_to_proto(LABEL),
        precedence=1,
        content_type=env.INTEL_SUMMARY,
        recipients=recipients,
        created_ms=wall_clock_ms(),
    )


def downgrade(genuine: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """The genuine envelope with its signed label rewritten to UNCLASSIFIED.

    Everything else a verifier checks first is kept consistent, so that only the
    signature can catch the change: v1 keeps the payload digest last; v2 (a batch of
    one) recomputes the leaf and the root over the rewritten header and keeps the old
    root signature.
    """
    if not envelope_v2.is_v2(genuine):
        raw = genuine.header
        prefix, digest_field = raw[:-34], raw[-34:]
        header = envelope_pb2.Header.FromString(prefix)
        header.label.classification = int(Classification.UNCLASSIFIED)  # type: ignore[assignment]
        return envelope_pb2.Envelope(
            header=header.SerializeToString() + digest_field,
            ciphertext=genuine.ciphertext,
            signature=genuine.signature,
        )
    header_v2 = envelope_pb2.HeaderV2.FromString(genuine.header_v2)
    core = envelope_pb2.Header.FromString(header_v2.core)
    core.label.classification = int(Classification.UNCLASSIFIED)  # type: ignore[assignment]
    header_v2.core = core.SerializeToString()
    leaf = header_v2.SerializeToString()
    root = envelope_pb2.BatchRoot.FromString(genuine.batch.root)
    root.root = merkle.leaf_hash(genuine.batch.leaf_salt, leaf)  # a tree of one leaf
    out = envelope_pb2.Envelope()
    out.CopyFrom(genuine)
    out.header_v2 = leaf
    out.batch.root = root.SerializeToString()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clients.demo.rogue",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--identity", type=Path, required=True, help="a partner credential dir")
    p.add_argument("--broker", required=True, help="host:port")
    p.add_argument("--victim", default="USA", help="partner to impersonate (default USA)")
    ns = p.parse_args(argv)
    results = asyncio.run(run(ns.identity, ns.broker, ns.victim))
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
