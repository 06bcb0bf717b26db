"""The outbox text of an audit item, and what the drainer makes of it.

encode() writes the entry's canonical tail (``@1`` + its canonical bytes after
``[seq,time_ms,``); encode_json() the JSON form every record had before, which is still
read. Whatever the form, the chain's hashes are the ones the old path (entry_fields +
entry_hash) gives for the same records, byte for byte.
"""

from __future__ import annotations

import json
import math

import pytest

from broker.audit.items import (
    TAG,
    AuditItem,
    OutboxEntry,
    decode,
    encode,
    encode_json,
    entry_fields,
    outbox_entry,
    with_detail,
)
from coalition.audit_chain import GENESIS, canonical_tail, chained_hash, entry_hash

ITEMS = [
    AuditItem("publish.accepted", "KOR", "KOR", "m-1", "allow", {"offset": 7, "topic": "t.x"}),
    AuditItem("deliver", "broker", "GBR", "", "allow", {"offsets": [1, 2], "é": "ü\u2028"}),
    AuditItem("publish.refused", "KOR", detail=None),
    AuditItem("x", "y", detail={"nested": {"b": 1, "a": [True, None, 1.5]}}),
    AuditItem("k", "a", detail={"quote": 'say "hi"', "back": "a\\b\\", "ctl": "\n\t\x00\x1f"}),
    AuditItem("k", "a", detail={'","': '","', "\\": '\\"', "end": '"]'}),
    AuditItem("k", "ünï", "中文", "m\x7f", "allow", {"emoji": "😀", "big": 2**70, "neg": -1}),
    AuditItem("k", "", "", "", "", {}),
]
# Items whose kind, actor, partner, message_id or decision JSON must escape: JSON form.
UNPLAIN = [
    AuditItem("k", 'a"b', detail={"x": 1}),
    AuditItem("k", "a", "p\\", detail={"x": 1}),
    AuditItem("k", "a", "p", "m\n", detail={"x": 1}),
    AuditItem("k\x01", "a"),
    AuditItem("k", "a", decision='","'),
    AuditItem("k", "a\ud800"),
    AuditItem("k", "a", detail={"lone": "\udfff"}),
]


def _old_hashes(items: list[tuple[AuditItem, int]]) -> list[bytes]:
    """The chain's hashes as the previous code made them: entry_fields + entry_hash."""
    prev, out = GENESIS, []
    for seq, (item, time_ms) in enumerate(items, start=1):
        entry = entry_fields(item, time_ms)
        entry.seq, entry.prev_hash = seq, prev
        prev = entry_hash(prev, entry)
        out.append(prev)
    return out


def _new_hashes(entries: list[OutboxEntry]) -> list[bytes]:
    prev, out = GENESIS, []
    for seq, e in enumerate(entries, start=1):
        prev = chained_hash(prev, seq, e.time_ms, e.tail)
        out.append(prev)
    return out


@pytest.mark.parametrize("item", ITEMS)
def test_encode_is_the_canonical_tail_and_decodes_back(item: AuditItem) -> None:
    text = encode(item)
    f = entry_fields(item, 0)
    tail = canonical_tail(f.kind, f.actor, f.partner, f.message_id, f.decision, f.detail_json)
    assert text.startswith(TAG)
    assert text[len(TAG) :].encode("utf-8") == tail
    assert decode(text) == AuditItem(
        item.kind, item.actor, item.partner, item.message_id, item.decision, item.detail or {}
    )
    e = outbox_entry(3, 77, text)
    assert (e.id, e.time_ms, e.tail) == (3, 77, tail)
    assert e.entry() == entry_fields(item, 77)


@pytest.mark.parametrize("item", UNPLAIN)
def test_an_item_the_tail_cannot_hold_plainly_is_written_as_json(item: AuditItem) -> None:
    text = encode(item)
    assert text == encode_json(item)
    assert decode(text) == item


@pytest.mark.parametrize("item", ITEMS + UNPLAIN[:5])
def test_encode_json_is_sorted_json_and_decodes_back(item: AuditItem) -> None:
    fields = {
        "kind": item.kind,
        "actor": item.actor,
        "partner": item.partner,
        "message_id": item.message_id,
        "decision": item.decision,
        "detail": item.detail,
    }
    text = encode_json(item)
    assert text == json.dumps(fields, sort_keys=True, allow_nan=False)
    assert decode(text) == item


def test_every_hash_is_the_old_paths_whichever_form_the_row_has() -> None:
    items = [(item, 1_000 + 7 * i) for i, item in enumerate(ITEMS + UNPLAIN[:5] + ITEMS)]
    old = _old_hashes(items)
    tagged = [outbox_entry(i, t, encode(item)) for i, (item, t) in enumerate(items)]
    as_json = [outbox_entry(i, t, encode_json(item)) for i, (item, t) in enumerate(items)]
    assert _new_hashes(tagged) == old
    assert _new_hashes(as_json) == old
    assert [e.entry() for e in tagged] == [entry_fields(item, t) for item, t in items]


@pytest.mark.parametrize("detail", [{"n": math.nan}, {"i": math.inf}, {"o": object()}])
def test_a_detail_that_is_not_plain_json_is_refused(detail: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not plain JSON"):
        encode(AuditItem("k", "a", detail=detail))
    with pytest.raises(ValueError, match="not plain JSON"):
        encode_json(AuditItem("k", "a", detail=detail))


def test_an_empty_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a kind"):
        encode(AuditItem("", "a"))


GOOD = encode(AuditItem("k", "a", "p", "m", "allow", {"x": 'q"\\'}))


@pytest.mark.parametrize(
    "text",
    [
        TAG,
        TAG + '"k","a","p","m","allow"]',  # five fields
        TAG + '"k","a","p","m","allow","{}","{}"]',  # seven: the detail is not canonical
        TAG + '"","a","p","m","allow","{}"]',  # no kind
        TAG + '"k","a\\"b","p","m","allow","{}"]',  # an escape in a plain field
        TAG + '"k","a","p","m","allow","{"x":1}"]',  # the detail's quotes not escaped
        TAG + '"k","a","p","m","allow","{\\"x\\":\\"\\"}\\"]',  # a trailing escape
        TAG + '"k","a","p","m","allow","[]"]',  # the detail is not an object
        TAG + '"k","a","p","m","allow","{\n}"]',  # a control character
        TAG + '"k","a\x01","p","m","allow","{}"]',
        GOOD[:-1],
        GOOD[:-2] + "x" + GOOD[-2:],  # something after the detail
        TAG + '"k","a","p","m","allow","{}\\"]',  # a backslash escaping the closing quote
        GOOD.replace("\\\\", "\\", 1),
    ],
)
def test_a_tagged_text_that_encode_did_not_make_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an encoded audit entry"):
        outbox_entry(1, 1, text)
    with pytest.raises(ValueError, match="not an encoded audit entry"):
        decode(text)


def test_with_detail_joins_to_the_detail_of_either_form() -> None:
    item = AuditItem("partner.admit", "admin", "GBR", detail={"a": 1})
    for text in (encode(item), encode_json(item)):
        e = outbox_entry(9, 1, with_detail(text, ref="registry:9"))
        assert json.loads(e.detail_json) == {"a": 1, "ref": "registry:9"}
    bare = AuditItem("partner.admit", "admin", "GBR")
    assert decode(with_detail(encode_json(bare), ref="r")).detail == {"ref": "r"}
