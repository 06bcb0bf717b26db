"""A client given a list of brokers (``ipv4:A,B``) reaches the next one when the first
is gone, over mutual TLS checked against the first address's host: how a node keeps
working when one broker of a cluster dies."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.sdk import OperatorClient, PartnerClient
from coalition.pki import load_operator, load_partner
from tests.helpers import admit, policy, running_broker
from tests.test_broker_faults import free_port

pytestmark = pytest.mark.asyncio


async def test_a_broker_list_skips_a_dead_broker(pki: Path, tmp_path: Path) -> None:
    broker = await running_broker(pki, tmp_path / "data")
    try:
        await admit(pki, broker.port, policy("USA"))
        dead = free_port()  # nothing listens here: the "first broker" is down
        target = f"ipv4:127.0.0.1:{dead},127.0.0.1:{broker.port}"
        async with OperatorClient(load_operator(pki / "operators" / "op1"), target) as op:
            assert [p.partner for p in await op.partners()] == ["USA"]
        async with PartnerClient(load_partner(pki / "partners" / "USA"), target) as usa:
            await usa.wait_ready()
            assert "USA" in (await usa.directory(refresh=True)).peers
    finally:
        await broker.stop()
