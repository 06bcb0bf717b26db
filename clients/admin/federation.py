"""``coalition-admin federation``: peer nations' gateways (docs/federation.md).

A peer is admitted like a partner, under the two-person rule, as the registry entry
named by its nation code, with that nation's CA certificate (the one the broker's trust
file names) in place of a signing certificate; its policy's receive side is what this
broker releases to that nation, its publish side what that nation may bring in.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from clients.admin import commands as cmd
from clients.admin.context import Ctx, UsageError
from clients.admin.policy_flags import FlagError, add_policy_flags, apply_flags
from clients.admin.render import fields, print_json, table, to_json
from coalition.policy import PartnerPolicy, PartnerStatus, PolicyError, policy_to_proto
from coalition.v1 import admin_pb2, directory_pb2

Leaf = Callable[..., argparse.ArgumentParser]
Group = Callable[..., "argparse._SubParsersAction[argparse.ArgumentParser]"]


def _status(p: admin_pb2.FederationPeer) -> str:
    if p.status == directory_pb2.PARTNER_STATUS_UNSPECIFIED:
        return "not admitted"
    return directory_pb2.PartnerStatus.Name(p.status).lower()


async def federation_list(ctx: Ctx) -> None:
    """Each peer nation: its gateway's standing, its link, its counters."""
    resp = await ctx.rpc(ctx.client.peers())
    if ctx.as_json:
        print_json(to_json(resp))
        return
    if not resp.nation:
        print("this broker is not federated (no [federation] file in its config)")
        return
    rows = [
        (
            p.nation,
            _status(p),
            "up" if p.connected else "down",
            p.forwarded,
            p.refused_by_peer,
            p.receipts,
            p.received,
            p.refused,
            p.lag,
            p.partners_learned,
            p.endpoint,
        )
        for p in resp.peers
    ]
    print(f"nation {resp.nation}")
    print(
        table(
            (
                "PEER",
                "STATUS",
                "LINK",
                "FORWARDED",
                "REFUSED_THERE",
                "RECEIPTS",
                "RECEIVED",
                "REFUSED_HERE",
                "LAG",
                "PARTNERS",
                "ENDPOINT",
            ),
            rows,
        )
    )


async def federation_show(ctx: Ctx) -> None:
    """One peer: its counters, its CA, and its gateway's policy."""
    code = ctx.ns.nation.strip().upper()
    resp = await ctx.rpc(ctx.client.peers())
    found = [p for p in resp.peers if p.nation == code]
    if not found:
        raise UsageError(f"{code} is not a peer nation in this broker's trust file")
    peer = found[0]
    policy = None
    if peer.status != directory_pb2.PARTNER_STATUS_UNSPECIFIED:
        policy = await ctx.rpc(ctx.client.policy(code))
    if ctx.as_json:
        print_json({"peer": to_json(peer), "policy": to_json(policy) if policy else None})
        return
    print(
        fields(
            [
                ("nation", peer.nation),
                ("status", _status(peer)),
                ("link", "up" if peer.connected else "down"),
                ("endpoint", peer.endpoint),
                ("ca sha256", peer.ca_sha256),
                ("forwarded", peer.forwarded),
                ("duplicates", peer.duplicates),
                ("refused there", peer.refused_by_peer),
                ("receipts", peer.receipts),
                ("received", peer.received),
                ("refused here", peer.refused),
                ("lag", peer.lag),
                ("partners learned", peer.partners_learned),
                ("last error", peer.last_error),
                ("policy version", peer.policy_version),
            ]
        )
    )


async def federation_add(ctx: Ctx) -> None:
    """Propose admitting a peer nation's gateway; a second operator approves."""
    code = ctx.ns.nation.strip().upper()
    der = cmd._read_cert(ctx.ns.ca)
    try:
        policy = apply_flags(PartnerPolicy(code, status=PartnerStatus.ACTIVE), ctx.ns)
    except (FlagError, PolicyError) as exc:
        raise UsageError(str(exc)) from None
    resp = await ctx.rpc(ctx.client.admit(code, der, policy_to_proto(policy), ctx.ns.reason))
    cmd._report_change(ctx, resp, f"federation add {code}")


def add_federation(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], leaf: Leaf, group: Group
) -> None:
    """The ``federation`` group (leaf and group: how the CLI adds commands)."""
    g = group(sub, "federation", "peer nations' brokers: add, list, show, suspend, resume")
    leaf(
        g,
        "list",
        federation_list,
        "peer nations and their links",
        "  coalition-admin federation list --json",
    )
    p = leaf(g, "show", federation_show, "one peer nation", "  coalition-admin federation show KOR")
    p.add_argument("nation", metavar="NATION", help="peer nation code, e.g. KOR")
    p = leaf(
        g,
        "add",
        federation_add,
        "propose admitting a peer nation's gateway with its release and origination policy; "
        "a second operator must approve",
        "  coalition-admin federation add KOR --ca federation/KOR-ca.crt \\\n"
        "      --clearance NATO=SECRET --ceiling NATO=SECRET \\\n"
        "      --publish 'intel.>' --subscribe 'intel.>' --reason 'bilateral MoU'\n"
        "  # then, as another operator:\n"
        "  coalition-admin --identity pki/operators/op2 policy approve <PROPOSAL_ID>",
    )
    p.add_argument("nation", metavar="NATION", help="peer nation code, e.g. KOR")
    p.add_argument(
        "--ca",
        type=Path,
        required=True,
        metavar="FILE",
        help="the peer nation's CA certificate, as this broker's trust file names it",
    )
    p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    add_policy_flags(p)
    for name, func, text in (
        ("suspend", cmd.suspend, "cut the link to a peer nation at once, both ways"),
        ("resume", cmd.reinstate, "propose resuming a suspended peer (a second operator approves)"),
    ):
        p = leaf(g, name, func, text, f"  coalition-admin federation {name} KOR --reason 'x'")
        p.add_argument("partner", metavar="NATION", help="peer nation code, e.g. KOR")
        p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
