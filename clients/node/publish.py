"""`coalition-node publish`: seal one IntelSummary with durable sequences and publish it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from clients.node.config import NodeConfig, load_trust
from clients.node.sequences import DurableSequencer
from clients.sdk import ClientError, NoRecipients, PartnerClient
from coalition import envelope_v2
from coalition.cli_common import EXIT_ERROR, EXIT_REFUSED, EXIT_UNREACHABLE
from coalition.labels import Label, Precedence
from coalition.pki import PartnerCredentials
from coalition.v1 import exchange_pb2, intel_pb2


class PublishError(Exception):
    """Publishing failed; the message is one line for the operator, code the exit status,
    ``details`` the same for --json."""

    def __init__(
        self, message: str, code: int = EXIT_ERROR, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}


_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _code(exc: ClientError | TimeoutError) -> int:
    if isinstance(exc, TimeoutError) or exc.status in _UNREACHABLE:
        return EXIT_UNREACHABLE
    return EXIT_REFUSED


async def publish(
    cfg: NodeConfig,
    creds: PartnerCredentials,
    summary: intel_pb2.IntelSummary,
    *,
    topic: str,
    label: Label,
    precedence: Precedence,
    timeout: float,
) -> dict[str, Any]:
    """Seal for the eligible recipients and publish; the result as a JSON-ready dict."""
    seq = DurableSequencer(cfg.inbox)
    try:
        trust = load_trust(cfg)
        async with PartnerClient(creds, cfg.broker, sequencer=seq, trust=trust) as client:
            try:
                sealed = await asyncio.wait_for(
                    client.seal(
                        summary.SerializeToString(),
                        topic=topic,
                        label=label,
                        precedence=precedence,
                    ),
                    timeout,
                )
            except NoRecipients as exc:
                raise PublishError(
                    f"not published: {exc.message}",
                    EXIT_REFUSED,
                    {"not_sealed_for": exc.not_sealed_for},
                ) from None
            except ClientError as exc:
                if exc.status == grpc.StatusCode.PERMISSION_DENIED:
                    # The broker names the sender's own failing rule (origination ceiling,
                    # publish topics), or that it is suspended or not admitted.
                    raise PublishError(
                        f"not published, the broker refused: {exc.message}",
                        EXIT_REFUSED,
                        {"status": exc.status.name},
                    ) from None
                raise PublishError(f"broker {cfg.broker}: {exc}", _code(exc)) from None
            except TimeoutError:
                raise PublishError(
                    f"broker {cfg.broker} did not answer in {timeout:g} s", EXIT_UNREACHABLE
                ) from None
            try:
                [res] = await asyncio.wait_for(client.publish([sealed.envelope]), timeout)
            except (ClientError, TimeoutError) as exc:
                # The envelope may be stored: keep its numbers, and say the outcome is unknown.
                raise PublishError(
                    f"outcome of {sealed.message_id} unknown, the broker did not confirm: "
                    f"{exc or 'timed out'}"
                ) from None
            if res.outcome != exchange_pb2.ACCEPTED:
                client.discard(sealed)
                raise PublishError(
                    f"broker refused {sealed.message_id}: {res.reason_code}: {res.reason}",
                    EXIT_REFUSED,
                )
    finally:
        seq.close()
    return {
        "message_id": sealed.message_id,
        "offset": res.offset,
        "sequence": sealed.sequence,
        "recipients": list(sealed.recipients),
        "not_sealed_for": dict(sealed.not_sealed_for),
        "recipient_sequences": dict(sealed.allocation.per_recipient),
        "label": label.human(),
        "topic": topic,
        "precedence": precedence.name,
        # v2 (a hybrid-signed batch root) when the signing certificate certifies an
        # ML-DSA-65 key, v1 (an Ed25519 signature) otherwise.
        "envelope": "v2" if envelope_v2.is_v2(sealed.envelope) else "v1",
    }
