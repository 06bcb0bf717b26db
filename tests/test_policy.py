"""Policy decisions, privilege-raising changes and diffs, table-driven."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coalition.labels import Classification, Label, parse_label
from coalition.policy import (
    NO_KEY_BUNDLE,
    Decision,
    PartnerPolicy,
    PartnerStatus,
    PolicyError,
    Reason,
    decide,
    decide_origination,
    eligibility,
    policy_diff,
    policy_from_proto,
    policy_to_proto,
    privilege_raises,
    released_to,
    releases_to_anyone,
)
from coalition.v1 import directory_pb2, label_pb2, policy_pb2

NC, NS, CTS = Classification.CONFIDENTIAL, Classification.SECRET, Classification.TOP_SECRET
NOW = 1_000_000
TOPIC = "intel.ground.kor"

# KOR: active, NATO SECRET, member of NATO-PARTNERS, holds SIGINT and OPS ALPHA/BRAVO.
KOR = PartnerPolicy(
    partner="KOR",
    status=PartnerStatus.ACTIVE,
    clearances={"NATO": NS},
    groups=frozenset({"NATO-PARTNERS"}),
    categories={"SAC": frozenset({"SIGINT"}), "OPS": frozenset({"ALPHA", "BRAVO"})},
    publish_topics=("intel.ground.*",),
    subscribe_topics=("intel.>",),
    origination_ceilings={"NATO": NC},
)


def L(text: str, expiry: int = 0) -> Label:
    """A label from its human form; short so the tables read like tables."""
    return parse_label(text, origination_time_ms=1, expiry_time_ms=expiry)


REL_KOR = "NATO SECRET // REL TO KOR"

DELIVERY = [
    # (case, policy, label, topic, now, expected reason)
    ("allowed", KOR, L(REL_KOR), TOPIC, NOW, Reason.ALLOW),
    ("pending", replace(KOR, status=PartnerStatus.PENDING), L(REL_KOR), TOPIC, NOW,
     Reason.NOT_ADMITTED),
    ("suspended", replace(KOR, status=PartnerStatus.SUSPENDED), L(REL_KOR), TOPIC, NOW,
     Reason.SUSPENDED),
    # status wins over every later rule
    ("suspended and expired", replace(KOR, status=PartnerStatus.SUSPENDED),
     L("NATO TOP SECRET", expiry=NOW), "x", NOW, Reason.SUSPENDED),
    ("expiry exactly now", KOR, L(REL_KOR, expiry=NOW), TOPIC, NOW, Reason.EXPIRED),
    ("expiry one ms later", KOR, L(REL_KOR, expiry=NOW + 1), TOPIC, NOW, Reason.ALLOW),
    ("expiry passed", KOR, L(REL_KOR, expiry=NOW - 1), TOPIC, NOW, Reason.EXPIRED),
    ("no expiry", KOR, L(REL_KOR), TOPIC, 2**62, Reason.ALLOW),
    ("expired beats topic", KOR, L(REL_KOR, expiry=NOW), "ops.x", NOW, Reason.EXPIRED),
    ("topic not subscribed", KOR, L(REL_KOR), "ops.air", NOW, Reason.TOPIC_NOT_PERMITTED),
    ("topic > needs a token", KOR, L(REL_KOR), "intel", NOW, Reason.TOPIC_NOT_PERMITTED),
    ("malformed topic", KOR, L(REL_KOR), "INTEL.x", NOW, Reason.TOPIC_NOT_PERMITTED),
    ("no subscriptions", replace(KOR, subscribe_topics=()), L(REL_KOR), TOPIC, NOW,
     Reason.TOPIC_NOT_PERMITTED),
    ("topic beats clearance", KOR, L("NATO TOP SECRET // REL TO KOR"), "ops.x", NOW,
     Reason.TOPIC_NOT_PERMITTED),
    ("no clearance for policy", KOR, L("EU SECRET // REL TO KOR"), TOPIC, NOW,
     Reason.NO_CLEARANCE_FOR_POLICY),
    ("classification equal to clearance", KOR, L(REL_KOR), TOPIC, NOW, Reason.ALLOW),
    ("classification below clearance", KOR, L("NATO UNCLASSIFIED // REL TO KOR"), TOPIC, NOW,
     Reason.ALLOW),
    ("one above clearance", KOR, L("NATO TOP SECRET // REL TO KOR"), TOPIC, NOW,
     Reason.ABOVE_CLEARANCE),
    ("above clearance beats releasability", KOR, L("NATO TOP SECRET // REL TO USA"), TOPIC, NOW,
     Reason.ABOVE_CLEARANCE),
    ("released by partner code", KOR, L("NATO SECRET // REL TO USA, KOR"), TOPIC, NOW,
     Reason.ALLOW),
    ("released by group", KOR, L("NATO SECRET // REL TO NATO-PARTNERS"), TOPIC, NOW,
     Reason.ALLOW),
    ("not in REL TO", KOR, L("NATO SECRET // REL TO USA, GBR, NATO"), TOPIC, NOW,
     Reason.NOT_RELEASABLE),
    ("group removed", replace(KOR, groups=frozenset()), L("NATO SECRET // REL TO NATO-PARTNERS"),
     TOPIC, NOW, Reason.NOT_RELEASABLE),
    ("no REL TO at all", KOR, L("NATO SECRET"), TOPIC, NOW, Reason.NOT_RELEASABLE),
    ("not releasable beats missing compartment", KOR, L("NATO SECRET // REL TO USA // HUMINT"),
     TOPIC, NOW, Reason.NOT_RELEASABLE),
    ("compartment held", KOR, L("NATO SECRET // REL TO KOR // SIGINT"), TOPIC, NOW, Reason.ALLOW),
    ("restrictive needs every value", KOR, L("NATO SECRET // REL TO KOR // SIGINT, HUMINT"),
     TOPIC, NOW, Reason.MISSING_CATEGORY),
    ("restrictive all values held", KOR,
     L("NATO SECRET // REL TO KOR // RESTRICTIVE OPS: ALPHA, BRAVO"), TOPIC, NOW, Reason.ALLOW),
    ("restrictive category not held", KOR, L("NATO SECRET // REL TO KOR // RESTRICTIVE AIR: AB"),
     TOPIC, NOW, Reason.MISSING_CATEGORY),
    ("permissive one value is enough", KOR,
     L("NATO SECRET // REL TO KOR // PERMISSIVE OPS: ALPHA, CHARLIE"), TOPIC, NOW, Reason.ALLOW),
    ("permissive none held", KOR, L("NATO SECRET // REL TO KOR // PERMISSIVE OPS: CHARLIE"),
     TOPIC, NOW, Reason.NO_PERMISSIVE_MATCH),
    ("permissive category not held", KOR, L("NATO SECRET // REL TO KOR // PERMISSIVE AIR: AB"),
     TOPIC, NOW, Reason.NO_PERMISSIVE_MATCH),
    ("missing restrictive beats permissive", KOR,
     L("NATO SECRET // REL TO KOR // PERMISSIVE AIR: AB // HUMINT"), TOPIC, NOW,
     Reason.MISSING_CATEGORY),
    ("informative ignored", KOR,
     L("NATO SECRET // REL TO KOR // INFORMATIVE HANDLING: EYES ONLY"), TOPIC, NOW, Reason.ALLOW),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "label", "topic", "now", "expected"),
    [row[1:] for row in DELIVERY],
    ids=[row[0] for row in DELIVERY],
)
def test_delivery(
    policy: PartnerPolicy, label: Label, topic: str, now: int, expected: Reason
) -> None:
    decision = decide(policy, label, topic, now)
    assert decision.reason is expected
    assert decision.allowed is (expected is Reason.ALLOW)
    assert decision.explanation


ORIGINATION = [
    ("at ceiling", KOR, L("NATO CONFIDENTIAL // REL TO USA"), "intel.ground.air", Reason.ALLOW),
    ("below ceiling", KOR, L("NATO UNCLASSIFIED"), "intel.ground.air", Reason.ALLOW),
    ("one above ceiling", KOR, L("NATO SECRET // REL TO KOR"), "intel.ground.air",
     Reason.ABOVE_ORIGINATION_CEILING),
    ("no ceiling for policy", KOR, L("EU RESTRICTED"), "intel.ground.air",
     Reason.NO_CLEARANCE_FOR_POLICY),
    ("topic not publishable", KOR, L("NATO UNCLASSIFIED"), "intel.air.kor",
     Reason.TOPIC_NOT_PERMITTED),
    ("subscribe patterns do not grant publish", KOR, L("NATO UNCLASSIFIED"), "intel.x.y",
     Reason.TOPIC_NOT_PERMITTED),
    ("topic beats ceiling", KOR, L("NATO TOP SECRET"), "ops.x", Reason.TOPIC_NOT_PERMITTED),
    ("pending", replace(KOR, status=PartnerStatus.PENDING), L("NATO UNCLASSIFIED"),
     "intel.ground.air", Reason.NOT_ADMITTED),
    ("suspended", replace(KOR, status=PartnerStatus.SUSPENDED), L("NATO UNCLASSIFIED"),
     "intel.ground.air", Reason.SUSPENDED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "label", "topic", "expected"),
    [row[1:] for row in ORIGINATION],
    ids=[row[0] for row in ORIGINATION],
)
def test_origination(policy: PartnerPolicy, label: Label, topic: str, expected: Reason) -> None:
    assert decide_origination(policy, label, topic, NOW).reason is expected


def test_explanations_name_the_cause() -> None:
    above = decide(KOR, L("NATO TOP SECRET // REL TO KOR"), TOPIC, NOW)
    assert above.explanation == "KOR's clearance is NATO SECRET; the label is NATO TOP SECRET"
    missing = decide(KOR, L("NATO SECRET // REL TO KOR // SIGINT, HUMINT"), TOPIC, NOW)
    assert "HUMINT" in missing.explanation and "SIGINT," not in missing.explanation
    rel = decide(KOR, L("NATO SECRET // REL TO USA"), TOPIC, NOW)
    assert "REL TO USA" in rel.explanation and "NATO-PARTNERS" in rel.explanation
    assert Decision(Reason.ALLOW, "").allowed and not Decision(Reason.EXPIRED, "").allowed


# --- privilege_raises and policy_diff --------------------------------------------------

CHANGES = [
    # (case, old, new, raising lines, all diff lines)
    ("no change", KOR, KOR, [], []),
    ("raise clearance", KOR, replace(KOR, clearances={"NATO": CTS}),
     ["clearance NATO: SECRET -> TOP SECRET"], ["clearance NATO: SECRET -> TOP SECRET"]),
    ("lower clearance", KOR, replace(KOR, clearances={"NATO": NC}),
     [], ["clearance NATO: SECRET -> CONFIDENTIAL"]),
    ("new policy clearance", KOR, replace(KOR, clearances={"NATO": NS, "EU": NC}),
     ["+clearance EU: CONFIDENTIAL"], ["+clearance EU: CONFIDENTIAL"]),
    ("drop clearance", KOR, replace(KOR, clearances={}), [], ["-clearance NATO: SECRET"]),
    ("raise ceiling", KOR, replace(KOR, origination_ceilings={"NATO": NS}),
     ["origination ceiling NATO: CONFIDENTIAL -> SECRET"],
     ["origination ceiling NATO: CONFIDENTIAL -> SECRET"]),
    ("new ceiling", KOR, replace(KOR, origination_ceilings={"NATO": NC, "EU": NC}),
     ["+origination ceiling EU: CONFIDENTIAL"], ["+origination ceiling EU: CONFIDENTIAL"]),
    ("add group", KOR, replace(KOR, groups=frozenset({"NATO-PARTNERS", "FVEY"})),
     ["+group FVEY"], ["+group FVEY"]),
    ("remove group", KOR, replace(KOR, groups=frozenset()), [], ["-group NATO-PARTNERS"]),
    ("grant value", KOR,
     replace(KOR, categories={**KOR.categories, "SAC": frozenset({"SIGINT", "HUMINT"})}),
     ["+category SAC: HUMINT"], ["+category SAC: HUMINT"]),
    ("grant new category", KOR,
     replace(KOR, categories={**KOR.categories, "AIR": frozenset({"AB"})}),
     ["+category AIR: AB"], ["+category AIR: AB"]),
    ("revoke value", KOR, replace(KOR, categories={"SAC": frozenset({"SIGINT"})}),
     [], ["-category OPS: ALPHA", "-category OPS: BRAVO"]),
    ("add publish", KOR, replace(KOR, publish_topics=("intel.ground.*", "ops.>")),
     ["+publish ops.>"], ["+publish ops.>"]),
    ("add subscribe", KOR, replace(KOR, subscribe_topics=("intel.>", "ops.>")),
     ["+subscribe ops.>"], ["+subscribe ops.>"]),
    ("drop subscribe", KOR, replace(KOR, subscribe_topics=()), [], ["-subscribe intel.>"]),
    ("reorder topics is no change", replace(KOR, subscribe_topics=("a", "b")),
     replace(KOR, subscribe_topics=("b", "a")), [], []),
    ("suspend", KOR, replace(KOR, status=PartnerStatus.SUSPENDED), [],
     ["status: ACTIVE -> SUSPENDED"]),
    ("reinstate", replace(KOR, status=PartnerStatus.SUSPENDED), KOR,
     ["status: SUSPENDED -> ACTIVE"], ["status: SUSPENDED -> ACTIVE"]),
    ("admit", replace(KOR, status=PartnerStatus.PENDING), KOR,
     ["status: PENDING -> ACTIVE"], ["status: PENDING -> ACTIVE"]),
    ("pending to suspended", replace(KOR, status=PartnerStatus.PENDING),
     replace(KOR, status=PartnerStatus.SUSPENDED), [], ["status: PENDING -> SUSPENDED"]),
    ("raise rate", replace(KOR, publish_rate_per_s=10), replace(KOR, publish_rate_per_s=11),
     ["publish rate: 10/s -> 11/s"], ["publish rate: 10/s -> 11/s"]),
    ("lower rate", replace(KOR, publish_rate_per_s=10), replace(KOR, publish_rate_per_s=9),
     [], ["publish rate: 10/s -> 9/s"]),
    ("rate back to default counts", replace(KOR, publish_rate_per_s=10), KOR,
     ["publish rate: 10/s -> default"], ["publish rate: 10/s -> default"]),
    ("new empty pending partner", None, PartnerPolicy("UKR"), [], ["+partner UKR"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "raises", "diff"),
    [row[1:] for row in CHANGES],
    ids=[str(row[0]) for row in CHANGES],
)
def test_changes(
    old: PartnerPolicy | None, new: PartnerPolicy, raises: list[str], diff: list[str]
) -> None:
    assert privilege_raises(old, new) == raises
    assert policy_diff(old, new) == diff


def test_new_partner_lists_every_grant() -> None:
    raises = privilege_raises(None, KOR)
    assert raises == [
        "status: PENDING -> ACTIVE",
        "+clearance NATO: SECRET",
        "+origination ceiling NATO: CONFIDENTIAL",
        "+group NATO-PARTNERS",
        "+category OPS: ALPHA",
        "+category OPS: BRAVO",
        "+category SAC: SIGINT",
        "+publish intel.ground.*",
        "+subscribe intel.>",
    ]
    assert policy_diff(None, KOR) == ["+partner KOR", *raises]


def test_mixed_change_lists_only_the_raise() -> None:
    new = replace(KOR, clearances={"NATO": NC}, groups=frozenset({"FVEY"}))
    assert privilege_raises(KOR, new) == ["+group FVEY"]
    assert policy_diff(KOR, new) == [
        "clearance NATO: SECRET -> CONFIDENTIAL",
        "+group FVEY",
        "-group NATO-PARTNERS",
    ]


def test_change_of_partner_is_refused() -> None:
    with pytest.raises(PolicyError, match="KOR cannot become USA"):
        privilege_raises(KOR, replace(KOR, partner="USA"))


# --- construction and wire form ---------------------------------------------------------


def test_policy_is_frozen_and_copies_its_inputs() -> None:
    clearances = {"NATO": NS}
    p = PartnerPolicy("KOR", clearances=clearances)
    clearances["NATO"] = CTS
    assert p.clearances["NATO"] is NS
    with pytest.raises(TypeError):
        p.clearances["NATO"] = CTS  # type: ignore[index]
    assert p.status is PartnerStatus.PENDING


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"partner": "kor"}, "partner"),
        ({"partner": ""}, "partner"),
        ({"status": 0}, "status"),
        ({"clearances": {"NATO": 0}}, "clearances[NATO]"),
        ({"clearances": {"nato": NS}}, "clearances policy"),
        ({"groups": frozenset({"nato partners"})}, "groups"),
        ({"categories": {"OPS": frozenset()}}, "grants no values"),
        ({"categories": {"OPS": frozenset({"a"})}}, "categories[OPS]"),
        ({"categories": {"REL TO": frozenset({"KOR"})}}, "categories"),
        ({"publish_topics": ("intel.>.x",)}, "publish_topics"),
        ({"subscribe_topics": ("Intel",)}, "subscribe_topics"),
        ({"subscribe_topics": ("a", "a")}, "listed twice"),
        ({"origination_ceilings": {"NATO": 6}}, "origination_ceilings[NATO]"),
        ({"publish_rate_per_s": -1}, "publish_rate_per_s"),
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, object], named: str) -> None:
    args: dict[str, object] = {"partner": "KOR"}
    args.update(kwargs)
    with pytest.raises(PolicyError) as caught:
        PartnerPolicy(**args)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    assert named in str(caught.value)


def test_proto_round_trip() -> None:
    msg = policy_to_proto(replace(KOR, publish_rate_per_s=5))
    assert list(msg.groups) == ["NATO-PARTNERS"]
    assert [c.name for c in msg.categories] == ["OPS", "SAC"]  # sorted: stable bytes
    assert list(msg.categories[0].values) == ["ALPHA", "BRAVO"]
    assert msg.clearances[0].level == label_pb2.SECRET
    assert msg.status == directory_pb2.ACTIVE
    back = policy_from_proto(policy_pb2.PartnerPolicy.FromString(msg.SerializeToString()))
    assert back == replace(KOR, publish_rate_per_s=5)
    assert policy_to_proto(back).SerializeToString() == msg.SerializeToString()


def _wire(**changes: object) -> policy_pb2.PartnerPolicy:
    msg = policy_to_proto(KOR)
    for name, value in changes.items():
        msg.ClearField(name)  # type: ignore[arg-type]
        if isinstance(value, list):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    ("msg", "named"),
    [
        (_wire(partner="K"), "partner"),
        (_wire(status=0), "status"),
        (_wire(clearances=[policy_pb2.Clearance(policy="NATO")]), "clearances[NATO]"),
        (
            _wire(clearances=[policy_pb2.Clearance(policy="NATO", level=label_pb2.SECRET)] * 2),
            "listed twice",
        ),
        (_wire(origination_ceilings=[policy_pb2.Clearance(policy="")]), "origination_ceilings"),
        (_wire(groups=["NATO", "NATO"]), "listed twice"),
        (_wire(categories=[policy_pb2.CategoryGrant(name="OPS", values=["AB", "AB"])]), "twice"),
        (_wire(categories=[policy_pb2.CategoryGrant(name="OPS", values=["AB"])] * 2), "twice"),
        (_wire(subscribe_topics=["intel.>.x"]), "subscribe_topics"),
        (_wire(publish_topics=[""]), "publish_topics"),
    ],
)
def test_policy_from_proto_rejects_invalid(msg: policy_pb2.PartnerPolicy, named: str) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_from_proto(msg)
    assert named in str(caught.value)


def test_releasability_is_one_rule() -> None:
    rel = L("NATO SECRET // REL TO KOR, FVEY")
    assert releases_to_anyone(rel) and not releases_to_anyone(L("NATO SECRET"))
    assert released_to(rel, "KOR", frozenset())
    assert released_to(rel, "GBR", frozenset({"FVEY"}))
    assert not released_to(rel, "GBR", frozenset({"NATO"}))
    assert not released_to(L("NATO SECRET"), "KOR", frozenset({"KOR"}))


def test_eligibility_adds_the_key_to_the_delivery_decision() -> None:
    label = L("NATO SECRET // REL TO KOR")
    ok = eligibility(KOR, label, "intel.ground", NOW, has_keys=True)
    assert ok.allowed and ok.reason == Reason.ALLOW.value
    keyless = eligibility(KOR, label, "intel.ground", NOW, has_keys=False)
    assert (keyless.allowed, keyless.reason) == (False, NO_KEY_BUNDLE)
    # A policy denial is reported as such, keys or not.
    denied = eligibility(KOR, L("NATO SECRET // REL TO USA"), "intel.ground", NOW, has_keys=False)
    assert (denied.allowed, denied.reason) == (False, Reason.NOT_RELEASABLE.value)
