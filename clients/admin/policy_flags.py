"""Policy flags of ``admit`` and ``policy set``: parse them and apply them to a policy (pure)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence

from coalition.labels import Classification
from coalition.policy import PartnerPolicy, PartnerStatus, PolicyError

# Reserved NATO abbreviations: "NS" alone means NATO SECRET (see docs/labels.md).
_ABBREVIATIONS = {
    "NU": ("NATO", Classification.UNCLASSIFIED),
    "NR": ("NATO", Classification.RESTRICTED),
    "NC": ("NATO", Classification.CONFIDENTIAL),
    "NS": ("NATO", Classification.SECRET),
    "CTS": ("NATO", Classification.TOP_SECRET),
}
_LEVEL_NAMES = ", ".join(c.name for c in Classification)

# Destinations of the policy flags, to tell whether any was given.
FLAG_DESTS = (
    "status",
    "clearance",
    "remove_clearance",
    "ceiling",
    "remove_ceiling",
    "group",
    "remove_group",
    "category",
    "remove_category",
    "publish",
    "remove_publish",
    "subscribe",
    "remove_subscribe",
    "rate",
)


class FlagError(ValueError):
    """A policy flag whose value cannot be understood; the message says which and why."""


def parse_level(text: str) -> Classification:
    """A classification from SECRET, secret, TOP_SECRET, "TOP SECRET", top-secret or NS."""
    word = " ".join(text.replace("_", " ").replace("-", " ").upper().split())
    if word in _ABBREVIATIONS:
        return _ABBREVIATIONS[word][1]
    for level in Classification:
        if level.words == word:
            return level
    raise FlagError(f"{text!r} is not a classification ({_LEVEL_NAMES} or NU, NR, NC, NS, CTS)")


def parse_policy_level(text: str) -> tuple[str, Classification]:
    """``NATO=SECRET`` (or a bare NATO abbreviation such as ``NS``) as (policy, level)."""
    if "=" not in text:
        word = text.strip().upper()
        if word in _ABBREVIATIONS:
            return _ABBREVIATIONS[word]
        raise FlagError(f"{text!r}: expected POLICY=LEVEL, e.g. NATO=SECRET (or NS)")
    policy, _, level = text.partition("=")
    return policy.strip().upper(), parse_level(level)


def parse_category(text: str, *, values_required: bool = True) -> tuple[str, list[str]]:
    """``OPS=ALPHA,BRAVO`` as (name, values); without ``=`` only when values are optional."""
    name, sep, rest = text.partition("=")
    values = [v.strip().upper() for v in rest.split(",") if v.strip()]
    if values_required and not values:
        raise FlagError(f"{text!r}: expected NAME=VALUE[,VALUE...], e.g. OPS=ALPHA,BRAVO")
    if sep and not values:
        raise FlagError(f"{text!r}: no values after '='")
    return name.strip().upper(), values


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    """Add the policy flags shared by ``partners admit`` and ``policy set``."""
    g = p.add_argument_group(
        "policy flags", "each changes one part of the policy; repeat a flag to give several values"
    )
    g.add_argument(
        "--status", type=str.upper, choices=[s.name for s in PartnerStatus], help="partner status"
    )
    g.add_argument(
        "--clearance",
        action="append",
        metavar="POLICY=LEVEL",
        help="set the clearance for a label policy, e.g. NATO=SECRET, NATO='TOP SECRET', NS",
    )
    g.add_argument("--remove-clearance", action="append", metavar="POLICY")
    g.add_argument(
        "--ceiling",
        action="append",
        metavar="POLICY=LEVEL",
        help="set the origination ceiling (highest level it may publish), e.g. NATO=CONFIDENTIAL",
    )
    g.add_argument("--remove-ceiling", action="append", metavar="POLICY")
    g.add_argument("--group", action="append", metavar="GROUP", help="add a group, e.g. NATO")
    g.add_argument("--remove-group", action="append", metavar="GROUP")
    g.add_argument(
        "--category",
        action="append",
        metavar="NAME=VALUES",
        help="grant category values, e.g. OPS=ALPHA,BRAVO (compartments: SAC=SIGINT)",
    )
    g.add_argument(
        "--remove-category",
        action="append",
        metavar="NAME[=VALUES]",
        help="withdraw a whole category, or only the values given",
    )
    g.add_argument("--publish", action="append", metavar="PATTERN", help="e.g. 'intel.>'")
    g.add_argument("--remove-publish", action="append", metavar="PATTERN")
    g.add_argument("--subscribe", action="append", metavar="PATTERN", help="e.g. 'intel.*.kor'")
    g.add_argument("--remove-subscribe", action="append", metavar="PATTERN")
    g.add_argument(
        "--rate", type=int, metavar="N", help="messages per second it may publish (0 = default)"
    )


def any_flag(ns: argparse.Namespace) -> bool:
    """True if at least one policy flag was given."""
    return any(getattr(ns, d, None) is not None for d in FLAG_DESTS)


def _levels(
    held: Mapping[str, Classification], add: Sequence[str] | None, remove: Sequence[str] | None
) -> dict[str, Classification]:
    out = dict(held)
    for name in remove or ():
        if out.pop(name.strip().upper(), None) is None:
            raise FlagError(f"there is no {name.strip().upper()} entry to remove")
    for text in add or ():
        policy, level = parse_policy_level(text)
        out[policy] = level
    return out


def _patterns(
    held: Sequence[str], add: Sequence[str] | None, remove: Sequence[str] | None
) -> tuple[str, ...]:
    out = [p for p in held if p not in (remove or ())]
    for pattern in remove or ():
        if pattern not in held:
            raise FlagError(f"pattern {pattern!r} is not in the policy")
    out.extend(p for p in add or () if p not in out)
    return tuple(out)


def _categories(
    held: Mapping[str, frozenset[str]], add: Sequence[str] | None, remove: Sequence[str] | None
) -> dict[str, frozenset[str]]:
    out = {k: set(v) for k, v in held.items()}
    for text in remove or ():
        name, values = parse_category(text, values_required=False)
        if name not in out:
            raise FlagError(f"category {name} is not granted")
        if values:
            out[name] -= set(values)
        else:
            del out[name]
    for text in add or ():
        name, values = parse_category(text)
        out.setdefault(name, set()).update(values)
    return {k: frozenset(v) for k, v in out.items() if v}


def apply_flags(base: PartnerPolicy, ns: argparse.Namespace) -> PartnerPolicy:
    """The policy ``base`` with every given flag applied; raises FlagError."""
    groups = set(base.groups)
    for g in ns.remove_group or ():
        if g.strip().upper() not in groups:
            raise FlagError(f"group {g.strip().upper()} is not in the policy")
        groups.discard(g.strip().upper())
    groups.update(g.strip().upper() for g in ns.group or ())
    try:
        return dataclasses.replace(
            base,
            status=PartnerStatus[ns.status] if ns.status else base.status,
            clearances=_levels(base.clearances, ns.clearance, ns.remove_clearance),
            origination_ceilings=_levels(base.origination_ceilings, ns.ceiling, ns.remove_ceiling),
            groups=frozenset(groups),
            categories=_categories(base.categories, ns.category, ns.remove_category),
            publish_topics=_patterns(base.publish_topics, ns.publish, ns.remove_publish),
            subscribe_topics=_patterns(base.subscribe_topics, ns.subscribe, ns.remove_subscribe),
            publish_rate_per_s=base.publish_rate_per_s if ns.rate is None else ns.rate,
        )
    except PolicyError as exc:
        raise FlagError(str(exc)) from None
