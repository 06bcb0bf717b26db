"""Shared helpers for integration tests: a real broker on port 0 over mTLS, real clients."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from broker.config import BrokerConfig
from broker.server import Broker, start_broker
from clients.sdk import OperatorClient, PartnerClient
from coalition.labels import Classification
from coalition.pki import load_operator, load_partner
from coalition.policy import PartnerPolicy, PartnerStatus, policy_to_proto

if TYPE_CHECKING:
    from clients.cluster import NatsCluster

PARTNERS = ("KOR", "USA", "GBR", "UKR", "NATO")
# ROGUE holds a valid CA-issued certificate but is never admitted.
ALL_PARTNERS = (*PARTNERS, "ROGUE")
# op3 holds a valid certificate but is not an operator of the broker.
OPERATORS = ("op1", "op2", "op3")


def broker_argv(pki: Path, data: Path, port: int, port_file: Path) -> list[str]:
    """The command line of a real broker process on a fixed loopback port."""
    return [
        sys.executable,
        "-m",
        "broker.cli",
        "serve",
        "--pki",
        str(pki),
        "--data",
        str(data),
        "--listen",
        f"127.0.0.1:{port}",
        "--operators",
        "op1,op2",
        "--port-file",
        str(port_file),
    ]


def jetstream_overrides(cluster: NatsCluster, prefix: str) -> dict[str, object]:
    """Broker config overrides for a deployment with this prefix on cluster."""
    return {
        "store_backend": "jetstream",
        "store_servers": tuple(cluster.urls),
        "store_prefix": prefix,
        "store_monitor": tuple(f"http://127.0.0.1:{n.monitor_port}" for n in cluster.nodes),
    }


async def drop_deployment(cluster: NatsCluster, prefix: str) -> None:
    """Delete every stream and bucket of the deployment prefix (a shared test cluster
    would otherwise carry each test's replicated streams to the end of the session)."""
    from broker.jetstream.connect import ClusterSettings, connect

    nc = await connect(ClusterSettings(servers=tuple(cluster.urls), prefix=prefix))
    try:
        ours = (f"{prefix}_", f"KV_{prefix}_", f"OBJ_{prefix}_")
        reply = await nc.request(
            "$JS.API.STREAM.NAMES", json.dumps({"offset": 0}).encode(), timeout=10
        )
        names = [n for n in json.loads(reply.data).get("streams") or [] if n.startswith(ours)]
        js = nc.jetstream()
        for name in names:
            await js.delete_stream(name)
    finally:
        await nc.close()


def sqlite_only(reason: str) -> Callable[[Any], Any]:
    """Run a backend-parametrised test on SQLite only; reason says why (one line)."""
    assert reason
    return pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def broker_config(pki: Path, data: Path, **kw: object) -> BrokerConfig:
    base = BrokerConfig(
        listen="127.0.0.1:0",
        pki_dir=pki,
        data_dir=data,
        operators=("op1", "op2"),
        audit_checkpoint_every=50,
    )
    return base.with_overrides(**kw)


async def running_broker(pki: Path, data: Path, **kw: object) -> Broker:
    return await start_broker(broker_config(pki, data, **kw))


def policy(
    code: str,
    *,
    level: Classification = Classification.SECRET,
    groups: Iterable[str] = ("NATO",),
    categories: dict[str, frozenset[str]] | None = None,
    topics: tuple[str, ...] = ("intel.>",),
    status: PartnerStatus = PartnerStatus.ACTIVE,
) -> PartnerPolicy:
    return PartnerPolicy(
        partner=code,
        status=status,
        clearances={"NATO": level},
        groups=frozenset(groups),
        categories=categories or {},
        publish_topics=topics,
        subscribe_topics=topics,
        origination_ceilings={"NATO": level},
    )


def operator(pki: Path, name: str, port: int) -> OperatorClient:
    return OperatorClient(load_operator(pki / "operators" / name), f"127.0.0.1:{port}")


def partner(pki: Path, code: str, port: int) -> PartnerClient:
    return PartnerClient(load_partner(pki / "partners" / code), f"127.0.0.1:{port}")


async def admit(pki: Path, port: int, pol: PartnerPolicy) -> None:
    """Admit a partner the proper way: op1 proposes, op2 approves."""
    creds = load_partner(pki / "partners" / pol.partner)
    async with operator(pki, "op1", port) as op1, operator(pki, "op2", port) as op2:
        resp = await op1.admit(pol.partner, creds.signing_cert_der, policy_to_proto(pol), "test")
        assert resp.WhichOneof("result") == "proposal"
        done = await op2.approve(resp.proposal.proposal_id, "approved in test")
        assert done.WhichOneof("result") == "applied"


async def eventually(predicate: object, timeout: float = 5.0) -> None:
    """Wait until predicate() is true (no timing assertion; a bound so a failure ends)."""
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
