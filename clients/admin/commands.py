"""The partner, policy, status and view commands of ``coalition-admin``, one coroutine each."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from clients.admin.context import Ctx, UsageError
from clients.admin.policy_flags import FlagError, any_flag, apply_flags
from clients.admin.render import (
    diff_block,
    fields,
    iso,
    print_json,
    table,
    to_json,
    version_pairs,
)
from coalition.impact import change_impact
from coalition.labels import LabelError, parse_label
from coalition.policy import (
    PartnerPolicy,
    PartnerStatus,
    PolicyError,
    policy_diff,
    policy_from_proto,
    policy_to_proto,
)
from coalition.topics import TopicError, validate_topic
from coalition.v1 import admin_pb2, directory_pb2, policy_pb2


def _code(text: str) -> str:
    return text.strip().upper()


def _state(state: policy_pb2.ProposalState.ValueType) -> str:
    return policy_pb2.ProposalState.Name(state).removeprefix("PROPOSAL_")


def _report_change(ctx: Ctx, resp: admin_pb2.PolicyChangeResponse, what: str) -> None:
    """Say whether a change was applied or awaits a second operator, with its diff."""
    if ctx.as_json:
        print_json(to_json(resp))
        return
    if resp.WhichOneof("result") == "applied":
        v = resp.applied
        of = "" if v.policy.partner in what else f" of {v.policy.partner}"
        print(f"{what}: applied as version {v.version}{of}")
        print(diff_block(v.diff))
        return
    p = resp.proposal
    if p.state == policy_pb2.PROPOSAL_REJECTED:
        print(f"proposal {p.proposal_id} rejected by {p.decided_by}")
        print(diff_block(p.diff))
        return
    print(f"{what}: proposal {p.proposal_id} created: needs approval by a second operator")
    print(diff_block(p.diff))
    print(f"a different operator approves with: coalition-admin policy approve {p.proposal_id}")


# -- partners -------------------------------------------------------------------------------


async def partners_list(ctx: Ctx) -> None:
    """Every registered partner with status, policy version, connection and key id; a
    federated broker's peer gateways (registry entries too) are marked kind gateway."""
    partners = await ctx.rpc(ctx.client.partners())
    gateways = {p.nation for p in (await ctx.rpc(ctx.client.peers())).peers}

    def kind(code: str) -> str:
        return "gateway" if code in gateways else "partner"

    if ctx.as_json:
        print_json({"partners": [{**to_json(p), "kind": kind(p.partner)} for p in partners]})
        return
    rows = [
        (
            p.partner,
            kind(p.partner),
            directory_pb2.PartnerStatus.Name(p.status),
            p.policy_version,
            "yes" if p.connected else "no",
            p.key_id,
        )
        for p in partners
    ]
    print(table(("PARTNER", "KIND", "STATUS", "VERSION", "CONNECTED", "KEY ID"), rows))


def _cert_pairs(der: bytes) -> list[tuple[str, object]]:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return [("signing cert", "(not a readable certificate)")]
    return [
        ("signing cert serial", format(cert.serial_number, "x")),
        ("signing cert sha256", cert.fingerprint(hashes.SHA256()).hex()),
        (
            "signing cert valid",
            f"{iso(_ms(cert.not_valid_before_utc))} to {iso(_ms(cert.not_valid_after_utc))}",
        ),
    ]


def _ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


async def partners_show(ctx: Ctx) -> None:
    """One partner: summary, current policy, directory entry (public material only)."""
    resp = await ctx.rpc(ctx.client.show(_code(ctx.ns.partner)))
    if ctx.as_json:
        print_json(to_json(resp))
        return
    s, d = resp.summary, resp.directory
    pairs: list[tuple[str, object]] = [
        ("connected", "yes" if s.connected else "no"),
        ("key id", s.key_id),
    ]
    if d.HasField("key_bundle"):
        bundle = directory_pb2.KeyBundle.FromString(d.key_bundle.bundle)
        pairs += [
            ("key kem", bundle.kem),
            ("key valid", f"{iso(bundle.not_before_ms)} to {iso(bundle.not_after_ms)}"),
        ]
    pairs += _cert_pairs(d.signing_cert)
    if d.previous_signing_certs:
        serials = [
            x509.load_der_x509_certificate(c).serial_number for c in d.previous_signing_certs
        ]
        pairs.append(("earlier signing certs", ", ".join(f"{n:x}" for n in serials)))
    print(fields([*version_pairs(resp.policy), *pairs]))


