"""End-to-end invariant, property-based: random policies, labels and partners on a real
broker over mTLS. Each partner receives exactly the messages its policy allowed at
delivery time: nothing more (no leak) and nothing less (no loss)."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.sdk import NoRecipients, PartnerClient
from coalition import envelope_v2
from coalition.labels import COMPARTMENT, REL_TO, Category, CategoryType, Classification, Label
from coalition.policy import PartnerPolicy, PartnerStatus, decide, policy_to_proto
from tests.helpers import admit, now_ms, operator, partner, running_broker

RECEIVERS = ("KOR", "GBR", "UKR", "NATO")
GROUPS = ("NATO", "FVEY", "NATO-PARTNERS")
COMPARTMENTS = ("SIGINT", "HUMINT")
LEVELS = list(Classification)
TOPICS = ("intel.ground", "intel.air")


@st.composite
def receiver_policy(draw: st.DrawFn, code: str) -> PartnerPolicy:
    held = draw(st.frozensets(st.sampled_from(COMPARTMENTS)))
    return PartnerPolicy(
        partner=code,
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": draw(st.sampled_from(LEVELS))},
        groups=draw(st.frozensets(st.sampled_from(GROUPS))),
        categories={COMPARTMENT: held} if held else {},
        publish_topics=("intel.>",),
        subscribe_topics=(draw(st.sampled_from(("intel.>", "intel.ground"))),),
        origination_ceilings={"NATO": Classification.UNCLASSIFIED},
    )


@st.composite
def message_label(draw: st.DrawFn) -> Label:
    rel = draw(
        st.lists(st.sampled_from((*RECEIVERS, *GROUPS)), min_size=1, max_size=3, unique=True)
    )
    cats = [Category(REL_TO, CategoryType.PERMISSIVE, tuple(rel))]
    sac = draw(st.lists(st.sampled_from(COMPARTMENTS), max_size=2, unique=True))
    if sac:
        cats.append(Category(COMPARTMENT, CategoryType.RESTRICTIVE, tuple(sac)))
    return Label("NATO", draw(st.sampled_from(LEVELS)), tuple(cats))


@dataclass(frozen=True)
class Case:
    policies: tuple[PartnerPolicy, ...]
    phase1: tuple[tuple[Label, str], ...]
    change: PartnerPolicy
    phase2: tuple[tuple[Label, str], ...]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    policies = tuple(draw(receiver_policy(c)) for c in RECEIVERS)
    msgs = st.tuples(message_label(), st.sampled_from(TOPICS))
    changed = draw(receiver_policy(draw(st.sampled_from(RECEIVERS))))
    return Case(
        policies,
        tuple(draw(st.lists(msgs, min_size=1, max_size=6))),
        changed,
        tuple(draw(st.lists(msgs, min_size=1, max_size=6))),
    )


async def _receive_until_caught_up(client: PartnerClient, topics: list[str]) -> set[str]:
    """Everything currently deliverable to client, acknowledged."""
    got: set[str] = set()
    sub = client.subscribe(topics)

    async def drain() -> None:
        async for d in sub:
            opened = await client.open(d)
            assert opened.version == 2  # the development PKI certifies hybrid keys
            got.add(opened.header.message_id)
            await sub.ack([d.offset])

    task = asyncio.create_task(drain())
    await asyncio.wait_for(sub.caught_up.wait(), 15)
    await sub.aclose()
    await asyncio.wait_for(task, 5)
    return got


async def _run(pki: Path, case: Case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = await running_broker(pki, Path(tmp))
        try:
            policies = {p.partner: p for p in case.policies}
            await admit(
                pki,
                broker.port,
                PartnerPolicy(
                    partner="USA",
                    status=PartnerStatus.ACTIVE,
                    clearances={"NATO": Classification.TOP_SECRET},
                    groups=frozenset({"NATO"}),
                    publish_topics=("intel.>",),
                    subscribe_topics=("intel.>",),
                    origination_ceilings={"NATO": Classification.TOP_SECRET},
                ),
            )
            for p in case.policies:
                await admit(pki, broker.port, p)
            clients = {c: partner(pki, c, broker.port) for c in ("USA", *RECEIVERS)}
            for c in clients.values():
                await c.register_keys()
            usa = clients["USA"]
            received: dict[str, set[str]] = {c: set() for c in RECEIVERS}
            expected: dict[str, set[str]] = {c: set() for c in RECEIVERS}

            async def phase(msgs: tuple[tuple[Label, str], ...]) -> None:
                for label, topic in msgs:
                    try:
                        sealed = await usa.seal(b"report", topic=topic, label=label)
                    except NoRecipients:
                        sealed = None
                    if sealed is not None:
                        assert envelope_v2.is_v2(sealed.envelope)
                        [res] = await usa.publish([sealed.envelope])
                        assert res.outcome == 1, res
                    for code in RECEIVERS:
                        pol = policies[code]
                        allowed = decide(pol, label, topic, now_ms()).allowed
                        if allowed:
                            assert sealed is not None, f"{code} eligible but nobody was"
                            expected[code].add(sealed.message_id)
                for code in RECEIVERS:
                    topics = list(policies[code].subscribe_topics)
                    received[code] |= await _receive_until_caught_up(clients[code], topics)

            await phase(case.phase1)
            # A run-time policy change (lowering applies at once; raising needs approval).
            async with (
                operator(pki, "op1", broker.port) as op1,
                operator(pki, "op2", broker.port) as op2,
            ):
                if case.change != policies[case.change.partner]:
                    resp = await op1.set_policy(policy_to_proto(case.change), "property test")
                    if resp.WhichOneof("result") == "proposal":
                        await op2.approve(resp.proposal.proposal_id)
                    policies[case.change.partner] = case.change
            await phase(case.phase2)
            for c in clients.values():
                await c.close()
            for code in RECEIVERS:
                leaked = received[code] - expected[code]
                lost = expected[code] - received[code]
                assert not leaked, f"{code} received messages its policy did not allow"
                assert not lost, f"{code} missed messages its policy allowed"
        finally:
            await broker.stop(grace=1)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_inbox_holds_exactly_what_policy_allowed(pki: Path, case: Case) -> None:
    asyncio.run(_run(pki, case))
