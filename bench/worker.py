"""Client processes: one per receiving partner, one for both publishers.

They live for the whole run (imports and key loading happen once) and take commands
from the orchestrator over a pipe:

- ``("row", RowSpec)``: connect to the row's server; answer ``"ready"``;
- ``("phase", Phase, start, stop)`` (publisher only): send messages ``[start, stop)`` of
  the workload; answer ``("sent", accepted, refused)`` once every send was accepted;
- ``("end",)``: close the row; answer ``("records", {message_id: time_ns})`` (send
  time, scheduled for open-loop phases, or opened-at-recipient time);
- ``("exit",)``: leave.

Receivers count opened envelopes in a shared counter, which the publisher reads for
its closed-loop window and the orchestrator reads to know a phase has drained.
Times are ``time.time_ns()`` (shared by every process on this machine).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from bench.rows import OnOpened, Publisher, RowSpec, make_publisher, make_receiver
from bench.workload import PUBLISHERS, Phase, Sealed, load_workload

CLOSED_BATCH = 64
STALL_S = 5.0
Counters = Sequence["Synchronized[int]"]


async def _recv(conn: Connection) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


# -- receivers -----------------------------------------------------------------------------


def receiver_main(conn: Connection, code: str, counter: Synchronized[int]) -> None:
    try:
        asyncio.run(_receiver(conn, code, counter))
    except Exception:
        conn.send(("error", traceback.format_exc()))


async def _receiver(conn: Connection, code: str, counter: Synchronized[int]) -> None:
    while True:
        cmd = await _recv(conn)
        if cmd[0] == "exit":
            return
        spec: RowSpec = cmd[1]
        opened: dict[str, int] = {}
        receiver = make_receiver(spec, code)
        await receiver.start(_recorder(opened, counter))
        conn.send("ready")
        cmd = await _recv(conn)
        assert cmd[0] == "end", cmd
        await receiver.stop()
        conn.send(("records", opened))


def _recorder(opened: dict[str, int], counter: Synchronized[int]) -> OnOpened:
    def on_opened(message_id: str) -> None:
        opened[message_id] = time.time_ns()
        counter.value += 1

    return on_opened


# -- publishers ----------------------------------------------------------------------------


def publisher_main(conn: Connection, workload: Path, counters: Counters) -> None:
    try:
        asyncio.run(_publisher(conn, load_workload(workload), counters))
    except Exception:
        conn.send(("error", traceback.format_exc()))


async def _publisher(conn: Connection, messages: list[Sealed], counters: Counters) -> None:
    while True:
        cmd = await _recv(conn)
        if cmd[0] == "exit":
            return
        spec: RowSpec = cmd[1]
        pubs = {s: make_publisher(spec, s) for s in PUBLISHERS}
        for p in pubs.values():
            await p.connect()
        conn.send("ready")
        driver = Driver(pubs, counters)
        while True:
            cmd = await _recv(conn)
            if cmd[0] == "end":
                break
            phase: Phase = cmd[1]
            batch = messages[cmd[2] : cmd[3]]
            if phase.kind == "closed":
                await driver.closed(batch, phase.window, phase.max_s)
            else:
                await driver.open_loop(batch, phase.rate)
            conn.send(("sent", driver.accepted, driver.refused))
        for p in pubs.values():
            await p.close()
        conn.send(("records", driver.sent_at, driver.refused))


class Driver:
    """Sends slices of the workload, closed-loop (windowed) or open-loop (paced)."""

    def __init__(self, pubs: dict[str, Publisher], counters: Counters) -> None:
        self.pubs = pubs
        self.counters = counters
        self.sent_at: dict[str, int] = {}
        self.sent = 0
        self.accepted = 0
        self.refused = 0
        # Messages a closed loop gave up waiting for (lost by an at-most-once system).
        self.written_off = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def _delivered(self) -> int:
        """Messages opened by every recipient so far (the slowest recipient's count)."""
        return min(c.value for c in self.counters)

    def _dispatch(self, batch: Sequence[Sealed], stamp: Sequence[int]) -> None:
        for m, t in zip(batch, stamp, strict=True):
            self.sent_at[m.message_id] = t
        self.sent += len(batch)
        for sender, group in itertools.groupby(batch, key=lambda m: m.sender):
            task = asyncio.create_task(self._send(sender, list(group)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, sender: str, batch: list[Sealed]) -> None:
        n = await self.pubs[sender].send(batch)
        self.accepted += n
        self.refused += len(batch) - n

    async def _settle(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def closed(self, messages: Sequence[Sealed], window: int, max_s: float = 0.0) -> None:
        """As fast as possible with at most ``window`` messages not yet opened by all.

        Stops sending after ``max_s`` seconds if that is set.
        """
        i = 0
        stalled_since = 0.0
        deadline = time.monotonic() + max_s if max_s else float("inf")
        while i < len(messages) and time.monotonic() < deadline:
            outstanding = self.sent - self.refused - self.written_off - self._delivered()
            room = window - outstanding
            if room <= 0:
                now_s = time.monotonic()
                stalled_since = stalled_since or now_s
                if now_s - stalled_since > STALL_S:
                    self.written_off += outstanding  # nothing moved: presume them lost
                await asyncio.sleep(0.0005)
                continue
            stalled_since = 0.0
            chunk = list(messages[i : i + min(room, CLOSED_BATCH)])
            i += len(chunk)
            now = time.time_ns()
            by_sender = sorted(chunk, key=lambda m: m.sender)
            self._dispatch(by_sender, [now] * len(by_sender))
            await asyncio.sleep(0)
        await self._settle()

    async def open_loop(self, messages: Sequence[Sealed], rate: int) -> None:
        """Send message j at t0 + j/rate whatever happens; its latency starts then."""
        interval = 1_000_000_000 / rate
        t0 = time.time_ns() + 5_000_000
        i = 0
        while i < len(messages):
            now = time.time_ns()
            due_until = min(len(messages), int((now - t0) / interval) + 1)
            if due_until <= i:
                await asyncio.sleep((t0 + i * interval - now) / 1e9)
                continue
            chunk = list(messages[i:due_until])
            stamps = [t0 + int(j * interval) for j in range(i, due_until)]
            i = due_until
            order = sorted(range(len(chunk)), key=lambda j: chunk[j].sender)
            self._dispatch([chunk[j] for j in order], [stamps[j] for j in order])
        await self._settle()
