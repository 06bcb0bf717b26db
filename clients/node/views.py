"""What ``coalition-node inbox``, ``show`` and ``status`` print, from the node's inbox.

Read-only: nothing here talks to the broker. Text from senders is escaped before it
reaches a terminal (``coalition.logfmt.escape``). A command that cannot answer raises
``CommandFailed`` with one sentence and its exit status.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

from clients.node.config import NodeConfig
from clients.node.content import ContentError, content_dict
from clients.node.inbox import Entry, Expired, Inbox
from coalition.cli_common import EXIT_ERROR, EXIT_USAGE, parse_time_ms
from coalition.clock import wall_clock_ms
from coalition.logfmt import escape


class CommandFailed(Exception):
    """The command cannot answer: ``str()`` is the sentence, ``code`` the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def parse_since(text: str) -> int:
    """ISO 8601 (UTC when no zone is given), Unix milliseconds or an age -> Unix ms."""
    try:
        return parse_time_ms(text)
    except ValueError as exc:
        raise ValueError(f"--since: {exc}") from None


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry_dict(e: Entry) -> dict[str, Any]:
    return {
        "message_id": e.message_id,
        "sender": e.sender,
        "sequence": e.sequence,
        "recipient_sequence": e.recipient_sequence,
        "topic": e.topic,
        "precedence": e.precedence,
        "label": e.label,
        "created_ms": e.created_ms,
        "received_ms": e.received_ms,
        "received": iso(e.received_ms),
        "offset": e.offset,
        "content_type": e.content_type,
        "title": e.title,
    }


def _expired_dict(e: Expired) -> dict[str, Any]:
    return {
        "sender": e.sender,
        "message_id": e.message_id,
        "sequence": e.sequence,
        "recipient_sequence": e.recipient_sequence,
        "topic": e.topic,
        "reason": e.reason,
        "offset": e.offset,
        "stored_ms": e.stored_ms,
        "removed_ms": e.removed_ms,
        "removed": iso(e.removed_ms),
        "noticed_ms": e.noticed_ms,
    }


