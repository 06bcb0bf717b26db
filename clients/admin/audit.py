"""The ``coalition-admin audit`` commands: tail, query, verify, export."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from clients.admin.context import AuditBroken, Ctx, UsageError
from clients.admin.render import actor, iso, print_json, table, to_json
from coalition.cli_common import parse_time_ms
from coalition.v1 import audit_pb2


def parse_time(text: str, now_ms: int) -> int:
    """ISO-8601 (UTC unless a zone is given), Unix milliseconds, or an age such as 15m, 2h."""
    try:
        return parse_time_ms(text, now_ms=now_ms)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _entry_row(e: audit_pb2.AuditEntry) -> tuple[object, ...]:
    return (e.seq, iso(e.time_ms), e.kind, actor(e.actor), e.partner, e.decision, e.detail_json)


_ENTRY_HEADS = ("SEQ", "TIME", "KIND", "ACTOR", "PARTNER", "DECISION", "DETAIL")


def _print_entries(ctx: Ctx, entries: list[audit_pb2.AuditEntry]) -> None:
    if ctx.as_json:
        print_json({"entries": [to_json(e) for e in entries]})
    else:
        print(table(_ENTRY_HEADS, [_entry_row(e) for e in entries]))


async def audit_tail(ctx: Ctx) -> None:
    """The newest N entries; with --follow, keep printing new ones until interrupted."""
    entries = await ctx.rpc(ctx.client.audit(tail=True, limit=ctx.ns.n))
    if not ctx.ns.follow:
        _print_entries(ctx, entries)
        return
    last_seq = entries[-1].seq if entries else 0
    since = entries[-1].time_ms if entries else 0

    def show(batch: list[audit_pb2.AuditEntry], heads: bool) -> None:
        for e in batch:
            if ctx.as_json:
                print(json.dumps(to_json(e), ensure_ascii=False))
        if not ctx.as_json and (batch or heads):
            lines = table(_ENTRY_HEADS, [_entry_row(e) for e in batch]).splitlines()
            print("\n".join(lines if heads else lines[1:]))
        sys.stdout.flush()

    show(entries, True)
    while True:
        await asyncio.sleep(ctx.ns.interval)
        new = [e for e in await ctx.rpc(ctx.client.audit(since_ms=since)) if e.seq > last_seq]
        if new:
            last_seq, since = new[-1].seq, new[-1].time_ms
            show(new, False)


async def audit_query(ctx: Ctx) -> None:
    """Entries matching the filters, oldest first."""
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    filters: dict[str, Any] = {"limit": ctx.ns.limit}
    if ctx.ns.partner:
        filters["partner"] = ctx.ns.partner.strip().upper()
    if ctx.ns.kind:
        filters["kind"] = ctx.ns.kind
    if ctx.ns.since:
        filters["since_ms"] = parse_time(ctx.ns.since, now)
    if ctx.ns.until:
        filters["until_ms"] = parse_time(ctx.ns.until, now)
    _print_entries(ctx, await ctx.rpc(ctx.client.audit(**filters)))


async def audit_verify(ctx: Ctx) -> None:
    """Recompute the hash chain and check the signed checkpoints."""
    r = await ctx.rpc(ctx.client.verify_audit())
    if ctx.as_json:
        print_json(to_json(r))
    elif r.ok:
        print(f"OK: {r.entries} entries chained, {r.checkpoints} signed checkpoints verified")
    else:
        print(f"BROKEN at entry {r.first_broken_seq}: {r.problem}")
        print(f"  ({r.entries} entries and {r.checkpoints} checkpoints read)")
    if not r.ok:
        raise AuditBroken(f"the audit chain is broken at entry {r.first_broken_seq}")


async def audit_export(ctx: Ctx) -> None:
    """Every entry and checkpoint as JSON lines ("record": "entry" or "checkpoint")."""
    records = await ctx.rpc(ctx.client.export_audit())
    lines, counts = [], {"entry": 0, "checkpoint": 0}
    for r in records:
        kind = r.WhichOneof("kind")
        if kind is None:
            continue
        counts[kind] += 1
        body = to_json(r.entry if kind == "entry" else r.checkpoint)
        lines.append(json.dumps({"record": kind, **body}, ensure_ascii=False))
    text = "".join(f"{line}\n" for line in lines)
    out: Path | None = ctx.ns.out
    if out is None:
        sys.stdout.write(text)
        return
    try:
        await asyncio.to_thread(out.write_text, text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror}") from None
    summary = {"out": str(out), "entries": counts["entry"], "checkpoints": counts["checkpoint"]}
    if ctx.as_json:
        print_json(summary)
    else:
        print(f"exported {counts['entry']} entries and {counts['checkpoint']} checkpoints to {out}")
