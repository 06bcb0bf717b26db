"""Refuse a JetStream cluster less durable than the SQLite backend, unless told otherwise.

The SQLite backend acknowledges a publish only after fsync. A JetStream cluster matches
that only when every server fsyncs each write before acknowledging it
(``sync_interval: always``; the default flushes every two minutes, and Jepsen's analysis
of NATS 2.12.1 lost acknowledged writes under it) and every stream and bucket keeps at
least three replicas (a quorum of two survives one lost machine). The broker checks both
when it starts and refuses to serve otherwise, unless the operator passes
``--allow-data-loss`` (``[store] allow_data_loss = true``): then it starts, logs a warning
and audits ``store.durability_weakened`` with each weakness.

Each server's configuration is read from its monitoring endpoint (``/varz``, listed in
``[store] monitor``), not through the NATS system account: that endpoint is read-only and
needs no credentials, whereas a system-account user can see and act on every account of
the cluster, which a broker has no need for. A broker must be able to start while one
machine of the cluster is down (the failure the cluster is there to survive), so servers
that do not answer are named in a warning; the check refuses only if those that answer
are not a majority of the cluster (JetStream's meta group) or if any answers with a
weaker configuration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.js.api import StorageType

from broker.jetstream.connect import ClusterSettings

log = logging.getLogger("coalition.broker")

MIN_REPLICAS = 3
FLAG = "--allow-data-loss (or [store] allow_data_loss = true)"


class DurabilityError(ValueError):
    """The cluster is less durable than required and the operator did not allow it."""


@dataclass(frozen=True)
class ServerReport:
    """What one monitoring URL said: the server's varz, or why it could not be read."""

    url: str
    varz: dict[str, Any] | None
    error: str = ""


def server_weaknesses(reports: Sequence[ServerReport]) -> tuple[list[str], list[str]]:
    """From the servers' varz: (weaknesses, warnings). Pure.

    A weakness is a server that answers without ``sync_interval: always`` or without
    JetStream, or too few servers answering to speak for the cluster; a warning is a
    server that could not be read while a majority could.
    """
    weak: list[str] = []
    warn: list[str] = []
    if not reports:
        weak.append(
            "the servers' durability cannot be checked: [store] monitor lists no "
            "monitoring URL (http://host:8222 of each nats-server)"
        )
        return weak, warn
    names: set[str] = set()
    size = 0
    for r in reports:
        if r.varz is None:
            warn.append(f"{r.url}: {r.error}")
            continue
        name = str(r.varz.get("server_name") or r.varz.get("server_id") or r.url)
        names.add(name)
        js = r.varz.get("jetstream") or {}
        config = js.get("config")
        if not config:
            weak.append(f"nats-server {name} has no JetStream")
            continue
        if config.get("sync_always") is not True:
            every = config.get("sync_interval")
            shown = f"every {every / 1e9:g} s" if isinstance(every, int | float) else "lazily"
            weak.append(
                f"nats-server {name} fsyncs {shown}, not before each acknowledgement "
                "(sync_interval: always)"
            )
        meta = js.get("meta") or {}
        size = max(size, int(meta.get("cluster_size") or 1))
    if names and len(names) < size // 2 + 1:
        weak.append(
            f"only {len(names)} of the cluster's {size} servers could be checked "
            f"({', '.join(sorted(names))}); list each server's monitoring URL in [store] monitor"
        )
    elif not names:
        weak.append("no nats-server answered on the [store] monitor URLs")
    return weak, warn


def replica_weaknesses(settings: ClusterSettings, streams: Sequence[Any]) -> list[str]:
    """The deployment's streams and buckets (nats StreamInfo) kept on fewer than three
    replicas or in memory, and settings asking for fewer. Pure."""
    weak: list[str] = []
    if settings.replicas < MIN_REPLICAS:
        weak.append(
            f"[store] replicas = {settings.replicas}: streams and buckets need at least "
            f"{MIN_REPLICAS} replicas to keep acknowledged writes when a machine is lost"
        )
    ours = (f"{settings.prefix}_", f"KV_{settings.prefix}_", f"OBJ_{settings.prefix}_")
    for info in streams:
        cfg = info.config
        if not str(cfg.name).startswith(ours):
            continue
        if (cfg.num_replicas or 1) < MIN_REPLICAS:
            weak.append(f"stream {cfg.name} has {cfg.num_replicas or 1} replicas")
        if cfg.storage == StorageType.MEMORY:
            weak.append(f"stream {cfg.name} is kept in memory, not on disk")
    return weak


def _read_varz(url: str, tls: ssl.SSLContext | None, timeout: float) -> ServerReport:
    target = url.rstrip("/") + "/varz"
    try:
        ctx = tls if target.startswith("https:") else None
        with urllib.request.urlopen(target, timeout=timeout, context=ctx) as resp:  # noqa: S310
            data = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        return ServerReport(url, None, f"not read ({exc})")
    if not isinstance(data, dict):
        return ServerReport(url, None, "not read (not a varz document)")
    return ServerReport(url, data)


async def read_servers(
    urls: Sequence[str], tls: ssl.SSLContext | None = None, timeout: float = 5.0
) -> list[ServerReport]:
    """Every monitoring URL's varz, read at once."""
    return list(
        await asyncio.gather(*(asyncio.to_thread(_read_varz, u, tls, timeout) for u in urls))
    )


async def check_servers(
    settings: ClusterSettings, monitor: Sequence[str], tls: ssl.SSLContext | None = None
) -> list[str]:
    """Before opening anything: the servers' weaknesses, plus a replica count below 3.

    Raises DurabilityError naming each weakness and the flag unless
    settings.allow_data_loss; returns the weaknesses allowed (empty when durable)."""
    weak, warn = server_weaknesses(await read_servers(monitor, tls))
    for w in warn:
        log.warning("durability check: a nats-server could not be checked: %s", w)
    weak += replica_weaknesses(settings, ())
    return _verdict(settings, weak)


async def check_streams(settings: ClusterSettings, nc: Client) -> list[str]:
    """After the stores opened: their streams' and buckets' replicas and storage.

    Raises DurabilityError unless settings.allow_data_loss; returns what was allowed."""
    js = nc.jetstream()
    infos = [await js.stream_info(name) for name in await _our_streams(settings, nc)]
    weak = replica_weaknesses(settings, infos)
    weak = [w for w in weak if not w.startswith("[store] replicas")]  # said by check_servers
    return _verdict(settings, weak)


async def _our_streams(settings: ClusterSettings, nc: Client) -> list[str]:
    """The names of this deployment's streams (buckets included), paging the stream list."""
    ours = (f"{settings.prefix}_", f"KV_{settings.prefix}_", f"OBJ_{settings.prefix}_")
    names: list[str] = []
    offset = 0
    while True:
        msg = await nc.request(
            "$JS.API.STREAM.NAMES", json.dumps({"offset": offset}).encode(), timeout=10
        )
        page = json.loads(msg.data)
        if "error" in page:
            raise OSError(f"JetStream refused to list streams: {page['error']}")
        got = page.get("streams") or []
        names += [n for n in got if n.startswith(ours)]
        offset += len(got)
        if not got or offset >= int(page.get("total", 0)):
            return names


def _verdict(settings: ClusterSettings, weak: list[str]) -> list[str]:
    if not weak:
        return []
    if not settings.allow_data_loss:
        raise DurabilityError(
            "the JetStream cluster is less durable than required (acknowledged messages "
            f"could be lost): {'; '.join(weak)}. Fix the cluster, or pass {FLAG} to start "
            "anyway"
        )
    for w in weak:
        log.warning("starting with data loss allowed: %s", w)
    return weak
