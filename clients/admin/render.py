"""Output of ``coalition-admin``: aligned tables for people, stable JSON for scripts."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from coalition.labels import Classification
from coalition.logfmt import escape
from coalition.v1 import directory_pb2, policy_pb2

_URN = "urn:coalition:"


def iso(ms: int, *, precise: bool = False) -> str:
    """Unix milliseconds as ISO-8601 UTC ("2025-05-01T12:00:00Z"); "-" for 0."""
    if not ms:
        return "-"
    when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return when.isoformat(timespec="milliseconds" if precise else "seconds").replace("+00:00", "Z")


def actor(urn: str) -> str:
    """An identity URI without its common prefix: "operator:op1"."""
    return urn.removeprefix(_URN) or "-"


def _scalar(field: Any, value: Any) -> Any:
    # Any: upb and pure-Python descriptors are distinct types to mypy.
    if field.type == FieldDescriptor.TYPE_ENUM:
        named = field.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes(value).hex()
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    return value


def to_json(msg: Message) -> dict[str, Any]:
    """Every field by proto name (absent too): enums by name, bytes hex, ``*_ms`` + ``*_utc``."""
    # Integers stay numbers (MessageToDict would quote 64-bit ones); a oneof's set member
    # is named under the oneof's own name, e.g. {"result": "applied", ...}.
    out: dict[str, Any] = {}
    for oneof in msg.DESCRIPTOR.oneofs:
        out[oneof.name] = msg.WhichOneof(oneof.name)
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            out[field.name] = to_json(value) if msg.HasField(field.name) else None
        else:
            out[field.name] = _scalar(field, value)
        if field.name.endswith("_ms") and field.type == FieldDescriptor.TYPE_INT64:
            out[field.name.removesuffix("_ms") + "_utc"] = (
                iso(value, precise=True) if value else None
            )
    return out


def print_json(obj: Any, out: TextIO | None = None) -> None:
    """Pretty, key-stable JSON on stdout."""
    print(json.dumps(obj, indent=2, ensure_ascii=False), file=out or sys.stdout)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded.

    Cells are escaped (coalition.logfmt.escape): values such as audit details and titles
    come from partners, and a control character must not reach the operator's terminal.
    """
    cells = [
        [str(h) for h in headers],
        *[["-" if c == "" else escape(str(c)) for c in r] for r in rows],
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*padded, r[-1]]).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """Key/value lines with the values aligned."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(
        f"{(k + ':').ljust(width)}  {'-' if v == '' else escape(str(v))}" for k, v in pairs
    )


def levels(items: Sequence[policy_pb2.Clearance]) -> str:
    """Clearances as "NATO SECRET, EU CONFIDENTIAL"."""
    return ", ".join(f"{c.policy} {Classification(c.level).words}" for c in items)


def policy_pairs(p: policy_pb2.PartnerPolicy) -> list[tuple[str, object]]:
    """The parts of a partner policy as key/value pairs."""
    rate = f"{p.publish_rate_per_s}/s" if p.publish_rate_per_s else "broker default"
    cats = "; ".join(f"{c.name}: {', '.join(c.values)}" for c in p.categories)
    return [
        ("partner", p.partner),
        ("status", directory_pb2.PartnerStatus.Name(p.status)),
        ("clearances", levels(p.clearances)),
        ("origination ceilings", levels(p.origination_ceilings)),
        ("groups", ", ".join(p.groups)),
        ("categories", cats),
        ("publish", ", ".join(p.publish_topics)),
        ("subscribe", ", ".join(p.subscribe_topics)),
        ("publish rate", rate),
    ]


def version_pairs(v: policy_pb2.PolicyVersion) -> list[tuple[str, object]]:
    """A policy version: the policy, then who changed it, when and why."""
    return [
        *policy_pairs(v.policy),
        ("version", v.version),
        ("changed", iso(v.changed_ms)),
        ("changed by", v.changed_by),
        ("approved by", v.approved_by),
        ("reason", v.reason),
    ]


def diff_block(lines: Sequence[str]) -> str:
    """Diff lines indented under a heading."""
    return "\n".join(f"  {line}" for line in lines) if lines else "  (no change)"
