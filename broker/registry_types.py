"""What every registry backend shares: the partner record, the change a callback is told
of, the refusal of a stale change, and the interface the broker types against
(``PartnerRegistry``: ``broker.registry.Registry`` on SQLite, and
``broker.jetstream.registry.JetStreamRegistry`` on a NATS JetStream cluster)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from broker.audit.items import AuditItem
from broker.store.base import OutboxRow
from coalition.policy import PartnerPolicy, policy_to_proto
from coalition.v1 import directory_pb2, policy_pb2

log = logging.getLogger("coalition.broker.registry")


@dataclass
class PartnerRecord:
    """What the broker knows of one partner, as cached in memory."""

    code: str
    signing_cert: bytes
    policy: PartnerPolicy
    version: int
    bundle: directory_pb2.SignedKeyBundle | None = None
    key_id: str = ""
    # Signing certificates operators replaced (DER, oldest first): messages stored under
    # them still verify; nothing new is accepted under them (broker.rekey).
    previous_certs: list[bytes] = field(default_factory=list)


ChangeKind = Literal["policy", "keys", "proposal"]


@dataclass(frozen=True)
class RegistryChange:
    """One committed registry change, as told to ``on_change`` callbacks.

    kind is ``policy`` (a new policy version, a registration included), ``keys`` (a new
    current key bundle) or ``proposal`` (a proposal made or decided); record is the
    partner's record after the change (None while the partner is not registered); local
    says whether the change was made through this registry object (by another broker
    sharing the cluster otherwise).
    """

    kind: ChangeKind
    partner: str
    record: PartnerRecord | None
    local: bool


ChangeCallback = Callable[[RegistryChange], None]


def tell(callbacks: list[ChangeCallback], change: RegistryChange) -> None:
    """Call each callback with change; one that raises is logged, the others still run
    (the change is committed whatever a callback does)."""
    for callback in callbacks:
        try:
            callback(change)
        except Exception:
            log.exception(
                "a registry change callback failed (%s of %r)", change.kind, change.partner
            )


def new_proposal(
    policy: PartnerPolicy,
    *,
    proposed_by: str,
    reason: str,
    diff: list[str],
    now_ms: int,
    signing_cert: bytes = b"",
) -> policy_pb2.Proposal:
    """A pending proposal with a fresh id, as every registry backend records it
    (signing_cert: a rekey proposal's new certificate)."""
    return policy_pb2.Proposal(
        signing_cert=signing_cert,
        proposal_id=uuid.uuid4().hex[:12],
        policy=policy_to_proto(policy),
        proposed_by=proposed_by,
        proposed_ms=now_ms,
        reason=reason,
        state=policy_pb2.PROPOSAL_PENDING,
        diff=diff,
    )


class StaleVersion(Exception):
    """The policy changed since the version a change was made against."""

    def __init__(self, current: int) -> None:
        super().__init__(f"policy is now at version {current}")
        self.current = current


class PartnerRegistry(Protocol):
    """Partners, their policy history, proposals and key bundles, with an audit outbox.

    get and all read memory and never wait; a write is visible to them when it returns.
    A proposal with a ``signing_cert`` (a rekey) replaces the partner's signing
    certificate when approved, in the same commit as its policy version: the old one goes
    to ``previous_certs`` and the current key bundle is dropped (it was signed under the
    old key; the partner registers its keys again).
    Every write commits its audit entry together with the change, in the registry's
    audit outbox (read_outbox, forget_outbox: an OutboxSource of the audit drainer).
    on_change callbacks are told of every committed change, made through this object or
    (on a shared backend) through another broker.
    """

    def get(self, code: str) -> PartnerRecord | None: ...

    def all(self) -> list[PartnerRecord]: ...

    def on_change(self, callback: ChangeCallback) -> None: ...

    async def register(
        self,
        code: str,
        signing_cert: bytes,
        policy: PartnerPolicy,
        *,
        actor: str,
        reason: str,
        now_ms: int,
        audit: AuditItem | None = None,
    ) -> policy_pb2.PolicyVersion: ...

    async def apply(
        self,
        policy: PartnerPolicy,
        *,
        changed_by: str,
        approved_by: str,
        reason: str,
        diff: list[str],
        now_ms: int,
        expected_version: int = 0,
        audit: Callable[[int], AuditItem] | None = None,
    ) -> policy_pb2.PolicyVersion: ...

    async def history(self, code: str) -> list[policy_pb2.PolicyVersion]: ...

    async def propose(
        self,
        policy: PartnerPolicy,
        *,
        base_version: int,
        proposed_by: str,
        reason: str,
        diff: list[str],
        now_ms: int,
        audit: Callable[[str], AuditItem] | None = None,
        signing_cert: bytes = b"",
    ) -> policy_pb2.Proposal: ...

    async def proposal(self, pid: str) -> tuple[policy_pb2.Proposal, int] | None: ...

    async def proposals(self, *, include_decided: bool) -> list[policy_pb2.Proposal]: ...

    async def decide_proposal(
        self,
        pid: str,
        *,
        state: int,
        decided_by: str,
        now_ms: int = 0,
        audit: AuditItem | None = None,
    ) -> bool: ...

    async def approve(
        self,
        pid: str,
        *,
        decided_by: str,
        now_ms: int,
        audit: Callable[[int], list[AuditItem]] | None = None,
    ) -> policy_pb2.PolicyVersion | None: ...

    async def set_bundle(
        self,
        code: str,
        key_id: str,
        signed: directory_pb2.SignedKeyBundle,
        now_ms: int,
        audit: AuditItem | None = None,
    ) -> None: ...

    async def read_outbox(self, after: int, limit: int) -> list[OutboxRow]: ...

    async def forget_outbox(self, through: int) -> None: ...

    def close(self) -> None: ...
