"""Federation on the wire: the Federation servicer (a peer's gateway forwarding to us),
the Forward client a link pushes through (us forwarding to a peer), and the wiring of
both into a broker (``attach``). The cores are broker.federation.ingress and .egress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from broker.audit import AuditBackend
from broker.auth import current_identity
from broker.config import BrokerConfig
from broker.errors import BrokerError, Forbidden
from broker.exchange.facade import ExchangeCore
from broker.federation.directory import ForeignDirectory
from broker.federation.egress import Link, LinkDown, Transport
from broker.federation.ingress import Ingress
from broker.federation.state import FederationState
from broker.federation.view import FederationView
from broker.grpc.interceptor import AuthInterceptor
from broker.grpc.status import abort
from broker.registry_types import RegistryChange
from coalition.federation import TrustFile, load_trust_file
from coalition.pki import (
    BrokerCredentials,
    GatewayCredentials,
    PkiError,
    gateway_dir,
    load_gateway,
)
from coalition.policy import PartnerStatus
from coalition.v1 import directory_pb2, federation_pb2, federation_pb2_grpc

log = logging.getLogger("coalition.broker.federation")
Ctx = grpc.aio.ServicerContext[Any, Any]
SERVICE = federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name


class FederationServicer(federation_pb2_grpc.FederationServicer):
    """Forward: each request's envelopes through the ingress core, receipts back in order.
    A gateway suspended while its stream is open is ended at once (``gateway_changed``)."""

    def __init__(self, ingress: Ingress, foreign: ForeignDirectory) -> None:
        self.ingress = ingress
        self.foreign = foreign
        self._calls: dict[str, set[tuple[Ctx, asyncio.Task[Any]]]] = {}

    async def Forward(
        self, request_iterator: AsyncIterator[federation_pb2.ForwardRequest], context: Ctx
    ) -> AsyncIterator[federation_pb2.ForwardResponse]:
        nation = current_identity().name
        task = asyncio.current_task()
        assert task is not None
        me = (context, task)
        self._calls.setdefault(nation, set()).add(me)
        try:
            async for req in request_iterator:
                try:
                    receipts = await self.ingress.receive(nation, req.items)
                except BrokerError as err:
                    await abort(context, err)
                yield federation_pb2.ForwardResponse(batch_id=req.batch_id, receipts=receipts)
        finally:
            self._calls.get(nation, set()).discard(me)

    async def Directory(
        self, request: federation_pb2.FederationDirectoryRequest, context: Ctx
    ) -> federation_pb2.FederationDirectoryResponse:
        return federation_pb2.FederationDirectoryResponse(
            entries=self.foreign.answer(current_identity().name)
        )

    async def gateway_changed(self, nation: str) -> None:
        """The gateway of nation is no longer active: end its open streams now."""
        for ctx, task in list(self._calls.get(nation, ())):
            if not ctx.done():
                err = Forbidden("suspended", f"the gateway of nation {nation} has been suspended")
                with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError):
                    await abort(ctx, err)
            task.cancel()


class GrpcTransport:
    """One Forward stream to a peer's broker, one request in flight at a time."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = federation_pb2_grpc.FederationStub(channel)
        self._out: asyncio.Queue[federation_pb2.ForwardRequest | None] = asyncio.Queue()
        self.call = self.stub.Forward(self._requests())
        self._responses = aiter(self.call)
        self.batch = 0

    async def _requests(self) -> AsyncIterator[federation_pb2.ForwardRequest]:
        while (req := await self._out.get()) is not None:
            yield req

    async def send(
        self, items: Sequence[federation_pb2.ForwardedEnvelope]
    ) -> list[federation_pb2.SignedReceipt]:
        self.batch += 1
        self._out.put_nowait(federation_pb2.ForwardRequest(batch_id=self.batch, items=items))
        try:
            resp = await anext(self._responses)
        except grpc.aio.AioRpcError as exc:
            raise LinkDown(f"{exc.code().name}: {exc.details()}") from exc
        except StopAsyncIteration as exc:
            raise LinkDown("the peer ended the stream") from exc
        if resp.batch_id != self.batch:
            raise LinkDown(f"the peer answered batch {resp.batch_id} for {self.batch}")
        return list(resp.receipts)

    def on_end(self, callback: Callable[[], None]) -> None:
        self.call.add_done_callback(lambda _: callback())

    async def directory(self) -> list[directory_pb2.DirectoryEntry]:
        try:
            resp = await self.stub.Directory(
                federation_pb2.FederationDirectoryRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            raise LinkDown(f"{exc.code().name}: {exc.details()}") from exc
        return list(resp.entries)

    async def close(self) -> None:
        self._out.put_nowait(None)
        self.call.cancel()
        await self.channel.close(None)


@dataclass
class Federation:
    """A broker's federation: its state, its servicer and one link task per peer."""

    state: FederationState
    servicer: FederationServicer
    links: dict[str, Link]
    view: FederationView
    gateway: GatewayCredentials = field(repr=False)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def connect(self, nation: str) -> Transport:
        peer = self.state.trust.peers[nation]
        creds = grpc.ssl_channel_credentials(
            root_certificates=peer.ca_pem,
            private_key=self.gateway.tls_key_pem,
            certificate_chain=self.gateway.tls_cert_pem,
        )
        channel = grpc.aio.secure_channel(peer.endpoint, creds)
        try:
            async with asyncio.timeout(5):
                await channel.channel_ready()
        except TimeoutError as exc:
            await channel.close(None)
            raise LinkDown(f"cannot reach nation {nation}'s broker at {peer.endpoint}") from exc
        return GrpcTransport(channel)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(link.run()) for link in self.links.values()]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def changed(self, change: RegistryChange) -> None:
        """A registry change: wake the peer's link; end a suspended peer's streams."""
        link = self.links.get(change.partner)
        if link is None:
            return
        link.wake.set()
        rec = change.record
        if rec is None or rec.policy.status is not PartnerStatus.ACTIVE:
            task = asyncio.ensure_future(self.servicer.gateway_changed(change.partner))
            self.tasks.append(task)


