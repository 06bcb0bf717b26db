"""The impact preview: which labels and topics a policy change grants or withdraws,
decided by the broker's own policy code."""

from __future__ import annotations

import dataclasses

from coalition.impact import change_impact, coalition_labels, coalition_topics, policy_impact
from coalition.labels import Classification, parse_label
from coalition.policy import PartnerStatus, decide
from tests.helpers import policy

KOR = policy("KOR", topics=("intel.>",))
USA = policy("USA", groups=("NATO", "FVEY"), topics=("intel.>", "ops.*"))


def test_raising_a_clearance_gains_exactly_the_labels_between() -> None:
    after = dataclasses.replace(KOR, clearances={"NATO": Classification.TOP_SECRET})
    imp = change_impact(KOR, after, [KOR, USA])
    assert imp.gains_receive and not imp.loses_receive
    assert all(lb.startswith("NATO TOP SECRET // REL TO") for lb in imp.gains_receive)
    assert "NATO TOP SECRET // REL TO KOR" in imp.gains_receive
    # Released only to USA or FVEY (KOR is in neither): no clearance makes those receivable.
    assert "NATO TOP SECRET // REL TO USA" not in imp.gains_receive
    assert "NATO TOP SECRET // REL TO FVEY" not in imp.gains_receive
    # The ceiling did not move, so origination is unchanged; topics too.
    assert imp.gains_originate == imp.loses_originate == ()
    assert imp.gains_subscribe == imp.loses_subscribe == ()


def test_every_gained_label_is_one_decide_now_allows_and_before_refused() -> None:
    after = dataclasses.replace(
        KOR,
        clearances={"NATO": Classification.TOP_SECRET},
        groups=frozenset({"NATO", "FVEY"}),
        categories={"SAC": frozenset({"ALPHA"})},
    )
    imp = change_impact(KOR, after, [KOR, USA])
    for text in imp.gains_receive:
        lb = parse_label(text)
        assert decide(after, lb, "intel.x", 0).allowed and not decide(KOR, lb, "intel.x", 0).allowed
    assert "NATO SECRET // REL TO FVEY" in imp.gains_receive
    assert "NATO SECRET // REL TO KOR // ALPHA" in imp.gains_receive
    # The reverse change withdraws exactly what this one grants.
    back = change_impact(after, KOR, [KOR, USA])
    assert back.loses_receive == imp.gains_receive and back.gains_receive == ()


def test_suspension_loses_everything_and_admission_gains_it() -> None:
    suspended = dataclasses.replace(USA, status=PartnerStatus.SUSPENDED)
    imp = change_impact(USA, suspended, [KOR, USA])
    assert imp.gains_receive == imp.gains_subscribe == imp.gains_publish == ()
    assert "NATO SECRET // REL TO USA" in imp.loses_receive
    assert imp.loses_subscribe == ("intel.>", "ops.*")
    admitted = change_impact(None, USA, [KOR])
    assert admitted.loses_receive == () and admitted.gains_subscribe == ("intel.>", "ops.*")
    assert "NATO SECRET // REL TO USA" in admitted.gains_originate


def test_topics_are_compared_by_coverage() -> None:
    narrower = dataclasses.replace(USA, subscribe_topics=("intel.*",), publish_topics=("ops.*",))
    pols = [KOR, USA, policy("GBR", topics=("intel.ground",))]
    imp = policy_impact(USA, narrower, coalition_labels(pols), coalition_topics(pols))
    # intel.* still covers intel.ground; intel.> is lost; publish loses both intel ones.
    assert imp.loses_subscribe == ("intel.>", "ops.*")
    assert imp.loses_publish == ("intel.>", "intel.ground")
    assert imp.gains_subscribe == imp.gains_publish == ()
    assert not imp.empty and change_impact(USA, USA, pols).empty


def test_coalition_labels_span_levels_audience_and_categories() -> None:
    cat = policy("KOR", categories={"SAC": frozenset({"ALPHA", "BRAVO"})})
    labels = {lb.human() for lb in coalition_labels([cat, USA])}
    # 1 policy name x 5 levels x 4 audiences (FVEY, KOR, NATO, USA) x (bare + 2 values)
    assert len(labels) == 5 * 4 * 3
    assert "NATO UNCLASSIFIED // REL TO NATO // BRAVO" in labels
    assert coalition_topics([KOR, USA]) == ["intel.>", "ops.*"]
