"""The store's appends and records alone: committed here, or handed to the deployment's
writer (see writer), and the writer's side: committing what another broker handed it.

A forwarded write is one core NATS request: a JSON line (the write's id, its time, the
name of its records function, its other records, and per message its fields as the
message entry's header holds them, with its envelope's length), then the envelopes back
to back. The answer is JSON: the results (an offset, or the refusal) and the stream
sequence the holder's view had reached; or the error to raise (``full``, ``error``,
``value``); or ``expired`` (the holder did not start it in time: the sender commits it
itself, under the same id). Only a records function the store was given by name
(``portable``) can be forwarded; a write with any other is committed here.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from broker.jetstream import codec
from broker.jetstream.appends import Expired, Planner
from broker.jetstream.committer import Committer
from broker.jetstream.feed import Feed
from broker.jetstream.view import StoreView
from broker.jetstream.writer import Writer
from broker.store.base import (
    AcceptanceRecords,
    Appended,
    NewMessage,
    Rejected,
    StoredMessage,
    StoreError,
    StoreFull,
    stored_message,
)

CATCH_UP_S = 5.0  # the longest a sender waits for its view to read the holder's commit
_NEW_FIELDS = [f.name for f in fields(NewMessage)]
_EXPIRED = b'{"expired":true}'


def _encode(head: Mapping[str, Any], blobs: Sequence[bytes] = ()) -> bytes:
    return b"".join((json.dumps(head, separators=(",", ":")).encode(), b"\n", *blobs))


class Writes:
    """One store's appends and records (see the module docstring)."""

    def __init__(
        self,
        planner: Planner,
        committer: Committer,
        view: StoreView,
        feed: Feed,
        remember: Callable[[StoredMessage], None],
    ) -> None:
        self._planner = planner
        self._committer = committer
        self._view = view
        self._feed = feed
        self._remember = remember
        self.writer: Writer | None = None
        self.portable: dict[str, AcceptanceRecords] = {}

    def _route(self, request: Callable[[str], bytes]) -> tuple[str, str, bytes]:
        """(holder's subject or "", the write's id, the request) for a forwardable write."""
        target = self.writer.target() if self.writer is not None else ""
        if not target:
            return "", "", b""
        job = uuid.uuid4().hex
        body = request(job)
        if len(body) > self._committer.max_payload:
            return "", "", b""  # too large for one request: committed here
        return target, job, body

    async def append(
        self,
        batch: Sequence[NewMessage],
        now_ms: int,
        records: AcceptanceRecords | None,
        extra: Sequence[str],
    ) -> list[Appended | Rejected]:
        name = (
            ""
            if records is None
            else next((n for n, f in self.portable.items() if f is records), None)
        )
        if self.writer is None or name is None:
            result: list[Appended | Rejected] = await self._committer.submit(
                self._planner.append(batch, now_ms, records, extra)
            )
            return result

        def request(job: str) -> bytes:
            metas = [[codec.message_meta(m, now_ms), len(m.envelope)] for m in batch]
            head = {"k": "append", "job": job, "now": now_ms, "rec": name, "also": list(extra)}
            return _encode({**head, "m": metas}, [m.envelope for m in batch])

        target, job, body = self._route(request)
        async with self.writer.lane(bool(target)):
            if target:
                reply = await self.writer.forward(target, body)
                if reply is not None:
                    results = [
                        Appended(r) if isinstance(r, int) else Rejected(r[0], r[1], r[2])
                        for r in await self._answered(reply)
                    ]
                    for m, r in zip(batch, results, strict=True):
                        if isinstance(r, Appended):
                            self._remember(stored_message(m, r.offset, now_ms))
                    return results
            plan = self._planner.append(batch, now_ms, records, extra, job=job)
            result = await self._committer.submit(plan)
            return result

    async def record(self, texts: Sequence[str], now_ms: int) -> None:
        if self.writer is None:
            await self._committer.submit(self._planner.record(texts, now_ms))
            return

        def request(job: str) -> bytes:
            return _encode({"k": "record", "job": job, "now": now_ms, "texts": list(texts)})

        target, job, body = self._route(request)
        async with self.writer.lane(bool(target)):
            if target:
                reply = await self.writer.forward(target, body)
                if reply is not None:
                    await self._answered(reply)
                    return
            await self._committer.submit(self._planner.record(texts, now_ms, job=job))

    async def _answered(self, reply: bytes) -> list[Any]:
        """The results of a forwarded write, once this store's view read its commit;
        raises what the holder's store raised."""
        answer = json.loads(reply)
        error = answer.get("err")
        if error is not None:
            text = str(answer.get("text", "the deployment's writer refused the write"))
            raise {"full": StoreFull, "value": ValueError}.get(error, StoreError)(text)
        with contextlib.suppress(TimeoutError):  # reads catch up later; the write is done
            await self._feed.wait_for(int(answer["last"]), CATCH_UP_S)
        results: list[Any] = answer["r"]
        return results

    async def serve(self, request: bytes, deadline: float) -> bytes:
        """Commit a write another broker forwarded (as this broker's own); its answer.

        Nothing here waits before the write is queued, so writes keep their order."""
        head, _, blob = request.partition(b"\n")
        try:
            req = json.loads(head)
            job, now_ms = str(req["job"]), int(req["now"])
            if req["k"] == "append":
                batch, at = [], 0
                for meta, size in req["m"]:
                    m = codec.message_from(0, {codec.H_MESSAGE: meta}, blob[at : at + size])
                    batch.append(NewMessage(**{f: getattr(m, f) for f in _NEW_FIELDS}))
                    at += size
                records = self.portable[req["rec"]] if req["rec"] else None
                plan = self._planner.append(
                    batch, now_ms, records, req["also"], job=job, deadline=deadline
                )
                results = await self._committer.submit(plan)
                out = [
                    r.offset if isinstance(r, Appended) else [r.reason, r.used, r.limit]
                    for r in results
                ]
            else:
                plan = self._planner.record(req["texts"], now_ms, job=job, deadline=deadline)
                await self._committer.submit(plan)
                out = []
            body: dict[str, Any] = {"r": out, "last": self._view.applied}
        except (Expired, RuntimeError):  # not started in time, or this store is closing
            return _EXPIRED
        except StoreFull as exc:
            body = {"err": "full", "text": str(exc)}
        except StoreError as exc:
            body = {"err": "error", "text": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:
            body = {"err": "value", "text": f"malformed forwarded write: {exc}"}
        return _encode(body)[:-1]
