"""What the broker records: AuditItem, and how an item travels through an outbox.

An outbox (the message store's, the registry's) holds each record as text made by
encode() in the transaction of the change it records; the drainer (broker.audit.drainer)
turns each row into an OutboxEntry with outbox_entry() and the audit log chains it.

The text is ``@1`` followed by the entry's canonical bytes after ``[seq,time_ms,`` (see
coalition.audit_chain.canonical_tail): everything about an entry but its seq and time
is known when the decision is taken, so the canonical JSON is made once, then, and the
drainer hashes it as it is (chained_hash) and only splits it for the columns of the
entry: no JSON parsing, no canonical JSON again. It can be split without a parser
because kind, actor, partner, message_id and decision hold no ``"``, ``\\``, control
characters or lone surrogates (an item with one there is written as JSON, see below),
and the detail is last. outbox_entry() checks that the text is exactly what encode()
makes of some item (else the row is unreadable), so what is hashed is always the
canonical bytes of what is stored.

An item that does not fit that form, and every record written before it existed, is a
JSON object (``json.dumps(fields, sort_keys=True)``); both forms are read, told apart by
the first character (``{`` for JSON, which never starts with ``@``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from broker.store.base import StoredMessage
from coalition.audit_chain import canonical_json, canonical_tail
from coalition.v1 import audit_pb2

# json.dumps(fields, sort_keys=True, allow_nan=False), the same text, with the encoder
# built once: json.dumps with options constructs a new encoder on every call.
_OUTBOX_JSON = json.JSONEncoder(sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class AuditItem:
    """One entry to append (see AuditLog.record for the rules on detail)."""

    kind: str
    actor: str
    partner: str = ""
    message_id: str = ""
    decision: str = "allow"
    detail: Mapping[str, object] | None = None


TAG = "@1"  # the outbox text of an entry's canonical tail (see the module docstring)
_OPEN = TAG + '"'
# What no tagged text holds: JSON escapes control characters, and UTF-8 cannot hold a
# lone surrogate. Searched only in a text that is not all printable (isprintable() is
# much faster, and false for every one of them, but also for some legitimate text).
_NOT_TEXT = re.compile(r"[\x00-\x1f\ud800-\udfff]")


def _is_text(s: str) -> bool:
    return s.isprintable() or not _NOT_TEXT.search(s)


def encode(item: AuditItem) -> str:
    """item as outbox text; raises ValueError for an empty kind or a detail that is not
    plain JSON."""
    if not item.kind:
        raise ValueError("audit entry needs a kind")
    try:
        detail_json = canonical_json(item.detail)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit detail is not plain JSON: {exc}") from exc
    kind, actor, partner, message_id, decision = (
        item.kind,
        item.actor,
        item.partner,
        item.message_id,
        item.decision,
    )
    head = kind + actor + partner + message_id + decision
    # JSON of a string with no control character or surrogate: only \\ and " escaped.
    quoted = detail_json.replace("\\", "\\\\").replace('"', '\\"')
    text = f'{_OPEN}{kind}","{actor}","{partner}","{message_id}","{decision}","{quoted}"]'
    if '"' in head or "\\" in head or not _is_text(text):
        return encode_json(item)
    return text


def encode_json(item: AuditItem) -> str:
    """item as outbox text in the JSON form (what every record was before TAG); raises
    ValueError if its detail is not plain JSON."""
    fields = {  # not dataclasses.asdict: it deep-copies detail, and this runs per record
        "kind": item.kind,
        "actor": item.actor,
        "partner": item.partner,
        "message_id": item.message_id,
        "decision": item.decision,
        "detail": item.detail,
    }
    try:
        return _OUTBOX_JSON.encode(fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit detail is not plain JSON: {exc}") from exc


def _split(text: str) -> tuple[str, str, str, str, str, str]:
    """The columns of a tagged text (kind, actor, partner, message_id, decision,
    detail_json); raises ValueError unless text is exactly what encode() makes of them."""
    if not (text.startswith(_OPEN) and text.endswith('"]')):
        raise ValueError("not an encoded audit entry: no fields")
    if not _is_text(text):
        raise ValueError("not an encoded audit entry: a control character or surrogate")
    parts = text[len(_OPEN) : -2].split('","', 5)
    if len(parts) != 6:
        raise ValueError("not an encoded audit entry: not six fields")
    kind, actor, partner, message_id, decision, quoted = parts
    head = kind + actor + partner + message_id + decision
    if not kind or '"' in head or "\\" in head:
        raise ValueError("not an encoded audit entry: a field is empty or not plain")
    if "\\" in quoted:
        detail_json = quoted.replace('\\"', '"').replace("\\\\", "\\")
        canonical = detail_json.replace("\\", "\\\\").replace('"', '\\"') == quoted
    else:
        detail_json, canonical = quoted, '"' not in quoted
    if not (canonical and detail_json.startswith("{") and detail_json.endswith("}")):
        raise ValueError("not an encoded audit entry: the detail is not canonical")
    return kind, actor, partner, message_id, decision, detail_json


def decode(text: str) -> AuditItem:
    """The AuditItem encode() or encode_json() made (an empty detail reads as {});
    raises ValueError for anything else."""
    if text.startswith(TAG):
        kind, actor, partner, message_id, decision, detail_json = _split(text)
        try:
            detail = json.loads(detail_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not an encoded audit entry: {exc}") from exc
        if not isinstance(detail, dict):
            raise ValueError("not an encoded audit entry: detail is not an object")
        return AuditItem(kind, actor, partner, message_id, decision, detail)
    try:
        fields = json.loads(text)
        detail = fields.get("detail")
        if detail is not None and not isinstance(detail, dict):
            raise TypeError("detail is not an object")
        return AuditItem(
            kind=str(fields["kind"]),
            actor=str(fields["actor"]),
            partner=str(fields.get("partner", "")),
            message_id=str(fields.get("message_id", "")),
            decision=str(fields.get("decision", "allow")),
            detail=detail,
        )
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not an encoded audit entry: {exc}") from exc


def with_detail(text: str, **extra: object) -> str:
    """The outbox text (JSON form: a registry's few rows, read as JSON by its readers) of
    the item in text with extra joined to its detail; raises ValueError like decode()."""
    item = decode(text)
    return encode_json(
        AuditItem(
            item.kind,
            item.actor,
            item.partner,
            item.message_id,
            item.decision,
            {**(item.detail or {}), **extra},
        )
    )


class OutboxEntry(NamedTuple):
    """An outbox row ready for the chain: its id and time, the entry's columns, and tail,
    the entry's canonical bytes after ``[seq,time_ms,`` (chained_hash links it)."""

    id: int
    time_ms: int
    kind: str
    actor: str
    partner: str
    message_id: str
    decision: str
    detail_json: str
    tail: bytes

    def entry(self) -> audit_pb2.AuditEntry:
        """The entry, before it is chained (no seq, no hashes)."""
        return audit_pb2.AuditEntry(
            time_ms=self.time_ms,
            kind=self.kind,
            actor=self.actor,
            partner=self.partner,
            message_id=self.message_id,
            decision=self.decision,
            detail_json=self.detail_json,
        )


def item_entry(item: AuditItem, row_id: int, time_ms: int) -> OutboxEntry:
    """item as the OutboxEntry of row_id at time_ms; raises ValueError like entry_fields."""
    f = entry_fields(item, time_ms)
    tail = canonical_tail(f.kind, f.actor, f.partner, f.message_id, f.decision, f.detail_json)
    return OutboxEntry(
        row_id, time_ms, f.kind, f.actor, f.partner, f.message_id, f.decision, f.detail_json, tail
    )


def outbox_entry(row_id: int, time_ms: int, text: str) -> OutboxEntry:
    """The OutboxEntry of an outbox row (either form); raises ValueError if text is not
    one encode() or encode_json() made."""
    if text.startswith(TAG):
        return OutboxEntry(row_id, time_ms, *_split(text), text[len(TAG) :].encode())
    return item_entry(decode(text), row_id, time_ms)


def entry_fields(item: AuditItem, now_ms: int) -> audit_pb2.AuditEntry:
    """The entry of item at now_ms, before it is chained; raises ValueError for an empty
    kind or a detail that is not plain JSON."""
    if not item.kind:
        raise ValueError("audit entry needs a kind")
    try:
        detail_json = canonical_json(item.detail)
        detail_json.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit detail is not plain JSON: {exc}") from exc
    return audit_pb2.AuditEntry(
        time_ms=now_ms,
        kind=item.kind,
        actor=item.actor,
        partner=item.partner,
        message_id=item.message_id,
        decision=item.decision,
        detail_json=detail_json,
    )


def acceptance_item(m: StoredMessage, **extra: object) -> AuditItem:
    """The publish.accepted entry of a stored message (extra joins its detail)."""
    return AuditItem(
        "publish.accepted",
        m.sender,
        m.sender,
        m.message_id,
        "allow",
        {
            "offset": m.offset,
            "topic": m.topic,
            "sequence": m.sequence,
            "digest": m.digest.hex(),
            "classification": m.classification,
            **extra,
        },
    )
