"""The registry stream's messages and the in-memory view a broker rebuilds from them.

One stream holds the registry of a deployment; each kind of fact has its own subjects
(``<prefix>.reg.<kind>.<token>``) and every message is a whole fact:

==============================  =========================================================
subject                         each message
==============================  =========================================================
``reg.partner.<code>``          the signing certificate: at admission, again at a rekey
``reg.policy.<code>``           one policy version (``PolicyVersion``), oldest first
``reg.keys.<code>``             one key bundle; the last is the current one
``reg.proposal.<id>``           the proposal (``Proposal``) when made, again when decided
``reg.outbox``                  one audit record of a change; its stream sequence is its
                                outbox id
==============================  =========================================================

Headers carry what the payload does not: the partner code, the change id (one per
change, so a change whose acknowledgement was lost is found again), the commit time, a
key bundle's id and a proposal's base version. ``View.apply`` is a pure function of the
messages in stream order: applying a message twice, or one older than what a subject
already holds, changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from broker.registry_types import PartnerRecord, RegistryChange
from broker.store.base import OutboxRow
from coalition.policy import policy_from_proto
from coalition.v1 import directory_pb2, policy_pb2

H_PARTNER = "Coalition-Partner"
H_CHANGE = "Coalition-Change"
H_TIME = "Coalition-Time-Ms"
H_KEY_ID = "Coalition-Key-Id"
H_BASE = "Coalition-Base-Version"
H_EXPECT = "Nats-Expected-Last-Subject-Sequence"

Kind = Literal["partner", "policy", "keys", "proposal", "outbox"]
KINDS: tuple[Kind, ...] = ("partner", "policy", "keys", "proposal", "outbox")

_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def token(value: str) -> str:
    """value as one subject token: itself when it is letters, digits, '-' and '_' (every
    partner code and proposal id in practice), else '~' and its UTF-8 in hex, so that no
    value can reach into another's subject ('.', '*', '>' and spaces are NATS syntax)."""
    if _SAFE.fullmatch(value):
        return value
    return "~" + value.encode().hex()


@dataclass
class Outgoing:
    """One message of a change, before it is written."""

    subject: str
    data: bytes
    headers: dict[str, str]
    expect: int | None = None  # the subject's last sequence the change was made against

    def wire_headers(self) -> dict[str, str]:
        if self.expect is None:
            return dict(self.headers)
        return {**self.headers, H_EXPECT: str(self.expect)}


@dataclass
class View:
    """What the registry stream says, as far as it has been read (see the module
    docstring). ``subject_seq`` is the sequence of the last message applied per subject,
    ``changes`` the change ids applied (with their sequence)."""

    prefix: str  # "<prefix>.reg."
    records: dict[str, PartnerRecord] = field(default_factory=dict)
    certs: dict[str, bytes] = field(default_factory=dict)
    versions: dict[str, list[policy_pb2.PolicyVersion]] = field(default_factory=dict)
    proposals: dict[str, tuple[policy_pb2.Proposal, int, int]] = field(default_factory=dict)
    subject_seq: dict[str, int] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)
    outbox: dict[int, OutboxRow] = field(default_factory=dict)

    def subject(self, kind: Kind, value: str = "") -> str:
        return self.prefix + kind + (f".{token(value)}" if value else "")

    def kind_of(self, subject: str) -> Kind | None:
        if not subject.startswith(self.prefix):
            return None
        head = subject[len(self.prefix) :].split(".", 1)[0]
        return next((k for k in KINDS if k == head), None)

    def last(self, subject: str) -> int:
        return self.subject_seq.get(subject, 0)

    def apply(
        self, subject: str, seq: int, data: bytes, headers: dict[str, str], *, local: bool
    ) -> RegistryChange | None:
        """Apply one message (stream sequence seq); return the change a callback is told
        of, if it is one. A message at or below its subject's last sequence is skipped."""
        if seq <= self.subject_seq.get(subject, 0):
            return None
        kind = self.kind_of(subject)
        if kind is None:
            return None
        self.subject_seq[subject] = seq
        if cid := headers.get(H_CHANGE):
            self.changes[cid] = seq
        code = headers.get(H_PARTNER, "")
        if kind == "outbox":
            self.outbox[seq] = OutboxRow(seq, int(headers.get(H_TIME, "0")), data.decode())
            return None
        if kind == "partner":
            rec = self.records.get(code)
            self.certs[code] = data
            if rec is None or rec.signing_cert == data:
                return None
            # A rekey: the old certificate is kept as an earlier one, and the key bundle
            # signed under it is no longer current (the partner registers its keys again).
            rec.previous_certs.append(rec.signing_cert)
            rec.signing_cert, rec.bundle, rec.key_id = data, None, ""
            return RegistryChange("keys", code, rec, local)
        if kind == "policy":
            return RegistryChange("policy", code, self._policy(code, data), local)
        if kind == "keys":
            rec = self.records.get(code)
            if rec is not None:
                rec.bundle = directory_pb2.SignedKeyBundle.FromString(data)
                rec.key_id = headers.get(H_KEY_ID, "")
            return RegistryChange("keys", code, rec, local)
        prop = policy_pb2.Proposal.FromString(data)
        made = self.proposals.get(prop.proposal_id)
        first = made[2] if made else seq
        self.proposals[prop.proposal_id] = (prop, int(headers.get(H_BASE, "0")), first)
        return RegistryChange("proposal", prop.policy.partner, self.records.get(code), local)

    def _policy(self, code: str, data: bytes) -> PartnerRecord:
        pv = policy_pb2.PolicyVersion.FromString(data)
        self.versions.setdefault(code, []).append(pv)
        policy = policy_from_proto(pv.policy)
        rec = self.records.get(code)
        if rec is None:
            rec = self.records[code] = PartnerRecord(
                code, self.certs.get(code, b""), policy, pv.version
            )
        else:
            # In place, as the SQLite registry does: a record a caller holds stays current.
            rec.policy = policy
            rec.version = pv.version
        return rec

    def history(self, code: str) -> list[policy_pb2.PolicyVersion]:
        return [_copy(pv) for pv in self.versions.get(code, [])]

    def proposal(self, pid: str) -> tuple[policy_pb2.Proposal, int] | None:
        found = self.proposals.get(pid)
        return (_copy(found[0]), found[1]) if found else None

    def proposal_list(self, *, include_decided: bool) -> list[policy_pb2.Proposal]:
        rows = sorted(self.proposals.values(), key=lambda r: (r[0].proposed_ms, r[2]))
        return [
            _copy(p)
            for p, _, _ in rows
            if include_decided or p.state == policy_pb2.PROPOSAL_PENDING
        ]

    def outbox_rows(self, after: int, limit: int) -> list[OutboxRow]:
        ids = sorted(i for i in self.outbox if i > after)[:limit]
        return [self.outbox[i] for i in ids]

    def forget(self, through: int) -> None:
        for i in [i for i in self.outbox if i <= through]:
            del self.outbox[i]


_M = TypeVar("_M", policy_pb2.PolicyVersion, policy_pb2.Proposal)


def _copy(msg: _M) -> _M:
    """A copy a caller may change (the admin core marks a proposal it decided)."""
    out = type(msg)()
    out.CopyFrom(msg)
    return out
