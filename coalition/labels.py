"""Security labels after STANAG 4774: the model, its human form, and its wire form.

The human form and its grammar are documented in docs/labels.md. Everything here
is pure: no I/O, no clock. A `Label` or `Category` that exists is valid; invalid
input raises `LabelError`, which names the offending token and what was expected.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from coalition.v1 import label_pb2

REL_TO = "REL TO"  # name of the releasability category (PERMISSIVE)
COMPARTMENT = "SAC"  # name of the category for bare segments (RESTRICTIVE)

_CODE = re.compile(r"[A-Z][A-Z0-9-]{1,23}")
_INFO_WORD = r"[A-Z0-9][A-Z0-9.-]*"
_INFO = re.compile(rf"{_INFO_WORD}(?: {_INFO_WORD})*")
_INFO_MAX = 64
_INT64_MAX = 2**63 - 1

# Bounds on a label's size (docs/labels.md, "Size limits"). Generous for real use (a
# REL TO of every NATO and partner nation is ~60 codes) and small enough that a label
# costs little to parse, store and decide however it was built. Checked on the wire
# form before anything else (label_bounds_problem) and on constructed labels.
MAX_CATEGORIES = 16
MAX_CATEGORY_VALUES = 128
MAX_LABEL_VALUES = 256
# The longest string any label field may hold: codes are at most 24 characters,
# informative values 64, "REL TO" 6.
_MAX_FIELD_CHARS = 64


class Classification(enum.IntEnum):
    """Ordered classification levels; values equal the proto enum."""

    UNCLASSIFIED = 1
    RESTRICTED = 2
    CONFIDENTIAL = 3
    SECRET = 4
    TOP_SECRET = 5

    @property
    def words(self) -> str:
        """The printed form, e.g. "TOP SECRET"."""
        return self.name.replace("_", " ")


class CategoryType(enum.IntEnum):
    """How a category is enforced; values equal the proto enum."""

    RESTRICTIVE = 1
    PERMISSIVE = 2
    INFORMATIVE = 3


class LabelError(ValueError):
    """A label (or precedence) that cannot be parsed or is not valid.

    `position` is the 0-based character offset in the parsed text, or -1 when the
    error is about a constructed or wire label; `field` then names the bad field.
    An empty `token` at a position means the text ended where more was expected.
    """

    def __init__(
        self,
        token: str,
        expected: str,
        position: int = -1,
        *,
        field: str = "",
        subject: str = "label",
    ) -> None:
        self.token = token
        self.expected = expected
        self.position = position
        self.field = field
        if position >= 0:
            where = f" at position {position}"
            got = f'"{_clip(token)}"' if token else f"end of {subject}"
        else:
            where = f" field {field}" if field else ""
            got = f'"{_clip(token)}"' if token else "nothing"
        super().__init__(f"bad {subject}{where}: got {got}, expected {expected}")


def _clip(token: str) -> str:
    return token if len(token) <= 40 else token[:37] + "..."


class Precedence(enum.IntEnum):
    """Urgency after ACP 121 (not a classification); values equal the proto enum."""

    ROUTINE = 1
    PRIORITY = 2
    IMMEDIATE = 3
    FLASH = 4

    @classmethod
    def parse(cls, text: str) -> Precedence:
        """Parse a name or ACP 121 prosign (R, P, O, Z), any case; raises LabelError."""
        word = text.strip().upper()
        if word in _PROSIGNS:
            return _PROSIGNS[word]
        if word in cls.__members__:
            return cls[word]
        raise LabelError(
            text, "a precedence (ROUTINE, PRIORITY, IMMEDIATE, FLASH)", subject="precedence"
        )


def valid_precedence(value: int) -> bool:
    """Whether value is a known precedence (ROUTINE..FLASH); 0 (unset) and others are not."""
    return value in _PRECEDENCE_VALUES


_PRECEDENCE_VALUES = frozenset(int(p) for p in Precedence)
_PROSIGNS = {
    "R": Precedence.ROUTINE,
    "P": Precedence.PRIORITY,
    "O": Precedence.IMMEDIATE,
    "Z": Precedence.FLASH,
}
# NATO abbreviations stand alone in place of "NATO <LEVEL>"; they are reserved
# as policy names so that "NS" can never mean a policy called NS.
_NATO_ABBREVIATIONS = {
    "NU": Classification.UNCLASSIFIED,
    "NR": Classification.RESTRICTED,
    "NC": Classification.CONFIDENTIAL,
    "NS": Classification.SECRET,
    "CTS": Classification.TOP_SECRET,
}
_CLASSIFICATION_WORDS = {c.words: c for c in Classification}

_EXPECT_POLICY = "a policy name ([A-Z][A-Z0-9-]{1,23}, e.g. NATO) or NU, NR, NC, NS, CTS"
_EXPECT_CLASSIFICATION = (
    "a classification (UNCLASSIFIED, RESTRICTED, CONFIDENTIAL, SECRET, TOP SECRET)"
)
_EXPECT_CODE = "a code ([A-Z][A-Z0-9-]{1,23})"
_EXPECT_INFO = (
    f"an informative value (words of A-Z, 0-9, '-', '.', single spaces, "
    f"at most {_INFO_MAX} characters)"
)
_EXPECT_TYPE = "a category type (RESTRICTIVE, PERMISSIVE, INFORMATIVE)"
_EXPECT_PARTNER = "a partner code or group name ([A-Z][A-Z0-9-]{1,23}, e.g. KOR, NATO)"
_EXPECT_SEGMENT = (
    'a segment: "REL TO" codes, compartments (e.g. SIGINT), '
    'or "RESTRICTIVE|PERMISSIVE|INFORMATIVE NAME: values"'
)


def _policy_problem(policy: str) -> str | None:
    if not _CODE.fullmatch(policy) or policy in _NATO_ABBREVIATIONS:
        return "a policy name ([A-Z][A-Z0-9-]{1,23}, not NU, NR, NC, NS, CTS)"
    return None


def _value_problem(kind: CategoryType, value: str) -> str | None:
    if kind is CategoryType.INFORMATIVE:
        ok = _INFO.fullmatch(value) is not None and len(value) <= _INFO_MAX
        return None if ok else _EXPECT_INFO
    return None if _CODE.fullmatch(value) else _EXPECT_CODE


@dataclass(frozen=True)
class Category:
    """One labelled category: a name, how it is enforced, and its values (order kept)."""

    name: str
    type: CategoryType
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        """Validate; raises LabelError naming the bad field."""
        if not isinstance(self.type, CategoryType):
            if not (isinstance(self.type, int) and self.type in _VALID_TYPES):
                raise LabelError(str(self.type), _EXPECT_TYPE, field="type")
            object.__setattr__(self, "type", CategoryType(self.type))
        object.__setattr__(self, "values", tuple(self.values))
        if self.name == REL_TO or self.name == COMPARTMENT:
            reserved = CategoryType.PERMISSIVE if self.name == REL_TO else CategoryType.RESTRICTIVE
            if self.type is not reserved:
                raise LabelError(self.type.name, f"{reserved.name} for {self.name}", field="type")
        elif not _CODE.fullmatch(self.name):
            raise LabelError(self.name, "a category name ([A-Z][A-Z0-9-]{1,23})", field="name")
        if not self.values:
            raise LabelError("", "at least one value", field="values")
        seen: set[str] = set()
        for i, value in enumerate(self.values):
            problem = _value_problem(self.type, value) if isinstance(value, str) else _EXPECT_CODE
            if problem:
                raise LabelError(str(value), problem, field=f"values[{i}]")
            if value in seen:
                raise LabelError(
                    value, "a value not already in this category", field=f"values[{i}]"
                )
            seen.add(value)


@dataclass(frozen=True)
class Label:
    """A security label; construction validates and raises LabelError."""

    policy: str
    classification: Classification
    categories: tuple[Category, ...] = ()
    origination_time_ms: int = 0
    originator: str = ""
    expiry_time_ms: int = 0  # 0 = none

    def __post_init__(self) -> None:
        """Validate; raises LabelError naming the bad field."""
        problem = _policy_problem(self.policy) if isinstance(self.policy, str) else "a string"
        if problem:
            raise LabelError(str(self.policy), problem, field="policy")
        if not isinstance(self.classification, Classification):
            if isinstance(self.classification, int) and self.classification in _VALID_LEVELS:
                object.__setattr__(self, "classification", Classification(self.classification))
            else:
                raise LabelError(
                    str(self.classification), _EXPECT_CLASSIFICATION, field="classification"
                )
        object.__setattr__(self, "categories", tuple(self.categories))
        names: set[str] = set()
        for i, cat in enumerate(self.categories):
            if not isinstance(cat, Category):
                raise LabelError(repr(cat), "a Category", field=f"categories[{i}]")
            if cat.name in names:
                raise LabelError(
                    cat.name, "a category not already in the label", field=f"categories[{i}].name"
                )
            names.add(cat.name)
        too_many = _counts_problem([len(c.values) for c in self.categories])
        if too_many is not None:
            raise LabelError(too_many[1], too_many[2], field=too_many[0])
        for name in ("origination_time_ms", "expiry_time_ms"):
            ms = getattr(self, name)
            if type(ms) is not int or not 0 <= ms <= _INT64_MAX:
                raise LabelError(str(ms), "Unix milliseconds, 0 or more", field=name)
        if self.originator and not _CODE.fullmatch(self.originator):
            raise LabelError(self.originator, f"empty or {_EXPECT_CODE}", field="originator")
        if self.expiry_time_ms and self.expiry_time_ms <= self.origination_time_ms:
            expected = "an expiry after the origination time"
            raise LabelError(str(self.expiry_time_ms), expected, field="expiry_time_ms")

    @property
    def releasable_to(self) -> tuple[str, ...] | None:
        """Values of the REL TO category, None if the label has none."""
        for cat in self.categories:
            if cat.name == REL_TO:
                return cat.values
        return None

    def human(self) -> str:
        """The canonical human form; same as format_label(self)."""
        # Labels are immutable, so the text is computed once (outside the fields: it
        # takes no part in equality, hashing or repr).
        text: str | None = self.__dict__.get("_human")
        if text is None:
            text = format_label(self)
            object.__setattr__(self, "_human", text)
        return text


_VALID_LEVELS = frozenset(int(c) for c in Classification)
_VALID_TYPES = frozenset(int(t) for t in CategoryType)


def format_label(label: Label) -> str:
    """Print the canonical human form, e.g. "NATO SECRET // REL TO KOR, USA"."""
    parts = [f"{label.policy} {label.classification.words}"]
    for cat in label.categories:
        values = ", ".join(cat.values)
        if cat.name == REL_TO:
            parts.append(f"{REL_TO} {values}")
        elif cat.name == COMPARTMENT:
            parts.append(values)
        else:
            parts.append(f"{cat.type.name} {cat.name}: {values}")
    return " // ".join(parts)


# --- parsing -------------------------------------------------------------------

_WORD = re.compile(r"\S+")
_REL_TO_HEAD = re.compile(r"REL\s+TO(?=\s|$)", re.IGNORECASE | re.ASCII)
# A typed segment needs a name after its keyword; a bare compartment can never be
# followed by whitespace and a letter (values are joined by ","), so this is unambiguous.
_TYPED_HEAD = re.compile(r"(RESTRICTIVE|PERMISSIVE|INFORMATIVE)\s+(?=[A-Za-z])", re.IGNORECASE)
_NAME = re.compile(r"[^\s:,]+")


@dataclass(frozen=True)
class _Span:
    """A stripped piece of the text, its absolute offset, and what follows it."""

    text: str
    pos: int
    end_token: str  # "//" or "" (end of label)
    end_pos: int


def _upper(token: str) -> str | None:
    # Only ASCII may be folded: "ß".upper() == "SS" would smuggle in a valid code.
    return token.upper() if token.isascii() else None


def parse_label(
    text: str, *, origination_time_ms: int = 0, originator: str = "", expiry_time_ms: int = 0
) -> Label:
    """Parse the human form (case-insensitive, extra whitespace allowed); raises LabelError."""
    spans = _split_segments(text)
    policy, classification = _parse_head(spans[0])
    categories: list[Category] = []
    for span in spans[1:]:
        if not span.text:
            raise LabelError(span.end_token, _EXPECT_SEGMENT, span.end_pos)
        category, name_pos = _parse_segment(span)
        if any(c.name == category.name for c in categories):
            if category.name == REL_TO:
                token = REL_TO
            elif category.name == COMPARTMENT:
                token = category.values[0]
            else:
                token = text[name_pos : name_pos + len(category.name)]
            hint = " (list compartments in one segment)" if category.name == COMPARTMENT else ""
            raise LabelError(token, f"a category not already in the label{hint}", name_pos)
        categories.append(category)
    return Label(
        policy=policy,
        classification=classification,
        categories=tuple(categories),
        origination_time_ms=origination_time_ms,
        originator=originator,
        expiry_time_ms=expiry_time_ms,
    )


def _split_segments(text: str) -> list[_Span]:
    spans: list[_Span] = []
    start = 0
    while True:
        sep = text.find("//", start)
        end = len(text) if sep < 0 else sep
        raw = text[start:end]
        stripped = raw.strip()
        pos = start + (len(raw) - len(raw.lstrip())) if stripped else end
        spans.append(_Span(stripped, pos, "" if sep < 0 else "//", end))
        if sep < 0:
            return spans
        start = sep + 2


def _parse_head(span: _Span) -> tuple[str, Classification]:
    words = [(m.start() + span.pos, m.group()) for m in _WORD.finditer(span.text)]
    if not words:
        raise LabelError(span.end_token, _EXPECT_POLICY, span.end_pos)

    def word(i: int, expected: str) -> str:
        if i >= len(words):
            raise LabelError(span.end_token, expected, span.end_pos)
        return _upper(words[i][1]) or ""

    first = word(0, _EXPECT_POLICY)
    if first in _NATO_ABBREVIATIONS:
        if len(words) > 1:
            pos, token = words[1]
            raise LabelError(token, '"//" or end of label (NU, NR, NC, NS, CTS stand alone)', pos)
        return "NATO", _NATO_ABBREVIATIONS[first]
    if not _CODE.fullmatch(first):
        raise LabelError(words[0][1], _EXPECT_POLICY, words[0][0])
    level = word(1, _EXPECT_CLASSIFICATION)
    used = 2
    if level == "TOP":
        if word(2, '"SECRET" (as in TOP SECRET)') != "SECRET":
            raise LabelError(words[2][1], '"SECRET" (as in TOP SECRET)', words[2][0])
        level, used = "TOP SECRET", 3
    if level not in _CLASSIFICATION_WORDS:
        raise LabelError(words[1][1], _EXPECT_CLASSIFICATION, words[1][0])
    if len(words) > used:
        pos, token = words[used]
        raise LabelError(token, '"//" or end of label', pos)
    return first, _CLASSIFICATION_WORDS[level]


def _parse_segment(span: _Span) -> tuple[Category, int]:
    """Parse one segment; returns the category and where its name starts."""
    text = span.text
    rel = _REL_TO_HEAD.match(text)
    if rel:
        values = _parse_values(span, rel.end(), CategoryType.PERMISSIVE, _EXPECT_PARTNER)
        return Category(REL_TO, CategoryType.PERMISSIVE, values), span.pos
    typed = _TYPED_HEAD.match(text)
    if not typed:
        values = _parse_values(span, 0, CategoryType.RESTRICTIVE, _EXPECT_SEGMENT)
        return Category(COMPARTMENT, CategoryType.RESTRICTIVE, values), span.pos
    kind = CategoryType[typed.group(1).upper()]
    name_match = _NAME.match(text, typed.end())
    assert name_match is not None  # the lookahead guarantees a letter here
    name_pos = span.pos + name_match.start()
    name = _upper(name_match.group()) or ""
    if not _CODE.fullmatch(name):
        raise LabelError(name_match.group(), "a category name ([A-Z][A-Z0-9-]{1,23})", name_pos)
    if name == COMPARTMENT:
        raise LabelError(
            name_match.group(), "a category name other than SAC (write compartments bare)", name_pos
        )
    rest = name_match.end()
    while rest < len(text) and text[rest].isspace():
        rest += 1
    if rest >= len(text) or text[rest] != ":":
        after = _WORD.match(text, rest)
        if after is None:
            raise LabelError(span.end_token, '":" after the category name', span.end_pos)
        raise LabelError(after.group(), '":" after the category name', span.pos + rest)
    values = _parse_values(span, rest + 1, kind, _value_expectation(kind))
    return Category(name, kind, values), name_pos


def _value_expectation(kind: CategoryType) -> str:
    return _EXPECT_INFO if kind is CategoryType.INFORMATIVE else _EXPECT_CODE


def _parse_values(span: _Span, start: int, kind: CategoryType, first: str) -> tuple[str, ...]:
    """Parse `VALUE { "," VALUE }` from span.text[start:]; `first` is expected of value one."""
    values: list[str] = []
    text = span.text
    while True:
        comma = text.find(",", start)
        end = len(text) if comma < 0 else comma
        expected = first if not values else _value_expectation(kind)
        raw = text[start:end]
        words = [(span.pos + start + m.start(), m.group()) for m in _WORD.finditer(raw)]
        if not words:
            if comma >= 0:
                raise LabelError(",", expected, span.pos + comma)
            raise LabelError(span.end_token, expected, span.end_pos)
        if kind is CategoryType.INFORMATIVE:
            value = " ".join(w for _, w in words).upper()
            if not raw.isascii() or _value_problem(kind, value):
                raise LabelError(raw.strip(), _EXPECT_INFO, words[0][0])
        else:
            value = _upper(words[0][1]) or ""
            if _value_problem(kind, value):
                raise LabelError(words[0][1], expected, words[0][0])
            if len(words) > 1 and not values and first == _EXPECT_SEGMENT:
                # "RESTRICTIV OPS: A" is a misspelt keyword, not a compartment list
                raise LabelError(words[0][1], _EXPECT_SEGMENT, words[0][0])
            if len(words) > 1:
                pos, token = words[1]
                raise LabelError(token, '", " between values, or "//" between segments', pos)
        if value in values:
            raise LabelError(raw.strip(), "a value not already in this category", words[0][0])
        values.append(value)
        if comma < 0:
            return tuple(values)
        start = comma + 1


# --- wire form -----------------------------------------------------------------


def label_to_proto(label: Label) -> label_pb2.Label:
    """Convert to the wire message (order of categories and values kept)."""
    return label_pb2.Label(
        policy=label.policy,
        classification=label_pb2.Classification.Value(label.classification.name),
        categories=[
            label_pb2.Category(
                name=c.name, type=label_pb2.CategoryType.Value(c.type.name), values=c.values
            )
            for c in label.categories
        ],
        origination_time_ms=label.origination_time_ms,
        originator=label.originator,
        expiry_time_ms=label.expiry_time_ms,
    )


# Wire labels found within every bound, by their bytes (a label repeats from message to
# message: checked once); emptied when full.
_WITHIN_BOUNDS: set[bytes] = set()
_WITHIN_BOUNDS_MAX = 256


def label_bounds_problem(msg: label_pb2.Label) -> str | None:
    """Why a wire label is over a size limit (naming the field and the limit), or None.

    Only counts and lengths, no parsing: cheap enough to run before a signature check.
    """
    wire = msg.SerializeToString()
    if wire in _WITHIN_BOUNDS:
        return None
    bad = _wire_bounds(msg)
    if bad is None:
        if len(_WITHIN_BOUNDS) >= _WITHIN_BOUNDS_MAX:
            _WITHIN_BOUNDS.clear()
        _WITHIN_BOUNDS.add(wire)
        return None
    return f"label field {bad[0]} has {bad[1]}, expected {bad[2]}"


def _wire_bounds(msg: label_pb2.Label) -> tuple[str, str, str] | None:
    """(field, what it holds, what is allowed) for a wire label over a limit, or None."""
    categories = msg.categories
    counts = _counts_problem([len(c.values) for c in categories])
    if counts:
        return counts
    m = _MAX_FIELD_CHARS
    if (
        len(msg.policy) <= m
        and len(msg.originator) <= m
        and all(len(c.name) <= m and all(len(v) <= m for v in c.values) for c in categories)
        and msg.origination_time_ms >= 0
        and msg.expiry_time_ms >= 0
    ):
        return None  # within every bound; below, which field is not, to name it
    texts: list[tuple[str, str]] = [("policy", msg.policy), ("originator", msg.originator)]
    for i, c in enumerate(msg.categories):
        texts.append((f"categories[{i}].name", c.name))
        texts.extend((f"categories[{i}].values[{j}]", v) for j, v in enumerate(c.values))
    for name, value in texts:
        if len(value) > _MAX_FIELD_CHARS:
            return name, f"{len(value)} characters", f"at most {_MAX_FIELD_CHARS} characters"
    for name, ms in (
        ("origination_time_ms", msg.origination_time_ms),
        ("expiry_time_ms", msg.expiry_time_ms),
    ):
        if ms < 0:
            return name, str(ms), "Unix milliseconds, 0 or more"
    return None


def _counts_problem(value_counts: list[int]) -> tuple[str, str, str] | None:
    """(field, what it holds, what is allowed) for a label over a count limit, or None."""
    if len(value_counts) > MAX_CATEGORIES:
        return "categories", f"{len(value_counts)} categories", f"at most {MAX_CATEGORIES}"
    for i, n in enumerate(value_counts):
        if n > MAX_CATEGORY_VALUES:
            return f"categories[{i}].values", f"{n} values", f"at most {MAX_CATEGORY_VALUES}"
    total = sum(value_counts)
    if total > MAX_LABEL_VALUES:
        return "categories", f"{total} values in all", f"at most {MAX_LABEL_VALUES} in all"
    return None


def label_from_proto(msg: label_pb2.Label) -> Label:
    """Convert and validate a wire label; raises LabelError naming the bad field."""
    bad = _wire_bounds(msg)
    if bad is not None:
        raise LabelError(bad[1], bad[2], field=bad[0])
    if msg.classification not in _VALID_LEVELS:
        raise LabelError(str(msg.classification), _EXPECT_CLASSIFICATION, field="classification")
    categories = []
    for i, c in enumerate(msg.categories):
        if c.type not in _VALID_TYPES:
            raise LabelError(str(c.type), _EXPECT_TYPE, field=f"categories[{i}].type")
        try:
            categories.append(Category(c.name, CategoryType(c.type), tuple(c.values)))
        except LabelError as e:
            raise LabelError(e.token, e.expected, field=f"categories[{i}].{e.field}") from None
    return Label(
        policy=msg.policy,
        classification=Classification(msg.classification),
        categories=tuple(categories),
        origination_time_ms=msg.origination_time_ms,
        originator=msg.originator,
        expiry_time_ms=msg.expiry_time_ms,
    )
