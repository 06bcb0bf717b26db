"""The outbox text of an audit item: the same text as json.dumps(sort_keys=True) made,
the encoder built once, and the same refusals for a detail that is not plain JSON."""

from __future__ import annotations

import json
import math

import pytest

from broker.audit.items import AuditItem, decode, encode

ITEMS = [
    AuditItem("publish.accepted", "KOR", "KOR", "m-1", "allow", {"offset": 7, "topic": "t.x"}),
    AuditItem("deliver", "broker", "GBR", "", "allow", {"offsets": [1, 2], "é": "ü\u2028"}),
    AuditItem("publish.refused", "KOR", detail=None),
    AuditItem("x", "y", detail={"nested": {"b": 1, "a": [True, None, 1.5]}}),
]


@pytest.mark.parametrize("item", ITEMS)
def test_encode_is_sorted_json_and_decodes_back(item: AuditItem) -> None:
    fields = {
        "kind": item.kind,
        "actor": item.actor,
        "partner": item.partner,
        "message_id": item.message_id,
        "decision": item.decision,
        "detail": item.detail,
    }
    text = encode(item)
    assert text == json.dumps(fields, sort_keys=True, allow_nan=False)
    assert decode(text) == item


@pytest.mark.parametrize("detail", [{"n": math.nan}, {"i": math.inf}, {"o": object()}])
def test_a_detail_that_is_not_plain_json_is_refused(detail: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not plain JSON"):
        encode(AuditItem("k", "a", detail=detail))