def _read_cert(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read signing certificate {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in raw:
            cert = x509.load_pem_x509_certificate(raw)
        else:
            cert = x509.load_der_x509_certificate(raw)
    except ValueError:
        raise UsageError(f"{path} is not a PEM or DER certificate") from None
    return cert.public_bytes(Encoding.DER)


async def partners_admit(ctx: Ctx) -> None:
    """Register a partner and propose its policy; a second operator approves."""
    code = _code(ctx.ns.partner)
    der = _read_cert(ctx.ns.signing_cert)
    try:
        base = PartnerPolicy(code, status=PartnerStatus.ACTIVE)
        policy = apply_flags(base, ctx.ns)
    except (FlagError, PolicyError) as exc:
        raise UsageError(str(exc)) from None
    resp = await ctx.rpc(ctx.client.admit(code, der, policy_to_proto(policy), ctx.ns.reason))
    _report_change(ctx, resp, f"admit {code}")


async def partners_rekey(ctx: Ctx) -> None:
    """Propose a new signing certificate for an admitted partner; a second operator
    approves, and the one it replaces is kept for the messages stored under it."""
    code = _code(ctx.ns.partner)
    der = _read_cert(ctx.ns.signing_cert)
    resp = await ctx.rpc(ctx.client.rekey(code, der, ctx.ns.reason))
    _report_change(ctx, resp, f"rekey {code}")


# -- policy ---------------------------------------------------------------------------------


async def policy_show(ctx: Ctx) -> None:
    """The current policy version of a partner."""
    v = await ctx.rpc(ctx.client.policy(_code(ctx.ns.partner)))
    if ctx.as_json:
        print_json(to_json(v))
        return
    print(fields(version_pairs(v)))


async def policy_set(ctx: Ctx) -> None:
    """Apply flags to the current policy; lowering applies at once, raising is proposed."""
    code = _code(ctx.ns.partner)
    if not any_flag(ctx.ns):
        raise UsageError("give at least one policy flag (see --help)")
    current = await ctx.rpc(ctx.client.policy(code))
    try:
        base = policy_from_proto(current.policy)
        new = apply_flags(base, ctx.ns)
    except (FlagError, PolicyError) as exc:
        raise UsageError(str(exc)) from None
    if not policy_diff(base, new):
        raise UsageError(
            f"nothing to change: version {current.version} of {code} already says that"
        )
    expected = current.version if ctx.ns.expected_version is None else ctx.ns.expected_version
    resp = await ctx.rpc(ctx.client.set_policy(policy_to_proto(new), ctx.ns.reason, expected))
    _report_change(ctx, resp, f"policy of {code}")


async def policy_approve(ctx: Ctx) -> None:
    """Approve another operator's proposal; it is applied at once."""
    resp = await ctx.rpc(ctx.client.approve(ctx.ns.proposal_id, ctx.ns.reason or ""))
    _report_change(ctx, resp, f"proposal {ctx.ns.proposal_id} approved")


async def policy_reject(ctx: Ctx) -> None:
    """Reject a pending proposal."""
    resp = await ctx.rpc(ctx.client.reject(ctx.ns.proposal_id, ctx.ns.reason or ""))
    _report_change(ctx, resp, f"proposal {ctx.ns.proposal_id}")


async def policy_proposals(ctx: Ctx) -> None:
    """Pending proposals (all with --all)."""
    props = await ctx.rpc(ctx.client.proposals(all=ctx.ns.all))
    if ctx.as_json:
        print_json({"proposals": [to_json(p) for p in props]})
        return
    rows = [
        (
            p.proposal_id,
            p.policy.partner,
            _state(p.state),
            p.proposed_by,
            iso(p.proposed_ms),
            p.decided_by,
            p.reason,
            "; ".join(p.diff),
        )
        for p in props
    ]
    heads = ("ID", "PARTNER", "STATE", "BY", "PROPOSED", "DECIDED BY", "REASON", "CHANGES")
    print(table(heads, rows))


async def policy_impact(ctx: Ctx) -> None:
    """What a pending proposal would grant and withdraw (coalition.impact), from the
    partners' current policies."""
    props = await ctx.rpc(ctx.client.proposals())
    prop = next((p for p in props if p.proposal_id == ctx.ns.proposal_id), None)
    if prop is None:
        raise UsageError(f"no pending proposal {ctx.ns.proposal_id}")
    current = {}
    for s in await ctx.rpc(ctx.client.partners()):
        current[s.partner] = policy_from_proto(
            (await ctx.rpc(ctx.client.show(s.partner))).policy.policy
        )
    after = policy_from_proto(prop.policy)
    imp = change_impact(current.get(after.partner), after, current.values())
    if ctx.as_json:
        print_json({"proposal_id": prop.proposal_id, **imp.as_dict()})
        return
    print(f"proposal {prop.proposal_id} for {after.partner}:")
    if imp.empty:
        print("  grants and withdraws no label or topic the coalition uses")
    for name, values in imp.as_dict().items():
        if name != "partner" and isinstance(values, list) and values:
            print(f"  {name.replace('_', ' ')}:")
            print("\n".join(f"    {v}" for v in values))


async def policy_history(ctx: Ctx) -> None:
    """Every policy version of a partner, oldest first."""
    versions = await ctx.rpc(ctx.client.history(_code(ctx.ns.partner)))
    if ctx.as_json:
        print_json({"versions": [to_json(v) for v in versions]})
        return
    rows = [
        (
            v.version,
            iso(v.changed_ms),
            v.changed_by,
            v.approved_by,
            v.reason,
            "; ".join(v.diff),
        )
        for v in versions
    ]
    print(table(("VERSION", "CHANGED", "BY", "APPROVED BY", "REASON", "CHANGES"), rows))


async def suspend(ctx: Ctx) -> None:
    """Suspend a partner at once (lowering): its streams close."""
    code = _code(ctx.ns.partner)
    resp = await ctx.rpc(ctx.client.suspend(code, ctx.ns.reason))
    _report_change(ctx, resp, f"suspend {code}")


async def reinstate(ctx: Ctx) -> None:
    """Propose reinstating a suspended partner (a second operator approves)."""
    code = _code(ctx.ns.partner)
    resp = await ctx.rpc(ctx.client.reinstate(code, ctx.ns.reason))
    _report_change(ctx, resp, f"reinstate {code}")


# -- views ----------------------------------------------------------------------------------


async def stats(ctx: Ctx) -> None:
    """Broker totals and per-partner counters."""
    s = await ctx.rpc(ctx.client.stats())
    if ctx.as_json:
        print_json(to_json(s))
        return
    print(
        fields(
            [
                ("live streams", s.live_streams),
                ("stored messages", s.store_messages),
                ("stored bytes", s.store_bytes),
                ("audit entries", s.audit_entries),
            ]
        )
    )
    print()
    rows = [
        (p.partner, p.published, p.delivered, p.refused, p.live_streams, p.backlog)
        for p in s.partners
    ]
    heads = ("PARTNER", "PUBLISHED", "DELIVERED", "REFUSED", "STREAMS", "BACKLOG")
    print(table(heads, rows))


async def who_receives(ctx: Ctx) -> None:
    """A dry run of the delivery decision for every partner, with reasons."""
    try:
        label = parse_label(ctx.ns.label)
        topic = validate_topic(ctx.ns.topic)
    except (LabelError, TopicError) as exc:
        raise UsageError(str(exc)) from None
    resp = await ctx.rpc(ctx.client.who_receives(label, topic))
    if ctx.as_json:
        print_json({"label": label.human(), "topic": topic, **to_json(resp)})
        return
    n = sum(d.allowed for d in resp.decisions)
    print(f"{label.human()} on {topic}: {n} of {len(resp.decisions)} partners receive it")
    rows = [
        (d.partner, "yes" if d.allowed else "no", d.reason, d.explanation) for d in resp.decisions
    ]
    print(table(("PARTNER", "ALLOWED", "REASON", "EXPLANATION"), rows))
