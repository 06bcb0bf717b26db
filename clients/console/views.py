"""What each console page shows, gathered through the operator's ``OperatorClient`` and
shaped into plain values for the templates. No authority here: every call is an Admin
RPC under the operator's own certificate, and the broker decides."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

from clients.console.policy_form import FIELDS, form_values
from clients.sdk import OperatorClient
from coalition.impact import Impact, change_impact
from coalition.labels import Classification, LabelError, Precedence, label_from_proto
from coalition.policy import PartnerPolicy, PartnerStatus, PolicyError, policy_from_proto
from coalition.v1 import admin_pb2, audit_pb2, policy_pb2

STATUS = {int(s): s.name.lower() for s in PartnerStatus}
PROPOSAL_STATE = {
    policy_pb2.PROPOSAL_PENDING: "pending",
    policy_pb2.PROPOSAL_APPROVED: "approved",
    policy_pb2.PROPOSAL_REJECTED: "rejected",
}
SELF_APPROVAL = (
    "You proposed this change: the broker lets a second operator approve it, never its "
    "proposer (two-person rule)."
)


def when(ms: int) -> str:
    """UTC time of a Unix-milliseconds instant, to the second."""
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ms: int, now_ms: int) -> str:
    """How long before now_ms, in words a person reads at a glance."""
    s = max(0, (now_ms - ms) // 1000)
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} days ago"


def _policy(pb: policy_pb2.PartnerPolicy) -> PartnerPolicy | None:
    try:
        return policy_from_proto(pb)
    except PolicyError:
        return None


def clearance_text(p: PartnerPolicy | None) -> str:
    if p is None:
        return "(unreadable policy)"
    return ", ".join(f"{k} {v.words}" for k, v in sorted(p.clearances.items())) or "none"


@dataclass
class PartnerRow:
    code: str
    status: str
    version: int
    connected: bool
    clearance: str
    groups: str
    categories: str
    backlog: int = 0
    in_flight: int = 0
    published: int = 0
    delivered: int = 0
    refusals: list[tuple[str, int]] = field(default_factory=list)
    kind: str = "partner"  # "gateway": a peer nation's broker (federation)


async def coalition_policies(client: OperatorClient) -> dict[str, PartnerPolicy]:
    """Every partner's current policy, by code (unreadable ones left out)."""
    out = {}
    for s in await client.partners():
        p = _policy((await client.show(s.partner)).policy.policy)
        if p is not None:
            out[s.partner] = p
    return out


async def partners(client: OperatorClient) -> list[PartnerRow]:
    stats = {p.partner: p for p in (await client.stats()).partners}
    gateways = {p.nation for p in (await client.peers()).peers}
    rows = []
    for s in await client.partners():
        pol = _policy((await client.show(s.partner)).policy.policy)
        st = stats.get(s.partner, admin_pb2.PartnerStats())
        rows.append(
            PartnerRow(
                code=s.partner,
                status=STATUS.get(s.status, "unknown"),
                version=s.policy_version,
                connected=s.connected,
                clearance=clearance_text(pol),
                groups=", ".join(sorted(pol.groups)) if pol else "",
                categories="; ".join(
                    f"{k}: {', '.join(sorted(v))}" for k, v in sorted(pol.categories.items())
                )
                if pol
                else "",
                backlog=st.backlog,
                in_flight=st.in_flight,
                published=st.published,
                delivered=st.delivered,
                refusals=sorted(st.refusals.items()),
                kind="gateway" if s.partner in gateways else "partner",
            )
        )
    return rows


@dataclass
class ProposalView:
    id: str
    partner: str
    proposed_by: str
    reason: str
    proposed: str
    age: str
    state: str
    decided_by: str
    diff: list[str]
    impact: Impact | None
    mine: bool
    # (field, before, after) of the whole policy, for a pending proposal.
    compare: list[tuple[str, str, str]] = field(default_factory=list)


