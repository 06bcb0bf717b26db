"""`coalition-node publish`: seal one IntelSummary with durable sequences and publish it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from clients.node.config import NodeConfig
from clients.node.sequences import DurableSequencer
from clients.sdk import ClientError, NoRecipients, PartnerClient
from coalition.cli_common import EXIT_ERROR, EXIT_REFUSED, EXIT_UNREACHABLE
from coalition.labels import Label, Precedence
from coalition.pki import PartnerCredentials
from coalition.v1 import exchange_pb2, intel_pb2


class PublishError(Exception):
    """Publishing failed; the message is one line for the operator, code the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


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
        async with PartnerClient(creds, cfg.broker, sequencer=seq) as client:
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
                raise PublishError(exc.message, EXIT_REFUSED) from None
            except ClientError as exc:
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
        "recipient_sequences": dict(sealed.allocation.per_recipient),
        "label": label.human(),
        "topic": topic,
        "precedence": precedence.name,
    }
