"""Partner policy and the pure, deny-by-default delivery and origination decisions."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from coalition.labels import COMPARTMENT, REL_TO, CategoryType, Classification, Label
from coalition.topics import TopicError, any_match, validate_pattern
from coalition.v1 import directory_pb2, label_pb2, policy_pb2

_CODE = re.compile(r"[A-Z][A-Z0-9-]{1,23}")
_UINT32_MAX = 2**32 - 1


class PolicyError(ValueError):
    """A partner policy that is not valid; the message names the bad field and value."""


class PartnerStatus(enum.IntEnum):
    """Whether a partner takes part; values equal the proto enum."""

    ACTIVE = 1
    SUSPENDED = 2
    PENDING = 3  # registered, not yet admitted by operators


def _empty_levels() -> Mapping[str, Classification]:
    return MappingProxyType({})


def _empty_categories() -> Mapping[str, frozenset[str]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class PartnerPolicy:
    """What one partner may receive and publish; construction validates (PolicyError)."""

    partner: str
    status: PartnerStatus = PartnerStatus.PENDING
    clearances: Mapping[str, Classification] = field(default_factory=_empty_levels)
    groups: frozenset[str] = frozenset()
    categories: Mapping[str, frozenset[str]] = field(default_factory=_empty_categories)
    publish_topics: tuple[str, ...] = ()
    subscribe_topics: tuple[str, ...] = ()
    origination_ceilings: Mapping[str, Classification] = field(default_factory=_empty_levels)
    publish_rate_per_s: int = 0

    def __post_init__(self) -> None:
        """Validate and freeze the collections; raises PolicyError."""
        _code("partner", self.partner)
        set_ = object.__setattr__  # frozen: normalising copies is the only mutation
        set_(self, "status", _enum(PartnerStatus, "status", self.status))
        set_(self, "clearances", _levels("clearances", self.clearances))
        set_(
            self, "origination_ceilings", _levels("origination_ceilings", self.origination_ceilings)
        )
        groups = frozenset(self.groups)
        for g in sorted(groups):
            _code("groups", g)
        set_(self, "groups", groups)
        cats: dict[str, frozenset[str]] = {}
        for name, values in self.categories.items():
            if name != COMPARTMENT and not _CODE.fullmatch(name):
                raise PolicyError(f"bad categories: name {name!r} is not [A-Z][A-Z0-9-]{{1,23}}")
            cats[name] = frozenset(values)
            if not cats[name]:
                raise PolicyError(f"bad categories: {name} grants no values")
            for v in sorted(cats[name]):
                _code(f"categories[{name}]", v)
        set_(self, "categories", MappingProxyType(cats))
        for attr in ("publish_topics", "subscribe_topics"):
            patterns = tuple(getattr(self, attr))
            for p in patterns:
                try:
                    validate_pattern(p)
                except TopicError as e:
                    raise PolicyError(f"bad {attr}: {e}") from None
            if len(set(patterns)) != len(patterns):
                raise PolicyError(f"bad {attr}: a pattern is listed twice")
            set_(self, attr, patterns)
        rate = self.publish_rate_per_s
        if type(rate) is not int or not 0 <= rate <= _UINT32_MAX:
            raise PolicyError(f"bad publish_rate_per_s: {rate!r}, expected 0 to {_UINT32_MAX}")


def _code(what: str, value: object) -> None:
    if not isinstance(value, str) or not _CODE.fullmatch(value):
        raise PolicyError(f"bad {what}: {value!r} is not a code [A-Z][A-Z0-9-]{{1,23}}")


_E = TypeVar("_E", bound=enum.IntEnum)


def _enum(kind: type[_E], what: str, value: object) -> _E:
    if isinstance(value, int) and value in {int(m) for m in kind}:
        return kind(value)
    names = ", ".join(m.name for m in kind)
    raise PolicyError(f"bad {what}: {value!r}, expected one of {names}")


def _levels(what: str, levels: Mapping[str, Classification]) -> Mapping[str, Classification]:
    out: dict[str, Classification] = {}
    for policy, level in levels.items():
        _code(f"{what} policy", policy)
        out[policy] = _enum(Classification, f"{what}[{policy}]", level)
    return MappingProxyType(out)


class Reason(enum.StrEnum):
    """Why a decision was made; ALLOW or exactly one named denial."""

    ALLOW = "allow"
    NOT_ADMITTED = "not_admitted"
    SUSPENDED = "suspended"
    NO_CLEARANCE_FOR_POLICY = "no_clearance_for_policy"
    ABOVE_CLEARANCE = "above_clearance"
    NOT_RELEASABLE = "not_releasable"
    MISSING_CATEGORY = "missing_category"
    NO_PERMISSIVE_MATCH = "no_permissive_match"
    TOPIC_NOT_PERMITTED = "topic_not_permitted"
    EXPIRED = "expired"
    ABOVE_ORIGINATION_CEILING = "above_origination_ceiling"


@dataclass(frozen=True)
class Decision:
    """A reason and a sentence a person understands."""

    reason: Reason
    explanation: str

    @property
    def allowed(self) -> bool:
        """True only for Reason.ALLOW."""
        return self.reason is Reason.ALLOW


# Each check returns a denial or None; the first denial in table order wins.
_Check = Callable[[PartnerPolicy, Label, str, int], Decision | None]


def _status(p: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision | None:
    if p.status is PartnerStatus.PENDING:
        return Decision(Reason.NOT_ADMITTED, f"{p.partner} is not yet admitted by operators")
    if p.status is PartnerStatus.SUSPENDED:
        return Decision(Reason.SUSPENDED, f"{p.partner} is suspended")
    return None


def _expired(p: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision | None:
    if label.expiry_time_ms and now_ms >= label.expiry_time_ms:
        return Decision(Reason.EXPIRED, f"the label expired at {label.expiry_time_ms} ms")
    return None


def _topic_check(attr: str, verb: str) -> _Check:
    def check(p: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision | None:
        patterns: tuple[str, ...] = getattr(p, attr)
        try:
            if any_match(patterns, topic):
                return None
        except TopicError:
            return Decision(Reason.TOPIC_NOT_PERMITTED, f"topic {topic!r} is not a valid topic")
        return Decision(Reason.TOPIC_NOT_PERMITTED, f"{p.partner} may not {verb} {topic!r}")

    return check


def _level_check(attr: str, what: str, missing: Reason, above: Reason) -> _Check:
    def check(p: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision | None:
        held: Mapping[str, Classification] = getattr(p, attr)
        level = held.get(label.policy)
        if level is None:
            return Decision(missing, f"{p.partner} has no {what} for policy {label.policy}")
        if label.classification > level:
            return Decision(
                above,
                f"{p.partner}'s {what} is {label.policy} {level.words}; "
                f"the label is {label.policy} {label.classification.words}",
            )
        return None

    return check


def releases_to_anyone(label: Label) -> bool:
    """Whether the label's REL TO names anyone: without one it is released to no one."""
    return bool(label.releasable_to)


