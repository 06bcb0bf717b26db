"""How a broker reaches its JetStream cluster: the settings, the connection, and the
names every stream and bucket of one deployment share.

One deployment's streams and buckets all begin with its ``prefix`` (default
``COALITION``), so several deployments (or tests) can share one NATS cluster without
seeing each other's data.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nats
import nats.js.errors
from nats.aio.client import Client

log = logging.getLogger("coalition.broker")
T = TypeVar("T")


@dataclass(frozen=True)
class ClusterSettings:
    """Where the cluster is and how to reach it (the ``[store]`` section of the config)."""

    servers: tuple[str, ...]
    prefix: str = "COALITION"
    replicas: int = 3
    tls_ca: Path | None = None  # CA that signed the NATS servers' certificates
    tls_cert: Path | None = None  # this broker's client certificate, if NATS requires one
    tls_key: Path | None = None
    allow_data_loss: bool = False  # start even if the cluster's durability is weaker

    def name(self, what: str) -> str:
        """A stream's or bucket's name in this deployment, e.g. ``COALITION_MESSAGES``."""
        return f"{self.prefix}_{what}"

    def subject(self, *tokens: str) -> str:
        """A subject in this deployment's namespace, e.g. ``coalition.msg.4.USA``."""
        return ".".join((self.prefix.lower(), *tokens))


def _tls_context(settings: ClusterSettings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert is not None:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


PING_INTERVAL_S = 2  # a silent server is left for another within about two intervals


async def connect(
    settings: ClusterSettings,
    *,
    name: str = "coalition-broker",
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
) -> Client:
    """Connect to the cluster (any listed server; the client follows the cluster's
    membership and reconnects on its own). Raises ``OSError``-like NATS errors with the
    server list in the message when none answers. error_cb, if given, is told of each
    connection error instead of nats-py's own logging."""
    extra = {} if error_cb is None else {"error_cb": error_cb}
    nc: Client = await nats.connect(
        servers=list(settings.servers),
        name=name,
        tls=_tls_context(settings),
        connect_timeout=5,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        allow_reconnect=True,
        # A server that stops answering (SIGSTOP, a hung host) keeps its TCP connection
        # open: unanswered pings are what show it, so ping often (the default is 2 min).
        ping_interval=PING_INTERVAL_S,
        max_outstanding_pings=2,
        **extra,
    )
    return nc


def tls_context(settings: ClusterSettings) -> ssl.SSLContext | None:
    """The TLS context for the cluster's servers (also their monitoring URLs), or None."""
    return _tls_context(settings)


NO_PEERS = 10005  # JetStream's "no suitable peers for placement"
PLACEMENT_S = 30.0  # how long creating a stream waits for the cluster's servers to join


async def placed(call: Callable[[], Awaitable[T]], what: str) -> T:
    """call() (creating a stream or a bucket), again while the cluster answers that it
    has no suitable peers for placement, as it does right after it starts, before every
    server has joined; at most PLACEMENT_S, with one log line. Raises what call raised."""
    deadline = time.monotonic() + PLACEMENT_S
    said = False
    while True:
        try:
            return await call()
        except nats.js.errors.APIError as exc:
            if exc.err_code != NO_PEERS or time.monotonic() > deadline:
                raise
            if not said:
                said = True
                log.warning(
                    "cannot create %s yet: %s (the cluster's servers have not all joined); "
                    "trying again for up to %.0f s",
                    what,
                    exc.description,
                    PLACEMENT_S,
                )
        await asyncio.sleep(0.25)
