"""How the JetStream message store writes its entries: subjects, headers, payloads.

One stream holds four kinds of entry, each under the deployment's ``store`` subjects:

- ``<p>.store.msg.<precedence>.<sender>.<topic tokens>``: a message; the payload is the
  envelope bytes unchanged, every other stored field is in ONE header,
  ``Coalition-Message`` (the fields space-separated, text fields token-encoded), beside
  ``Coalition-Batch``. Every broker reads every entry of the stream, and nats-py parses
  each header line in Python: one header instead of eleven is most of what reading a
  message entry costs. Entries written with one header per field (``Coalition-Id``,
  ``Coalition-Sender``, ...) are read too;
- ``<p>.store.out``: audit records waiting in the outbox: the records one write commits
  together (an append's acceptance records, a delivery batch's decisions) share an
  entry, one a line, and ``Coalition-Records`` says how many. An entry is one NATS
  message for every broker that sends or reads it and for the cluster that stores it;
  a record each would multiply all three. Record i of the entry at sequence S has the
  outbox id ``S << 20 | i`` (``row_id``): ids stay unique and ascending, and above
  every id of an entry written one record each, without the header, whose id is its
  sequence (such entries are still read). Every broker of a deployment must write
  the same way (run one version): an entry without the header written after one with
  it would get ids below the drained mark;
- ``<p>.store.notice.<subscriber>``: one expiry notice (payload = JSON);
- ``<p>.store.ctl``: a state change that is not an entry of its own (messages removed
  by retention, notices acknowledged), as JSON.

Partner names and topics may hold characters a NATS subject token cannot (``.``, ``*``,
``>``, spaces, anything outside ASCII): ``token()`` keeps ``A-Z a-z 0-9 _ -`` and writes
every other UTF-8 byte as ``=XX`` (hex), and an empty string as ``=``; a topic is split
on ``.`` first, so its hierarchy stays a subject hierarchy. The encoding is one-to-one
and its output is also a valid KV key. Subjects only route and filter; the exact values
are read back from the headers, never parsed out of a subject.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from broker.jetstream.batches import Entry
from broker.jetstream.connect import ClusterSettings
from broker.store.base import NewMessage, Notice, StoredMessage

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ALL_SAFE = re.compile(r"[A-Za-z0-9_-]+")

H_MESSAGE = "Coalition-Message"  # every field of a message but its envelope (see above)
# One header per field: how message entries were written before H_MESSAGE (still read).
H_ID = "Coalition-Id"
H_SENDER = "Coalition-Sender"
H_SEQUENCE = "Coalition-Sequence"
H_TOPIC = "Coalition-Topic"
H_PRECEDENCE = "Coalition-Precedence"
H_CLASSIFICATION = "Coalition-Classification"
H_LABEL = "Coalition-Label"
H_CREATED = "Coalition-Created"
H_EXPIRY = "Coalition-Expiry"
H_DIGEST = "Coalition-Digest"
H_STORED = "Coalition-Stored"  # the commit's time (stored_ms; an outbox row's time_ms)
H_BATCH = "Coalition-Batch"  # which commit wrote the entry (to settle an unknown outcome)
H_RECORDS = "Coalition-Records"  # how many records an outbox entry holds, one a line
RECORDS_BYTES = 64 * 1024  # records packed into one outbox entry, at most (one may be larger)


def token(text: str) -> str:
    """text as one NATS subject token (and KV key): see the module docstring."""
    if not text:
        return "="
    if _ALL_SAFE.fullmatch(text):
        return text
    out = []
    for b in text.encode():
        out.append(chr(b) if b in _SAFE else f"={b:02X}")
    return "".join(out)


def untoken(value: str) -> str:
    """The text token() encoded; raises ValueError for a malformed token."""
    if value == "=":
        return ""
    if "=" not in value:
        if not value.isascii():
            raise ValueError("a token is ASCII")
        return value
    raw = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "=":
            raw.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(value[i]))
            i += 1
    return raw.decode()


@dataclasses.dataclass(frozen=True)
class Subjects:
    """The store's subjects in one deployment."""

    settings: ClusterSettings

    @property
    def all(self) -> str:
        return self.settings.subject("store", ">")

    @property
    def outbox(self) -> str:
        return self.settings.subject("store", "out")

    @property
    def control(self) -> str:
        return self.settings.subject("store", "ctl")

    @property
    def notices(self) -> str:
        return self.settings.subject("store", "notice", "*")

    def message(self, m: NewMessage) -> str:
        topic = [token(part) for part in m.topic.split(".")]
        return self.settings.subject("store", "msg", str(m.precedence), token(m.sender), *topic)

    def notice(self, subscriber: str) -> str:
        return self.settings.subject("store", "notice", token(subscriber))

    def kind(self, subject: str) -> str:
        """'msg', 'out', 'notice', 'ctl' (or '' for a subject that is none of them)."""
        head = self.settings.subject("store", "")
        if not subject.startswith(head):
            return ""
        return subject[len(head) :].split(".", 1)[0]