def released_to(label: Label, partner: str, groups: AbstractSet[str]) -> bool:
    """Whether the label's REL TO names the partner or one of its groups (the one rule)."""
    rel = label.releasable_to
    return rel is not None and (partner in rel or not groups.isdisjoint(rel))


def _releasable(p: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision | None:
    if released_to(label, p.partner, p.groups):
        return None
    rel = label.releasable_to
    if rel is None:
        return Decision(
            Reason.NOT_RELEASABLE, "the label has no REL TO, so it is released to no one"
        )
    groups = ", ".join(sorted(p.groups)) or "none"
    return Decision(
        Reason.NOT_RELEASABLE,
        f"REL TO {', '.join(rel)} admits neither {p.partner} nor its groups ({groups})",
    )


def _restrictive(p: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision | None:
    for cat in label.categories:
        if cat.type is CategoryType.RESTRICTIVE:
            missing = [v for v in cat.values if v not in p.categories.get(cat.name, frozenset())]
            if missing:
                return Decision(
                    Reason.MISSING_CATEGORY,
                    f"{p.partner} lacks {cat.name} {', '.join(missing)} (all values are required)",
                )
    return None


def _permissive(p: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision | None:
    for cat in label.categories:
        # REL TO is permissive too, but it is matched against partner and groups above.
        if cat.type is CategoryType.PERMISSIVE and cat.name != REL_TO:
            if p.categories.get(cat.name, frozenset()).isdisjoint(cat.values):
                return Decision(
                    Reason.NO_PERMISSIVE_MATCH,
                    f"{p.partner} holds none of {cat.name} {', '.join(cat.values)}",
                )
    return None


_DELIVERY: tuple[_Check, ...] = (
    _status,
    _expired,
    _topic_check("subscribe_topics", "subscribe to"),
    _level_check("clearances", "clearance", Reason.NO_CLEARANCE_FOR_POLICY, Reason.ABOVE_CLEARANCE),
    _releasable,
    _restrictive,
    _permissive,
)
_ORIGINATION: tuple[_Check, ...] = (
    _status,
    _topic_check("publish_topics", "publish to"),
    # No ceiling for the policy is reported as NO_CLEARANCE_FOR_POLICY: Reason has no
    # separate member and the contract fixes the enum.
    _level_check(
        "origination_ceilings",
        "origination ceiling",
        Reason.NO_CLEARANCE_FOR_POLICY,
        Reason.ABOVE_ORIGINATION_CEILING,
    ),
)


def _run(
    checks: Iterable[_Check], p: PartnerPolicy, label: Label, topic: str, now: int
) -> Decision:
    for check in checks:
        denied = check(p, label, topic, now)
        if denied is not None:
            return denied
    return Decision(Reason.ALLOW, f"{label.human()} on {topic!r} is allowed for {p.partner}")


def decide(policy: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision:
    """Whether a message may be delivered to this partner now; never raises."""
    return _run(_DELIVERY, policy, label, topic, now_ms)


def decide_origination(policy: PartnerPolicy, label: Label, topic: str, now_ms: int) -> Decision:
    """Whether this partner may publish the label on the topic; never raises."""
    return _run(_ORIGINATION, policy, label, topic, now_ms)


NO_KEY_BUNDLE = "no_key_bundle"


@dataclass(frozen=True)
class Eligibility:
    """Whether a partner would receive a label on a topic now, with a reason code.

    ``reason`` is a Reason value, or NO_KEY_BUNDLE when policy allows but the partner has
    no encryption key registered (nothing can be sealed for it).
    """

    allowed: bool
    reason: str
    explanation: str


def eligibility(
    policy: PartnerPolicy, label: Label, topic: str, now_ms: int, *, has_keys: bool
) -> Eligibility:
    """The delivery decision plus the key: the one rule for Recipients and WhoReceives."""
    d = decide(policy, label, topic, now_ms)
    if d.allowed and not has_keys:
        return Eligibility(False, NO_KEY_BUNDLE, "no encryption key registered")
    return Eligibility(d.allowed, d.reason.value, d.explanation)


# --- changes -------------------------------------------------------------------


def _rate(n: int) -> str:
    return f"{n}/s" if n else "default"


_Levels = Mapping[str, Classification]


def _level_lines(what: str, old: _Levels, new: _Levels) -> tuple[list[str], list[str]]:
    """(all lines, raising lines) for a clearance-like map."""
    lines: list[str] = []
    raises: list[str] = []
    for policy in sorted(old.keys() | new.keys()):
        a, b = old.get(policy), new.get(policy)
        if a == b:
            continue
        if a is None and b is not None:
            line = f"+{what} {policy}: {b.words}"
        elif b is None and a is not None:
            line = f"-{what} {policy}: {a.words}"
        else:
            assert a is not None and b is not None
            line = f"{what} {policy}: {a.words} -> {b.words}"
        lines.append(line)
        if b is not None and (a is None or b > a):
            raises.append(line)
    return lines, raises


def _set_lines(what: str, old: Iterable[str], new: Iterable[str]) -> tuple[list[str], list[str]]:
    """(all lines, raising lines) for a set where adding grants privilege."""
    a, b = set(old), set(new)
    added = [f"+{what} {v}" for v in sorted(b - a)]
    removed = [f"-{what} {v}" for v in sorted(a - b)]
    return added + removed, added


def _changes(old: PartnerPolicy | None, new: PartnerPolicy) -> tuple[list[str], list[str]]:
    base = old if old is not None else PartnerPolicy(new.partner)
    if base.partner != new.partner:
        raise PolicyError(f"bad change: partner {base.partner} cannot become {new.partner}")
    lines: list[str] = [f"+partner {new.partner}"] if old is None else []
    raises: list[str] = []

    def add(pair: tuple[list[str], list[str]]) -> None:
        lines.extend(pair[0])
        raises.extend(pair[1])

    if base.status != new.status:
        line = f"status: {base.status.name} -> {new.status.name}"
        add(([line], [line] if new.status is PartnerStatus.ACTIVE else []))
    add(_level_lines("clearance", base.clearances, new.clearances))
    add(_level_lines("origination ceiling", base.origination_ceilings, new.origination_ceilings))
    add(_set_lines("group", base.groups, new.groups))
    for name in sorted(base.categories.keys() | new.categories.keys()):
        held = base.categories.get(name, frozenset())
        add(_set_lines(f"category {name}:", held, new.categories.get(name, frozenset())))
    add(_set_lines("publish", base.publish_topics, new.publish_topics))
    add(_set_lines("subscribe", base.subscribe_topics, new.subscribe_topics))
    a, b = base.publish_rate_per_s, new.publish_rate_per_s
    if a != b:
        line = f"publish rate: {_rate(a)} -> {_rate(b)}"
        # 0 means the broker default, which a pure function cannot see: any change to
        # or from it might raise the rate, so it needs approval.
        add(([line], [line] if a == 0 or b == 0 or b > a else []))
    return lines, raises


def privilege_raises(old: PartnerPolicy | None, new: PartnerPolicy) -> list[str]:
    """Diff lines that raise privilege ([] = may apply at once); raises PolicyError."""
    return _changes(old, new)[1]


def policy_diff(old: PartnerPolicy | None, new: PartnerPolicy) -> list[str]:
    """Human-readable change lines, e.g. "+group NATO-PARTNERS"; raises PolicyError."""
    return _changes(old, new)[0]


# --- wire form -----------------------------------------------------------------


def _clearances(levels: Mapping[str, Classification]) -> list[policy_pb2.Clearance]:
    return [
        policy_pb2.Clearance(policy=k, level=label_pb2.Classification.Value(levels[k].name))
        for k in sorted(levels)
    ]


def policy_to_proto(p: PartnerPolicy) -> policy_pb2.PartnerPolicy:
    """Convert to the wire message, sorted so equal policies serialize identically."""
    return policy_pb2.PartnerPolicy(
        partner=p.partner,
        status=directory_pb2.PartnerStatus.Value(p.status.name),
        clearances=_clearances(p.clearances),
        groups=sorted(p.groups),
        categories=[
            policy_pb2.CategoryGrant(name=n, values=sorted(p.categories[n]))
            for n in sorted(p.categories)
        ],
        publish_topics=p.publish_topics,
        subscribe_topics=p.subscribe_topics,
        origination_ceilings=_clearances(p.origination_ceilings),
        publish_rate_per_s=p.publish_rate_per_s,
    )


def _levels_from(what: str, items: Iterable[policy_pb2.Clearance]) -> dict[str, Classification]:
    out: dict[str, Classification] = {}
    for c in items:
        if c.policy in out:
            raise PolicyError(f"bad {what}: policy {c.policy!r} is listed twice")
        out[c.policy] = _enum(Classification, f"{what}[{c.policy}]", c.level)
    return out


def policy_from_proto(m: policy_pb2.PartnerPolicy) -> PartnerPolicy:
    """Convert and validate a wire policy; raises PolicyError naming the bad field."""
    categories: dict[str, frozenset[str]] = {}
    for g in m.categories:
        if g.name in categories:
            raise PolicyError(f"bad categories: {g.name!r} is listed twice")
        if len(set(g.values)) != len(g.values):
            raise PolicyError(f"bad categories[{g.name}]: a value is listed twice")
        categories[g.name] = frozenset(g.values)
    if len(set(m.groups)) != len(m.groups):
        raise PolicyError("bad groups: a group is listed twice")
    return PartnerPolicy(
        partner=m.partner,
        status=_enum(PartnerStatus, "status", m.status),
        clearances=_levels_from("clearances", m.clearances),
        groups=frozenset(m.groups),
        categories=categories,
        publish_topics=tuple(m.publish_topics),
        subscribe_topics=tuple(m.subscribe_topics),
        origination_ceilings=_levels_from("origination_ceilings", m.origination_ceilings),
        publish_rate_per_s=m.publish_rate_per_s,
    )
