"""Message content: IntelSummary from operator input, and back to plain dicts for output."""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from coalition.envelope import INTEL_SUMMARY
from coalition.v1 import intel_pb2

TITLE_MAX = 120
# Admiralty "cannot be judged": the honest default when the author gave no grading.
DEFAULT_RELIABILITY = "F"
DEFAULT_CREDIBILITY = "6"


class ContentError(ValueError):
    """The input cannot be made into an IntelSummary."""


def reliability(code: str) -> int:
    """'B' or 'RELIABILITY_B' -> the enum value. Raises ContentError."""
    name = code.strip().upper()
    name = name if name.startswith("RELIABILITY_") else f"RELIABILITY_{name}"
    try:
        return int(intel_pb2.SourceReliability.Value(name))
    except ValueError:
        raise ContentError(f"reliability must be A to F, got {code!r}") from None


def credibility(code: str) -> int:
    """'2' or 'CREDIBILITY_2' -> the enum value. Raises ContentError."""
    name = code.strip().upper()
    name = name if name.startswith("CREDIBILITY_") else f"CREDIBILITY_{name}"
    try:
        return int(intel_pb2.InformationCredibility.Value(name))
    except ValueError:
        raise ContentError(f"credibility must be 1 to 6, got {code!r}") from None


def build_summary(
    data: bytes,
    *,
    title: str | None = None,
    area: str | None = None,
    reliability_code: str | None = None,
    credibility_code: str | None = None,
) -> intel_pb2.IntelSummary:
    """A JSON object with IntelSummary fields, or plain UTF-8 text, as an IntelSummary.

    Plain text becomes the summary and its first line the title. Options override the
    input; a missing grading defaults to F6 ("cannot be judged"). Raises ContentError.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ContentError("input is neither UTF-8 text nor JSON") from None
    msg = intel_pb2.IntelSummary()
    doc = _json_object(text)
    if doc is not None:
        _from_json(doc, msg)
    else:
        msg.summary = text.strip()
    if title:
        msg.title = title
    if not msg.title:
        first = next((ln.strip() for ln in msg.summary.splitlines() if ln.strip()), "")
        msg.title = first[:TITLE_MAX]
    if not msg.title and not msg.summary:
        raise ContentError("input is empty: give a summary text or a JSON IntelSummary")
    if area:
        msg.area.name = area
    if reliability_code:
        msg.reliability = intel_pb2.SourceReliability.ValueType(reliability(reliability_code))
    elif not msg.reliability:
        msg.reliability = intel_pb2.SourceReliability.ValueType(reliability(DEFAULT_RELIABILITY))
    if credibility_code:
        msg.credibility = intel_pb2.InformationCredibility.ValueType(credibility(credibility_code))
    elif not msg.credibility:
        msg.credibility = intel_pb2.InformationCredibility.ValueType(
            credibility(DEFAULT_CREDIBILITY)
        )
    return msg


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContentError(f"input looks like JSON but does not parse: {exc}") from None
    return doc if isinstance(doc, dict) else None


def _from_json(doc: dict[str, Any], msg: intel_pb2.IntelSummary) -> None:
    doc = dict(doc)
    # Short Admiralty codes ("B", "2") are what analysts write; the proto names are long.
    if isinstance(doc.get("reliability"), str):
        doc["reliability"] = intel_pb2.SourceReliability.Name(
            intel_pb2.SourceReliability.ValueType(reliability(doc["reliability"]))
        )
    if isinstance(doc.get("credibility"), str | int) and not isinstance(doc["credibility"], bool):
        doc["credibility"] = intel_pb2.InformationCredibility.Name(
            intel_pb2.InformationCredibility.ValueType(credibility(str(doc["credibility"])))
        )
    try:
        json_format.ParseDict(doc, msg)
    except json_format.ParseError as exc:
        raise ContentError(f"input is JSON but not an IntelSummary: {exc}") from None


def title_of(content_type: str, payload: bytes) -> str:
    """A one-line title for listings ('' when the content has none)."""
    if content_type != INTEL_SUMMARY:
        return f"({content_type}, {len(payload)} bytes)"
    return parse_summary(payload).title[:TITLE_MAX]


def parse_summary(payload: bytes) -> intel_pb2.IntelSummary:
    """Raises ContentError when the bytes are not an IntelSummary."""
    try:
        return intel_pb2.IntelSummary.FromString(payload)
    except DecodeError:
        raise ContentError("payload is not an IntelSummary") from None


def content_dict(content_type: str, payload: bytes, *, attachments: bool) -> dict[str, Any]:
    """The content as JSON-ready fields; attachment bytes only when asked (they can be big)."""
    if content_type != INTEL_SUMMARY:
        out: dict[str, Any] = {"payload_size": len(payload)}
        if attachments:
            out["payload_b64"] = base64.b64encode(payload).decode()
        return out
    msg = parse_summary(payload)
    doc = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    for a, src in zip(doc.get("attachments", []), msg.attachments, strict=True):
        a["size"] = len(src.data)
        if not attachments:
            a.pop("data", None)
    return doc
