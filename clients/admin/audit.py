"""The ``coalition-admin audit`` commands: tail, query, verify, export."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clients.admin.context import AuditBroken, Ctx, UsageError
from clients.admin.render import actor, iso, print_json, table, to_json
from coalition.audit_export import ExportError, verify_export
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
        if kind == "audit_certificate":  # lets `audit verify --file` work with only the CA
            pem = x509.load_der_x509_certificate(r.audit_certificate).public_bytes(
                serialization.Encoding.PEM
            )
            body = {"certificate_pem": pem.decode("ascii")}
        elif kind in counts:
            counts[kind] += 1
            body = to_json(r.entry if kind == "entry" else r.checkpoint)
        else:
            continue
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


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {what} {path}: {why}") from None


def audit_verify_file(ns: argparse.Namespace, as_json: bool) -> None:
    """Verify an export offline: chain hashes and checkpoints under the CA-certified key."""
    if ns.ca is None:
        raise UsageError("audit verify --file needs --ca CA_CERT (the coalition CA certificate)")
    text = _read(ns.file, "export")
    try:
        ca = x509.load_pem_x509_certificate(_read(ns.ca, "CA certificate").encode("utf-8"))
    except ValueError:
        raise UsageError(f"{ns.ca} is not a PEM certificate") from None
    cert_pem = None if ns.audit_cert is None else _read(ns.audit_cert, "audit certificate")
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    try:
        v = verify_export(text.splitlines(), ca, now, cert_pem)
    except ExportError as exc:
        raise UsageError(f"{ns.file}: {exc}") from None
    r = v.result
    if as_json:
        print_json(
            {
                "ok": r.ok,
                "entries": r.entries,
                "checkpoints": r.checkpoints,
                "first_broken_seq": r.first_broken_seq,
                "problem": r.problem,
                "broker": v.broker,
                "unsigned_tail": v.unsigned_tail,
            }
        )
    elif r.ok:
        print(
            f"OK: {r.entries} entries chained, {r.checkpoints} checkpoints signed by "
            f"broker {v.broker!r} verified"
        )
        if v.unsigned_tail:
            n = v.unsigned_tail
            what = (
                "1 entry after the last checkpoint is"
                if n == 1
                else f"{n} entries after the last checkpoint are"
            )
            print(f"  ({what} not yet signed)")
    else:
        print(f"BROKEN at entry {r.first_broken_seq}: {r.problem}")
        print(f"  ({r.entries} entries and {r.checkpoints} checkpoints read)")
    if not r.ok:
        raise AuditBroken(f"the audit chain is broken at entry {r.first_broken_seq}")