async def proposals(
    client: OperatorClient, me: str, now_ms: int, *, include_decided: bool
) -> list[ProposalView]:
    props = await client.proposals(all=include_decided)
    coalition = await coalition_policies(client) if props else {}
    out = []
    for p in sorted(props, key=lambda p: (p.state != policy_pb2.PROPOSAL_PENDING, -p.proposed_ms)):
        after = _policy(p.policy)
        before = coalition.get(p.policy.partner)
        pending = p.state == policy_pb2.PROPOSAL_PENDING
        impact = change_impact(before, after, coalition.values()) if after and pending else None
        compare = []
        if after is not None and pending:
            old = form_values(before) if before is not None else {}
            new = form_values(after)
            old["status"] = before.status.name.lower() if before is not None else "-"
            new["status"] = after.status.name.lower()
            compare = [(k, old.get(k, ""), new[k]) for k in ("status", *FIELDS)]
        out.append(
            ProposalView(
                id=p.proposal_id,
                partner=p.policy.partner,
                proposed_by=p.proposed_by,
                reason=p.reason,
                proposed=when(p.proposed_ms),
                age=ago(p.proposed_ms, now_ms),
                state=PROPOSAL_STATE.get(p.state, "unknown"),
                decided_by=p.decided_by,
                diff=list(p.diff),
                impact=impact,
                mine=p.proposed_by == me,
                compare=compare,
            )
        )
    return out


@dataclass
class VersionView:
    version: int
    changed: str
    changed_by: str
    approved_by: str
    reason: str
    diff: list[str]
    status: str
    clearance: str


async def history(client: OperatorClient, partner: str) -> list[VersionView]:
    out = []
    for v in reversed(await client.history(partner)):
        pol = _policy(v.policy)
        out.append(
            VersionView(
                version=v.version,
                changed=when(v.changed_ms),
                changed_by=v.changed_by,
                approved_by=v.approved_by,
                reason=v.reason,
                diff=list(v.diff),
                status=STATUS.get(v.policy.status, "unknown"),
                clearance=clearance_text(pol),
            )
        )
    return out


def entry_dict(e: audit_pb2.AuditEntry) -> dict[str, object]:
    """An audit entry as the page and the live tail show it."""
    try:
        detail = json.dumps(json.loads(e.detail_json), sort_keys=True) if e.detail_json else ""
    except ValueError:
        detail = e.detail_json
    return {
        "seq": e.seq,
        "time": when(e.time_ms),
        "time_ms": e.time_ms,
        "kind": e.kind,
        "actor": e.actor,
        "partner": e.partner,
        "decision": e.decision,
        "refused": e.decision not in ("", "allow"),
        "message_id": e.message_id,
        "detail": detail,
    }


@dataclass
class Verification:
    ok: bool
    entries: int
    checkpoints: int
    first_broken_seq: int
    problem: str
    last_checkpoint_seq: int
    last_checkpoint: str
    last_checkpoint_age: str
    first_bad: dict[str, object] | None


async def verification(client: OperatorClient, now_ms: int) -> Verification:
    """The broker's verdict on its audit log, with the last signed checkpoint and, when
    the chain is broken, the first bad entry as the log holds it now."""
    v = await client.verify_audit()
    last: audit_pb2.AuditCheckpoint | None = None
    bad: audit_pb2.AuditEntry | None = None
    for rec in await client.export_audit():
        if rec.HasField("checkpoint"):
            last = rec.checkpoint
        elif rec.HasField("entry") and rec.entry.seq == v.first_broken_seq and not v.ok:
            bad = rec.entry
    return Verification(
        ok=v.ok,
        entries=v.entries,
        checkpoints=v.checkpoints,
        first_broken_seq=v.first_broken_seq,
        problem=v.problem,
        last_checkpoint_seq=last.seq if last else 0,
        last_checkpoint=when(last.time_ms) if last else "none yet",
        last_checkpoint_age=ago(last.time_ms, now_ms) if last else "",
        first_bad=entry_dict(bad) if bad is not None else None,
    )


@dataclass
class MessageRow:
    offset: int
    stored: str
    message_id: str
    sender: str
    topic: str
    precedence: str
    label: str
    size: int
    delivered_to: str


def _label_text(m: admin_pb2.MessageMeta) -> str:
    try:
        return label_from_proto(m.label).human()
    except LabelError:
        level = m.label.classification
        known = level in {int(c) for c in Classification}
        return f"(unreadable label, {Classification(level).words if known else 'no level'})"


def _precedence(n: int) -> str:
    try:
        return Precedence(n).name
    except ValueError:
        return str(n)


async def messages(
    client: OperatorClient, *, before: int, sender: str, topic: str, limit: int = 50
) -> list[MessageRow]:
    return [
        MessageRow(
            offset=m.offset,
            stored=when(m.stored_ms),
            message_id=m.message_id,
            sender=m.sender,
            topic=m.topic,
            precedence=_precedence(m.precedence),
            label=_label_text(m),
            size=m.size,
            delivered_to=", ".join(m.delivered_to) or "nobody yet",
        )
        for m in await client.messages(
            before_offset=before, limit=limit, sender=sender, topic=topic
        )
    ]
