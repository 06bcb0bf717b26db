"""The policy form of the console's partner page: a policy as text fields, and back.

The same notation as ``coalition-admin``'s flags (``NATO=SECRET``, ``OPS=ALPHA,BRAVO``),
parsed by the same functions; the kernel validates the result (``PartnerPolicy``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from clients.admin.policy_flags import parse_category, parse_policy_level
from coalition.policy import PartnerPolicy

FIELDS = ("clearances", "ceilings", "groups", "categories", "publish", "subscribe", "rate")
_SPLIT = re.compile(r"[\s,]+")


def form_values(p: PartnerPolicy) -> dict[str, str]:
    """The form's fields filled in from a policy."""

    def levels(m: Mapping[str, object]) -> str:
        return ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in sorted(m.items()))

    return {
        "clearances": levels(p.clearances),
        "ceilings": levels(p.origination_ceilings),
        "groups": ", ".join(sorted(p.groups)),
        "categories": "; ".join(
            f"{k}={','.join(sorted(v))}" for k, v in sorted(p.categories.items())
        ),
        "publish": " ".join(p.publish_topics),
        "subscribe": " ".join(p.subscribe_topics),
        "rate": str(p.publish_rate_per_s),
    }


def _words(text: str) -> list[str]:
    return [w for w in _SPLIT.split(text.strip()) if w]


def policy_from_form(base: PartnerPolicy, form: Mapping[str, str]) -> PartnerPolicy:
    """base with the form's fields; raises ValueError (FlagError, PolicyError) saying which
    field is wrong and why."""
    clearances = dict(
        parse_policy_level(t) for t in form.get("clearances", "").split(",") if t.strip()
    )
    ceilings = dict(parse_policy_level(t) for t in form.get("ceilings", "").split(",") if t.strip())
    categories = {}
    for part in form.get("categories", "").split(";"):
        if part.strip():
            name, values = parse_category(part)
            categories[name] = frozenset(values)
    rate_text = form.get("rate", "").strip() or "0"
    if not rate_text.isdigit():
        raise ValueError(f"publish rate {rate_text!r} is not a whole number of messages/s")
    return dataclasses.replace(
        base,
        clearances=clearances,
        origination_ceilings=ceilings,
        groups=frozenset(w.upper() for w in _words(form.get("groups", ""))),
        categories=categories,
        publish_topics=tuple(_words(form.get("publish", ""))),
        subscribe_topics=tuple(_words(form.get("subscribe", ""))),
        publish_rate_per_s=int(rate_text),
    )
