"""What a policy change does to a partner, computed with the same decisions the broker
runs (``coalition.policy.decide`` and ``decide_origination``): which labels it gains or
loses the right to receive or to originate, and which topic patterns it gains or loses
for subscribing and publishing.

Labels are drawn from what the coalition's policies can tell apart (``coalition_labels``):
each policy name a clearance or ceiling mentions, at each classification, released to each
partner or group the policies name, bare or with one category value a policy grants. Topics
are the patterns any policy lists (``coalition_topics``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from coalition.labels import REL_TO, Category, CategoryType, Classification, Label
from coalition.policy import (
    Decision,
    PartnerPolicy,
    PartnerStatus,
    decide,
    decide_origination,
)
from coalition.topics import PatternSet

# Any topic: the label questions leave topics aside (they have their own answer).
_ANY = (">",)
_TOPIC = "any"


@dataclass(frozen=True)
class Impact:
    """What one partner gains and loses; each list in the labels' or patterns' order."""

    partner: str
    gains_receive: tuple[str, ...] = ()
    loses_receive: tuple[str, ...] = ()
    gains_originate: tuple[str, ...] = ()
    loses_originate: tuple[str, ...] = ()
    gains_subscribe: tuple[str, ...] = ()
    loses_subscribe: tuple[str, ...] = ()
    gains_publish: tuple[str, ...] = ()
    loses_publish: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when the change grants and withdraws nothing that can be told apart."""
        return not any(getattr(self, f.name) for f in dataclasses.fields(self)[1:])

    def as_dict(self) -> dict[str, object]:
        """The impact as JSON-ready values."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


def coalition_labels(policies: Iterable[PartnerPolicy]) -> list[Label]:
    """The labels the policies can tell apart (see the module docstring), in a fixed order.

    A label without REL TO is released to no one, so every label here has one; a category
    is RESTRICTIVE with one value (for one value, "must hold all" and "must hold one" agree).
    """
    pols = list(policies)
    names = sorted({n for p in pols for n in (*p.clearances, *p.origination_ceilings)})
    audience = sorted({p.partner for p in pols} | {g for p in pols for g in p.groups})
    cats = sorted({(name, v) for p in pols for name, vs in p.categories.items() for v in vs})
    extras: list[tuple[Category, ...]] = [()]
    extras += [(Category(name, CategoryType.RESTRICTIVE, (v,)),) for name, v in cats]
    out = []
    for name in names:
        for level in Classification:
            for who in audience:
                rel = Category(REL_TO, CategoryType.PERMISSIVE, (who,))
                for extra in extras:
                    out.append(Label(name, level, (rel, *extra)))
    return out


def coalition_topics(policies: Iterable[PartnerPolicy]) -> list[str]:
    """Every topic pattern a policy lists, sorted."""
    return sorted({t for p in policies for t in (*p.publish_topics, *p.subscribe_topics)})


def _labels(
    policy: PartnerPolicy | None,
    labels: Sequence[Label],
    attr: str,
    rule: Callable[[PartnerPolicy, Label, str, int], Decision],
) -> set[str]:
    if policy is None:
        return set()
    if attr == "subscribe_topics":
        anywhere = dataclasses.replace(policy, subscribe_topics=_ANY)
    else:
        anywhere = dataclasses.replace(policy, publish_topics=_ANY)
    return {lb.human() for lb in labels if rule(anywhere, lb, _TOPIC, 0).allowed}


def _topics(policy: PartnerPolicy | None, patterns: Sequence[str], attr: str) -> set[str]:
    if policy is None or policy.status is not PartnerStatus.ACTIVE:
        return set()
    held = PatternSet(getattr(policy, attr))
    return {p for p in patterns if held.covers(p)}


def _split(before: set[str], after: set[str], order: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    return (
        tuple(x for x in order if x in after and x not in before),
        tuple(x for x in order if x in before and x not in after),
    )


def policy_impact(
    before: PartnerPolicy | None,
    after: PartnerPolicy,
    labels: Sequence[Label],
    topics: Sequence[str],
) -> Impact:
    """What moving from before (None: not yet admitted) to after grants and withdraws,
    over the given labels and topic patterns."""
    order = [lb.human() for lb in labels]
    rx = _split(
        _labels(before, labels, "subscribe_topics", decide),
        _labels(after, labels, "subscribe_topics", decide),
        order,
    )
    og = _split(
        _labels(before, labels, "publish_topics", decide_origination),
        _labels(after, labels, "publish_topics", decide_origination),
        order,
    )
    sub = _split(
        _topics(before, topics, "subscribe_topics"),
        _topics(after, topics, "subscribe_topics"),
        topics,
    )
    pub = _split(
        _topics(before, topics, "publish_topics"), _topics(after, topics, "publish_topics"), topics
    )
    return Impact(after.partner, *rx, *og, *sub, *pub)


def change_impact(
    before: PartnerPolicy | None, after: PartnerPolicy, coalition: Iterable[PartnerPolicy]
) -> Impact:
    """policy_impact over the labels and topics of the coalition's policies together with
    before and after."""
    pols = [*coalition, after, *([before] if before is not None else [])]
    return policy_impact(before, after, coalition_labels(pols), coalition_topics(pols))
