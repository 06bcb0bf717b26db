"""The metrics' label values: fixed sets, so no caller can grow the exposition.

A partner label is a code from the registry (bounded by the operators who admit
partners) or ``unknown``; a reason label is one of the fixed codes below or ``other``.
No message id, topic, certificate name or free text is ever a label value.
"""

from __future__ import annotations

from collections.abc import Callable

from coalition.envelope import Failure
from coalition.envelope_v2 import Failure as FailureV2
from coalition.policy import Reason

UNKNOWN = "unknown"  # a partner the registry does not hold
OTHER = "other"  # a reason code outside the fixed set (a code added later)
NONE = "none"  # the reason of an accepted envelope

RESULTS = ("accepted", "refused")

# Why the publish pipeline refused an envelope (docs/broker.md, Errors).
PUBLISH_REASONS = frozenset(
    {
        "oversized",
        "malformed",
        "bad_label",
        "bad_topic",
        "bad_precedence",
        "clock_skew",
        "sender_mismatch",
        "originator_mismatch",
        "unknown_sender",
        "unknown_signing_key",
        "signing_cert_expired",
        "signing_cert_not_yet_valid",
        "rate_limited",
        "quota_exceeded",
        "store_full",
        "audit_unavailable",
        "replay",
        "sequence_not_increasing",
        "shutting_down",
        "no_hybrid_key",
        "hybrid_key_required",
        *(f.value for f in Failure),
        *(f.value for f in FailureV2),
        *(r.value for r in Reason if r is not Reason.ALLOW),
    }
)

# A delivery decision for one stored message and one subscriber: the policy's reasons
# and the router's own (not subscribed to the topic, no key wrapped, tampered bytes).
DECISION_REASONS = frozenset(
    {*(r.value for r in Reason), "not_subscribed", "no_key_wrapped", "malformed"}
)

# Why the interceptor refused a call before any servicer ran (broker/auth.py).
AUTH_REASONS = frozenset(
    {
        "no_certificate",
        "no_identity",
        "tls_version",
        "key_exchange",
        "cert_expired",
        "cert_revoked",
        "unknown_partner",
        "unknown_operator",
        "not_a_partner",
        "not_an_operator",
        "unknown_service",
        "not_admitted",
        "too_many_connections",
    }
)


def reason(code: str, allowed: frozenset[str]) -> str:
    """code if it is in the fixed set allowed, else ``other``."""
    return code if code in allowed else OTHER


def partner_label(known: Callable[[str], object]) -> Callable[[str], str]:
    """A function mapping a partner code to itself when known(code) holds a record
    (the registry's get), else to ``unknown``."""

    def label(code: str) -> str:
        return code if known(code) is not None else UNKNOWN

    return label
