"""Labels: human form (parse/print), validation, errors that name the token, wire form."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coalition.labels import (
    COMPARTMENT,
    REL_TO,
    Category,
    CategoryType,
    Classification,
    Label,
    LabelError,
    Precedence,
    format_label,
    label_from_proto,
    label_to_proto,
    parse_label,
)
from coalition.v1 import label_pb2

CANONICAL = [
    "NATO SECRET // REL TO KOR, USA, GBR",
    "NATO RESTRICTED // REL TO NATO, KOR, UKR // SIGINT",
    "NATO SECRET // REL TO NATO // RESTRICTIVE OPS: ALPHA, BRAVO"
    " // INFORMATIVE HANDLING: EYES ONLY",
    "NATO UNCLASSIFIED",
    "NATO TOP SECRET // SIGINT, HUMINT // REL TO FVEY",
    "EU CONFIDENTIAL // PERMISSIVE MISSION: ALTHEA, ATALANTA",
    "NATO SECRET // INFORMATIVE NOTE: REF 2026-11.3",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_forms_round_trip_exactly(text: str) -> None:
    label = parse_label(text)
    assert format_label(label) == text
    assert label.human() == text
    assert parse_label(label.human()) == label


def test_parse_builds_the_structure() -> None:
    label = parse_label(
        "NATO RESTRICTED // REL TO NATO, KOR, UKR // SIGINT",
        origination_time_ms=1000,
        originator="KOR",
        expiry_time_ms=2000,
    )
    assert label == Label(
        policy="NATO",
        classification=Classification.RESTRICTED,
        categories=(
            Category(REL_TO, CategoryType.PERMISSIVE, ("NATO", "KOR", "UKR")),
            Category(COMPARTMENT, CategoryType.RESTRICTIVE, ("SIGINT",)),
        ),
        origination_time_ms=1000,
        originator="KOR",
        expiry_time_ms=2000,
    )
    assert label.releasable_to == ("NATO", "KOR", "UKR")
    assert parse_label("NATO SECRET // SIGINT").releasable_to is None


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("NS // REL TO KOR", "NATO SECRET // REL TO KOR"),
        ("nu", "NATO UNCLASSIFIED"),
        ("NR", "NATO RESTRICTED"),
        ("NC // SIGINT", "NATO CONFIDENTIAL // SIGINT"),
        ("CTS", "NATO TOP SECRET"),
        ("nato secret // rel to kor, usa", "NATO SECRET // REL TO KOR, USA"),
        ("  NATO   TOP\tSECRET//REL  TO KOR,USA  ", "NATO TOP SECRET // REL TO KOR, USA"),
        (
            "NATO SECRET//restrictive ops :alpha ,bravo//informative handling:  eyes   only",
            "NATO SECRET // RESTRICTIVE OPS: ALPHA, BRAVO // INFORMATIVE HANDLING: EYES ONLY",
        ),
        # A bare value that happens to be a keyword is a compartment, not a type.
        ("NATO SECRET // RESTRICTIVE, REL", "NATO SECRET // RESTRICTIVE, REL"),
    ],
)
def test_tolerant_input_prints_canonical(text: str, canonical: str) -> None:
    assert format_label(parse_label(text)) == canonical


@pytest.mark.parametrize(
    ("text", "token", "position", "expected_part"),
    [
        ("NATO SECRT", "SECRT", 5, "a classification (UNCLASSIFIED"),
        ("", "", 0, "a policy name"),
        ("   ", "", 3, "a policy name"),
        ("// REL TO KOR", "//", 0, "a policy name"),
        ("1NATO SECRET", "1NATO", 0, "a policy name"),
        ("NATO", "", 4, "a classification"),
        ("NATO // REL TO KOR", "//", 5, "a classification"),
        ("NATO TOP", "", 8, '"SECRET"'),
        ("NATO TOP SECRT", "SECRT", 9, '"SECRET"'),
        ("NATO SECRET REL TO KOR", "REL", 12, '"//" or end of label'),
        ("NS SECRET", "SECRET", 3, "stand alone"),
        ("NATO NS", "NS", 5, "a classification"),
        ("NATO SECRET //", "", 14, "a segment"),
        ("NATO SECRET // // SIGINT", "//", 15, "a segment"),
        ("NATO SECRET //   // SIGINT", "//", 17, "a segment"),
        ("NATO SECRET // REL TO", "", 21, "a partner code or group name"),
        ("NATO SECRET // REL TO // SIGINT", "//", 22, "a partner code or group name"),
        ("NATO SECRET // REL TO KOR,", "", 26, "a code"),
        ("NATO SECRET // REL TO KOR,, USA", ",", 26, "a code"),
        ("NATO SECRET // REL TO KOR USA", "USA", 26, '", " between values'),
        ("NATO SECRET // REL TO KOR, KOR", "KOR", 27, "not already in this category"),
        ("NATO SECRET // REL TO K", "K", 22, "a partner code"),
        ("NATO SECRET // REL TO ßA", "ßA", 22, "a partner code"),
        ("NATO SECRET // REL TO KOR // REL TO USA", "REL TO", 29, "not already in the label"),
        ("NATO SECRET // SIGINT // HUMINT", "HUMINT", 25, "in one segment"),
        ("NATO SECRET // SIGINT, SIGINT", "SIGINT", 23, "not already in this category"),
        ("NATO SECRET // SIG/INT", "SIG/INT", 15, "a segment"),
        ("NATO SECRET // RESTRICTIV OPS: A", "RESTRICTIV", 15, "a segment"),
        ("NATO SECRET // RESTRICTIVE OPS ALPHA", "ALPHA", 31, '":" after the category name'),
        ("NATO SECRET // RESTRICTIVE OPS", "", 30, '":" after the category name'),
        ("NATO SECRET // RESTRICTIVE OPS:", "", 31, "a code"),
        ("NATO SECRET // RESTRICTIVE SAC: SIGINT", "SAC", 27, "other than SAC"),
        ("NATO SECRET // PERMISSIVE O: AB", "O", 26, "a category name"),
        ("NATO SECRET // RESTRICTIVE OPS: ALPHA, B", "B", 39, "a code"),
        ("NATO SECRET // RESTRICTIVE OPS: EYES ONLY", "ONLY", 37, '", " between values'),
        ("NATO SECRET // INFORMATIVE H1: EYES/ONLY", "EYES/ONLY", 31, "an informative value"),
        ("NATO SECRET // INFORMATIVE H1: " + "A" * 65, "A" * 65, 31, "at most 64"),
        ("NATO SECRET // INFORMATIVE H1: EYES ONLY, eyes  only", "eyes  only", 42, "not already"),
        (
            "NATO SECRET // PERMISSIVE OPS: AB // RESTRICTIVE OPS: CD",
            "OPS",
            49,
            "not already in the label",
        ),
    ],
)
def test_errors_name_the_token_and_what_was_expected(
    text: str, token: str, position: int, expected_part: str
) -> None:
    with pytest.raises(LabelError) as caught:
        parse_label(text)
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.token, err.position) == (token, position)
    assert expected_part in err.expected
    clipped = token if len(token) <= 40 else token[:37] + "..."  # long tokens are clipped
    shown = f'got "{clipped}"' if token else "got end of label"
    assert str(err).startswith(f"bad label at position {position}: {shown}, expected ")


def test_error_message_reads_as_documented() -> None:
    with pytest.raises(LabelError) as caught:
        parse_label("NATO SECRT // REL TO KOR")
    assert str(caught.value) == (
        'bad label at position 5: got "SECRT", expected a classification '
        "(UNCLASSIFIED, RESTRICTED, CONFIDENTIAL, SECRET, TOP SECRET)"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "nato"}, "policy"),
        ({"policy": "NS"}, "policy"),  # reserved: NATO abbreviation
        ({"classification": 0}, "classification"),
        ({"classification": 9}, "classification"),
        ({"originator": "kor"}, "originator"),
        ({"origination_time_ms": -1}, "origination_time_ms"),
        ({"origination_time_ms": 10, "expiry_time_ms": 10}, "expiry_time_ms"),
        ({"categories": (Category("OPS", CategoryType.RESTRICTIVE, ("AB",)),) * 2}, "categories"),
    ],
)
def test_constructed_labels_are_validated(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"policy": "NATO", "classification": Classification.SECRET}
    args.update(kwargs)
    with pytest.raises(LabelError) as caught:
        Label(**args)  # type: ignore[arg-type]
    assert caught.value.field.startswith(field)
    assert caught.value.position == -1
    assert f"bad label field {caught.value.field}: got " in str(caught.value)


@pytest.mark.parametrize(
    ("name", "kind", "values", "field"),
    [
        (REL_TO, CategoryType.RESTRICTIVE, ("KOR",), "type"),
        (COMPARTMENT, CategoryType.PERMISSIVE, ("SIGINT",), "type"),
        ("ops", CategoryType.RESTRICTIVE, ("AB",), "name"),
        ("OPS", CategoryType.RESTRICTIVE, (), "values"),
        ("OPS", CategoryType.RESTRICTIVE, ("AB", "AB"), "values[1]"),
        ("OPS", CategoryType.RESTRICTIVE, ("EYES ONLY",), "values[0]"),
        ("OPS", CategoryType.INFORMATIVE, ("EYES  ONLY",), "values[0]"),
        ("OPS", CategoryType.INFORMATIVE, ("eyes only",), "values[0]"),
        ("OPS", 7, ("AB",), "type"),
    ],
)
def test_constructed_categories_are_validated(
    name: str, kind: CategoryType, values: tuple[str, ...], field: str
) -> None:
    with pytest.raises(LabelError) as caught:
        Category(name, kind, values)
    assert caught.value.field == field


def test_precedence_is_ordered_and_parses() -> None:
    assert Precedence.ROUTINE < Precedence.PRIORITY < Precedence.IMMEDIATE < Precedence.FLASH
    assert Precedence.parse("flash") is Precedence.FLASH
    assert Precedence.parse(" Immediate ") is Precedence.IMMEDIATE
    assert Precedence.parse("Z") is Precedence.FLASH  # ACP 121 prosign
    assert Precedence.parse("r") is Precedence.ROUTINE
    for value in Precedence:
        assert int(value) == label_pb2.Precedence.Value(value.name)
    with pytest.raises(LabelError) as caught:
        Precedence.parse("URGENT")
    assert caught.value.token == "URGENT"
    assert str(caught.value).startswith('bad precedence: got "URGENT", expected a precedence')


def test_enum_values_equal_the_wire_enums() -> None:
    for level in Classification:
        assert int(level) == label_pb2.Classification.Value(level.name)
    for kind in CategoryType:
        assert int(kind) == label_pb2.CategoryType.Value(kind.name)
    assert Classification.UNCLASSIFIED < Classification.SECRET < Classification.TOP_SECRET


# --- wire form ---------------------------------------------------------------------


def test_proto_round_trip_of_an_example() -> None:
    label = parse_label(CANONICAL[2], origination_time_ms=5, originator="GBR", expiry_time_ms=9)
    msg = label_to_proto(label)
    assert msg.classification == label_pb2.SECRET
    assert [c.name for c in msg.categories] == [REL_TO, "OPS", "HANDLING"]
    assert label_from_proto(label_pb2.Label.FromString(msg.SerializeToString())) == label


def _good_proto() -> label_pb2.Label:
    return label_to_proto(parse_label("NATO SECRET // REL TO KOR // SIGINT"))


def _set_classification(m: label_pb2.Label) -> None:
    m.classification = label_pb2.CLASSIFICATION_UNSPECIFIED


def _set_type(m: label_pb2.Label) -> None:
    m.categories[1].type = label_pb2.CATEGORY_TYPE_UNSPECIFIED


def _set_bad_value(m: label_pb2.Label) -> None:
    m.categories[0].values.append("kor")


def _set_empty_policy(m: label_pb2.Label) -> None:
    m.policy = ""


def _set_bad_name(m: label_pb2.Label) -> None:
    m.categories[1].name = "S A C"


def _set_no_values(m: label_pb2.Label) -> None:
    del m.categories[1].values[:]


def _set_duplicate_category(m: label_pb2.Label) -> None:
    m.categories.add(name="SAC", type=label_pb2.RESTRICTIVE, values=["HUMINT"])


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set_classification, "classification"),
        (_set_type, "categories[1].type"),
        (_set_bad_value, "categories[0].values[1]"),
        (_set_empty_policy, "policy"),
        (_set_bad_name, "categories[1].name"),
        (_set_no_values, "categories[1].values"),
        (_set_duplicate_category, "categories[2].name"),
    ],
)
def test_label_from_proto_rejects_invalid(
    mutate: Callable[[label_pb2.Label], None], field: str
) -> None:
    msg = _good_proto()
    mutate(msg)
    with pytest.raises(LabelError) as caught:
        label_from_proto(msg)
    assert caught.value.field == field
    assert field in str(caught.value)


# --- property: random valid labels survive format -> parse and to -> from proto ------

_codes = st.from_regex(r"[A-Z][A-Z0-9-]{1,23}", fullmatch=True)
_policies = _codes.filter(lambda p: p not in {"NU", "NR", "NC", "NS", "CTS"})
_info_values = st.from_regex(
    r"[A-Z0-9][A-Z0-9.-]{0,9}( [A-Z0-9][A-Z0-9.-]{0,9}){0,3}", fullmatch=True
)


@st.composite
def labels(draw: st.DrawFn) -> Label:
    cats: list[Category] = []
    if draw(st.booleans()):
        cats.append(Category(REL_TO, CategoryType.PERMISSIVE, draw(_unique(_codes))))
    if draw(st.booleans()):
        cats.append(Category(COMPARTMENT, CategoryType.RESTRICTIVE, draw(_unique(_codes))))
    names = draw(st.lists(_codes.filter(lambda n: n != COMPARTMENT), max_size=3, unique=True))
    for name in names:
        kind = draw(st.sampled_from(CategoryType))
        values = _info_values if kind is CategoryType.INFORMATIVE else _codes
        cats.append(Category(name, kind, draw(_unique(values))))
    origination = draw(st.integers(0, 2**62))
    return Label(
        policy=draw(_policies),
        classification=draw(st.sampled_from(Classification)),
        categories=tuple(draw(st.permutations(cats))),
        origination_time_ms=origination,
        originator=draw(st.just("") | _codes),
        expiry_time_ms=draw(st.just(0) | st.integers(origination + 1, 2**63 - 1)),
    )


def _unique(values: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(values, min_size=1, max_size=4, unique=True).map(tuple)


@given(labels())
def test_format_then_parse_is_identity(label: Label) -> None:
    text = format_label(label)
    parsed = parse_label(
        text,
        origination_time_ms=label.origination_time_ms,
        originator=label.originator,
        expiry_time_ms=label.expiry_time_ms,
    )
    assert parsed == label
    assert format_label(parsed) == text
    assert parse_label(text.lower()) == parse_label(text)


@given(labels())
def test_proto_round_trip(label: Label) -> None:
    wire = label_to_proto(label).SerializeToString()
    assert label_from_proto(label_pb2.Label.FromString(wire)) == label
