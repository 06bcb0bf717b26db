"""`coalition-node publish` says why, within what the sender may know (real CLI processes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.server import Broker
from coalition.cli_common import EXIT_REFUSED
from coalition.labels import Classification
from tests.helpers import admit, operator, partner, policy, running_broker
from tests.node_helpers import node, write_config

# USA: eligible. GBR: cleared CONFIDENTIAL only (keys visible to KOR, not eligible for
# SECRET). UKR: admitted, never registered a key bundle. XYZ: no such partner.
LABEL = "NATO SECRET // REL TO GBR, KOR, UKR, USA, XYZ"


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    for code in ("KOR", "USA", "UKR"):
        await admit(pki, b.port, policy(code))
    await admit(pki, b.port, policy("GBR", level=Classification.CONFIDENTIAL))
    for code in ("USA", "GBR"):
        async with partner(pki, code, b.port) as c:
            await c.register_keys()
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def test_publish_names_the_partners_left_out_and_why(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    kor = write_config(tmp_path / "kor.toml", pki, "KOR", broker.port)
    pub = ("publish", "--config", str(kor), "--topic", "intel.ground", "--label")

    text = await node(*pub, LABEL, "-", stdin=b"report")
    assert text.code == 0, text.err
    assert text.out.strip().endswith(
        "sealed for USA; not for GBR (not eligible now), UKR (no key bundle), "
        "XYZ (not a listed partner: not admitted, unknown, or a group)"
    ), text.out  # before: "... to USA", the others silently dropped
    assert "CONFIDENTIAL" not in text.out  # GBR's clearance is not the sender's to know

    as_json = await node(*pub, LABEL, "--json", "-", stdin=b"report")
    assert as_json.code == 0, as_json.err
    res = json.loads(as_json.out)
    assert res["recipients"] == ["USA"]
    assert res["not_sealed_for"] == {
        "GBR": "not eligible now",
        "UKR": "no key bundle",
        "XYZ": "not a listed partner: not admitted, unknown, or a group",
    }

    # Nobody eligible: one line that says, for each partner named, why.
    none = await node(*pub, "NATO SECRET // REL TO GBR, UKR", "-", stdin=b"x")
    assert none.code == EXIT_REFUSED
    assert none.err.strip().endswith(
        "no eligible recipient for NATO SECRET // REL TO GBR, UKR on intel.ground right now: "
        "GBR (not eligible now); UKR (no key bundle)"
    ), none.err  # before: "... right now" and nothing more
    assert len(none.err.strip().splitlines()) == 1
    none_json = await node(*pub, "NATO SECRET // REL TO GBR, UKR", "--json", "-", stdin=b"x")
    assert none_json.code == EXIT_REFUSED
    assert json.loads(none_json.out)["not_sealed_for"] == {
        "GBR": "not eligible now",
        "UKR": "no key bundle",
    }


async def test_publish_refused_by_the_senders_own_policy_says_which_rule(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    kor = write_config(tmp_path / "kor.toml", pki, "KOR", broker.port)
    pub = ("publish", "--config", str(kor), "--label")

    above = await node(
        *pub, "NATO TOP SECRET // REL TO USA", "--topic", "intel.ground", "-", stdin=b"x"
    )
    assert above.code == EXIT_REFUSED
    assert "not published, the broker refused: " in above.err, above.err
    assert "above_origination_ceiling" in above.err and "PERMISSION_DENIED" not in above.err
    assert len(above.err.strip().splitlines()) == 1

    topic = await node(
        *pub, "NATO SECRET // REL TO USA", "--topic", "logistics.fuel", "-", stdin=b"x"
    )
    assert topic.code == EXIT_REFUSED
    assert "not published, the broker refused: " in topic.err
    assert "logistics.fuel" in topic.err, topic.err

    async with operator(pki, "op1", broker.port) as op:
        await op.suspend("KOR", "test: investigating")
    suspended = await node(
        *pub, "NATO SECRET // REL TO USA", "--topic", "intel.ground", "-", stdin=b"x"
    )
    assert suspended.code == EXIT_REFUSED
    assert "suspended" in suspended.err, suspended.err
    assert len(suspended.err.strip().splitlines()) == 1