def load_trust(cfg: BrokerConfig) -> TrustFile | None:
    """The trust file cfg names, or None, once this nation's gateway certificate loads
    too (before the broker opens anything). Raises FederationError, PkiError."""
    if cfg.federation_file is None:
        return None
    trust = load_trust_file(cfg.federation_file)
    _gateway(cfg, trust)
    return trust


def _gateway(cfg: BrokerConfig, trust: TrustFile) -> GatewayCredentials:
    try:
        return load_gateway(gateway_dir(Path(cfg.pki_dir), trust.nation))
    except PkiError as exc:
        raise PkiError(
            f"{exc}: federation needs this nation's gateway certificate "
            f"(coalition-keys issue-gateway {cfg.pki_dir} {trust.nation})"
        ) from exc


async def attach(
    cfg: BrokerConfig,
    trust: TrustFile,
    creds: BrokerCredentials,
    exchange: ExchangeCore,
    audit: AuditBackend,
    server: grpc.aio.Server,
    auth: AuthInterceptor,
) -> Federation:
    """Serve Federation on server, authorize peers' gateways, audit the trust file's
    load, and make (not start) a link per peer. Raises PkiError (no gateway
    certificate in the PKI directory) or ValueError (no audit certificate)."""
    if creds.audit_cert is None:
        raise ValueError("federation needs the broker's audit certificate (broker/audit.crt)")
    from cryptography.hazmat.primitives import serialization

    gateway = _gateway(cfg, trust)
    state = FederationState(
        trust, creds.audit_key, creds.audit_cert.public_bytes(serialization.Encoding.DER)
    )
    auth.authorizer.trust, auth.authorizer.own_ca = trust, creds.ca_cert
    foreign = ForeignDirectory(state, exchange.registry, exchange.clock, exchange.decisions.decided)
    exchange.keys.foreign = foreign
    servicer = FederationServicer(Ingress(cfg, exchange, state, exchange.clock), foreign)
    federation_pb2_grpc.add_FederationServicer_to_server(servicer, server)
    view = FederationView(state, exchange.registry, exchange.store, foreign)
    fed = Federation(state, servicer, {}, view, gateway)
    fed.links = {n: Link(cfg, exchange, state, n, fed.connect, foreign.learn) for n in trust.peers}
    exchange.registry.on_change(fed.changed)
    last = await audit.query(kind="federation.trust_loaded", tail=True, limit=1)
    before = json.loads(last[-1].detail_json) if last else None
    await audit.record(
        kind="federation.trust_loaded",
        actor="broker",
        detail={**trust.summary(), "changed": trust_changes(before, trust.summary())},
        now_ms=exchange.clock(),
    )
    return fed


def root_bundle(creds: BrokerCredentials, trust: TrustFile | None) -> bytes:
    """The CA certificates the TLS server accepts clients from: ours, and each peer's."""
    if trust is None:
        return creds.ca_pem
    return creds.ca_pem + b"".join(p.ca_pem for p in trust.peers.values())


def trust_changes(before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """What a trust file load changed since the last one the audit chain recorded."""
    if before is None:
        return {"first_load": True}
    old, new = before.get("peers", {}), now["peers"]
    return {
        "same_file": before.get("sha256") == now["sha256"],
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": sorted(n for n in set(old) & set(new) if old[n] != new[n]),
    }