def message_meta(m: NewMessage, stored_ms: int) -> str:
    """The H_MESSAGE value of m stored at stored_ms: the same for every attempt to commit
    it, so computed once per append. Text fields are token-encoded (a header value cannot
    hold CR/LF, and the fields are separated by spaces)."""
    return " ".join(
        (
            token(m.message_id),
            token(m.sender),
            str(m.sequence),
            token(m.topic),
            str(m.precedence),
            str(m.classification),
            base64.b64encode(m.label).decode(),
            str(m.created_ms),
            str(m.expiry_ms),
            m.digest.hex(),
            str(stored_ms),
        )
    )


def message_headers(m: NewMessage, stored_ms: int, batch: str) -> dict[str, str]:
    """Every field of m but its envelope (the payload), as headers."""
    return {H_MESSAGE: message_meta(m, stored_ms), H_BATCH: batch}


def message_from(offset: int, headers: Mapping[str, str], envelope: bytes) -> StoredMessage:
    """The stored message an entry holds; raises KeyError/ValueError if it is not one."""
    meta = headers.get(H_MESSAGE)
    if meta is None:
        return _message_from_fields(offset, headers, envelope)
    fields = meta.split(" ")
    if len(fields) != 11:
        raise ValueError(f"{H_MESSAGE} holds {len(fields)} fields, not 11")
    mid, sender, seq, topic, prec, cls, label, created, expiry, digest, stored = fields
    return StoredMessage(
        offset=offset,
        stored_ms=int(stored),
        message_id=untoken(mid),
        sender=untoken(sender),
        sequence=int(seq),
        topic=untoken(topic),
        precedence=int(prec),
        classification=int(cls),
        label=base64.b64decode(label, validate=True),
        created_ms=int(created),
        expiry_ms=int(expiry),
        envelope=envelope,
        digest=bytes.fromhex(digest),
    )


def _message_from_fields(offset: int, headers: Mapping[str, str], envelope: bytes) -> StoredMessage:
    """A message entry written with one header per field."""
    return StoredMessage(
        offset=offset,
        stored_ms=int(headers[H_STORED]),
        message_id=untoken(headers[H_ID]),
        sender=untoken(headers[H_SENDER]),
        sequence=int(headers[H_SEQUENCE]),
        topic=untoken(headers[H_TOPIC]),
        precedence=int(headers[H_PRECEDENCE]),
        classification=int(headers[H_CLASSIFICATION]),
        label=base64.b64decode(headers[H_LABEL]),
        created_ms=int(headers[H_CREATED]),
        expiry_ms=int(headers[H_EXPIRY]),
        envelope=envelope,
        digest=bytes.fromhex(headers[H_DIGEST]),
    )


def entry_bytes(headers: Mapping[str, str], data: bytes) -> int:
    """What an entry takes of the servers' max_payload (payload, headers, batch headers)."""
    return len(data) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 256


def plain_headers(time_ms: int, batch: str) -> dict[str, str]:
    return {H_STORED: str(time_ms), H_BATCH: batch}


ROW_BITS = 20  # an outbox entry's records have ids S << ROW_BITS | i (see above)


def row_id(seq: int, i: int) -> int:
    return seq << ROW_BITS | i


def packed_records(texts: Sequence[str]) -> list[tuple[int, bytes]]:
    """texts as outbox payloads: (how many records, payload), the records one a line, up
    to RECORDS_BYTES each; a record holding a line break gets a payload of its own."""
    out: list[tuple[int, bytes]] = []
    run: list[str] = []
    size = 0
    for text in texts:
        alone = "\n" in text or "\r" in text
        if run and (alone or size + len(text) + 1 > RECORDS_BYTES):
            out.append((len(run), "\n".join(run).encode()))
            run, size = [], 0
        if alone:
            out.append((1, text.encode()))
            continue
        run.append(text)
        size += len(text) + 1
    if run:
        out.append((len(run), "\n".join(run).encode()))
    return out


def outbox_entries(subject: str, texts: Sequence[str], time_ms: int, batch: str) -> list[Entry]:
    """The outbox entries that hold texts (every outbox entry is written so: see above)."""
    return [
        Entry(subject, {**plain_headers(time_ms, batch), H_RECORDS: str(count)}, payload)
        for count, payload in packed_records(texts)
    ]


def records_from(headers: Mapping[str, str], data: bytes) -> tuple[bool, list[str]]:
    """Whether an outbox entry holds packed records (ids from row_id), and its records;
    raises ValueError if it does not hold what its header says."""
    text = data.decode()
    count = headers.get(H_RECORDS)
    if count is None:
        return False, [text]
    records = text.split("\n") if int(count) > 1 else [text]
    if len(records) != int(count):
        raise ValueError(f"outbox entry holds {len(records)} records, not {count}")
    return True, records


def notice_payload(n: Notice) -> bytes:
    return json.dumps(dataclasses.asdict(n), separators=(",", ":")).encode()


def notice_from(data: bytes) -> Notice:
    fields: dict[str, Any] = json.loads(data)
    return Notice(**fields)


def control_payload(op: str, **fields: object) -> bytes:
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode()


def control_from(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("control entry is not an object")
    return value