def inbox_command(inbox: Inbox, ns: argparse.Namespace) -> int:
    from coalition.topics import TopicError, topic_matches, validate_pattern

    try:
        since = parse_since(ns.since) if ns.since else 0
        pattern = validate_pattern(ns.topic) if ns.topic else None
    except (ValueError, TopicError) as exc:
        raise CommandFailed(str(exc), EXIT_USAGE) from None
    entries = [
        e
        for e in inbox.entries(since_ms=since)
        if pattern is None or topic_matches(pattern, e.topic)
    ]
    if ns.limit is not None:
        entries = entries[-ns.limit :] if ns.limit > 0 else []
    if ns.follow:
        return _follow(
            inbox,
            entries,
            lambda e: pattern is None or topic_matches(pattern, e.topic),
            as_json=ns.json,
        )
    if ns.json:
        print(json.dumps([_entry_dict(e) for e in entries], indent=2))
        return 0
    rows: list[tuple[str, ...]] = [
        ("TIME", "SENDER", "PRECEDENCE", "LABEL", "TOPIC", "TITLE", "ID")
    ]
    rows += [_cells(e) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not entries:
        print("(no messages)")
    for x in inbox.expired():
        if x.removed_ms >= since and (pattern is None or topic_matches(pattern, x.topic)):
            print(f"{iso(x.removed_ms)}  {x.describe()}")
    return 0


FOLLOW_POLL_S = 0.5


def _cells(e: Entry) -> tuple[str, ...]:
    """An inbox row's cells, escaped: the title and topic come from the sender, and a
    control character must not reach this terminal."""
    cells = (iso(e.received_ms), e.sender, e.precedence, e.label, e.topic, e.title)
    return (*(escape(c) for c in cells), e.message_id[:12])


def _row(e: Entry) -> str:
    return "  ".join(_cells(e))


def _follow(
    inbox: Inbox, entries: list[Entry], wanted: Callable[[Entry], bool], *, as_json: bool
) -> int:
    """Print entries, then new ones as the daemon stores them (polling the database),
    until Ctrl-C or SIGTERM; exit 0."""
    import time

    def emit(e: Entry) -> None:
        print(json.dumps(_entry_dict(e)) if as_json else _row(e), flush=True)

    for e in entries:
        emit(e)
    seen = inbox.last_row_id()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            for row_id, e in inbox.entries_after(seen):
                seen = row_id
                if wanted(e):
                    emit(e)
    except KeyboardInterrupt:
        return 0


def show_command(inbox: Inbox, ns: argparse.Namespace) -> int:
    if len(ns.id) < 6:
        raise CommandFailed("give at least 6 characters of the message id", EXIT_USAGE)
    found = inbox.find(ns.id.lower())
    if not found:
        raise CommandFailed(f"no message {ns.id} in the inbox {inbox.path}")
    if len(found) > 1:
        ids = ", ".join(e.message_id for e, _ in found)
        raise CommandFailed(f"{ns.id} matches several messages ({ids}); give more of the id")
    e, payload = found[0]
    try:
        content: dict[str, Any] | None = content_dict(e.content_type, payload, attachments=ns.json)
    except ContentError:
        content = None
    if ns.json:
        print(json.dumps({**_entry_dict(e), "content": content}, indent=2))
        return 0
    for k, v in (
        ("message", e.message_id),
        ("from", f"{e.sender} (sequence {e.sequence}, to us #{e.recipient_sequence or '-'})"),
        ("label", e.label),
        ("precedence", e.precedence),
        ("topic", e.topic),
        ("created", iso(e.created_ms)),
        ("received", f"{iso(e.received_ms)} (broker offset {e.offset})"),
    ):
        print(f"{k:11} {v}")
    print()
    _print_content(content or {})
    return 0


def _print_content(c: dict[str, Any]) -> None:
    if "payload_size" in c:
        print(f"(raw payload, {c['payload_size']} bytes)")
        return
    print(escape(str(c.get("title", ""))))
    area = c.get("area")
    if area:
        print(f"area: {escape(str(area.get('name', '')))}")
    if c.get("reliability") or c.get("credibility"):
        rel = str(c.get("reliability", "?")).removeprefix("RELIABILITY_")
        cred = str(c.get("credibility", "?")).removeprefix("CREDIBILITY_")
        print(f"grading: {rel}{cred}")
    print()
    # The summary's own lines are kept; every control character within them is escaped.
    print("\n".join(escape(line) for line in str(c.get("summary", "")).split("\n")))
    for a in c.get("attachments", []):
        name, media = escape(str(a.get("filename", ""))), escape(str(a.get("media_type", "")))
        print(f"attachment: {name} ({media}, {a['size']} bytes)")


def status_command(cfg: NodeConfig, inbox: Inbox, ns: argparse.Namespace) -> int:
    n, q = inbox.counts()
    gaps = inbox.gaps()
    expired = inbox.expired()
    from clients.node.parked import summary
    from clients.node.status import read_state

    connected = inbox.meta("last_connected_ms")
    offset = inbox.meta("last_offset")
    daemon = read_state(inbox, wall_clock_ms())
    held = summary(inbox.conn)
    doc: dict[str, Any] = {
        "identity": str(cfg.identity),
        "broker": cfg.broker,
        "inbox": str(cfg.inbox),
        "messages": n,
        "quarantined": q,
        "gaps": [
            {"sender": g.sender, "first": g.first, "last": g.last, "detected_ms": g.detected_ms}
            for g in gaps
        ],
        "last_connected_ms": int(connected) if connected else None,
        "last_offset": int(offset) if offset else None,
        "senders": inbox.senders(),
        "recent_quarantine": inbox.quarantined(5),
        "expired": [_expired_dict(e) for e in expired],
        "daemon": daemon,
        "held_for_clock": held,
    }
    if ns.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"identity      {cfg.identity}")
    print(f"broker        {cfg.broker}")
    print(f"inbox         {cfg.inbox}: {n} messages, {q} quarantined")
    print(f"connection    {_connection(daemon, connected)}")
    print(f"last offset   {offset or '-'}")
    for sender, high in doc["senders"].items():
        print(f"from {sender:8} up to sequence {high}")
    for g in gaps:
        told = [
            e for e in expired if e.sender == g.sender and g.first <= e.recipient_sequence <= g.last
        ]
        note = f" ({len(told)} of them reported expired by the broker)" if told else ""
        print(g.describe() + note)
    for e in expired:
        print(f"{e.describe()}; removed {iso(e.removed_ms)}")
    for hd in held:
        print(f"held back offset {hd['offset']} from {hd['sender']}: {hd['detail']}")
    for qd in doc["recent_quarantine"]:
        print(f"quarantined offset {qd['offset']} from {qd['sender'] or '?'}: {qd['reason']}")
    return 0


def _connection(d: dict[str, Any], connected: str | None) -> str:
    """ "connected now", or when it last was and what the daemon is doing about it."""
    last = f"last connected at {iso(int(connected))}" if connected else "never connected"
    state, since, detail = d["state"], d["since_ms"], d["detail"]
    if not d["running"]:
        if state == "refused":
            return f"not running: refused at {iso(int(since))}: {detail}; {last}"
        return f"daemon not running; {last}"
    if state == "connected":
        return f"connected now (since {iso(int(since))})"
    retry = d["retry_s"]
    every = (
        ""
        if retry is None
        else f"; retrying every {retry / 60:.0f} min"
        if retry >= 60
        else f"; retrying every {retry:.0f} s"
    )
    if state == "suspended":
        return f"suspended by operators since {iso(int(since))}{every}; {last}"
    if state == "not_admitted":
        return f"not admitted by operators since {iso(int(since))}{every}; {last}"
    if state == "connecting":
        return f"connecting; {last}"
    return f"disconnected since {iso(int(since))}: {detail}{every}; {last}"
