"""The daemon's connection state, kept in the node database for `coalition-node status`.

The daemon writes its state on every change and a heartbeat every few seconds, so the
status command (another process) can tell "connected now" from "was connected at ..."
when the daemon stopped or died.
"""

from __future__ import annotations

import enum
import os

from clients.node.db import get_meta, set_meta, transaction
from clients.node.inbox import Inbox

# A daemon whose heartbeat is older than this is taken for gone (it writes every 10 s).
HEARTBEAT_STALE_MS = 35_000


class State(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # a transient failure: retrying with backoff
    SUSPENDED = "suspended"  # suspended by operators: retrying rarely
    NOT_ADMITTED = "not_admitted"  # not (yet) admitted by operators: retrying rarely
    REFUSED = "refused"  # a permanent refusal: the daemon stopped
    STOPPED = "stopped"


def write_state(
    inbox: Inbox, state: State, detail: str, retry_s: float | None, now_ms: int
) -> None:
    """Record state in one transaction; ``state_since_ms`` changes only with the state."""
    with transaction(inbox.conn) as c:
        if get_meta(c, "state") != state.value:
            set_meta(c, "state_since_ms", str(now_ms))
        set_meta(c, "state", state.value)
        set_meta(c, "state_detail", detail)
        set_meta(c, "retry_s", f"{retry_s:.3f}" if retry_s is not None else "")
        set_meta(c, "retry_at_ms", str(now_ms + int(retry_s * 1000)) if retry_s else "")
        set_meta(c, "daemon_pid", str(os.getpid()))
        set_meta(c, "heartbeat_ms", str(now_ms))


def read_state(inbox: Inbox, now_ms: int) -> dict[str, object]:
    """The daemon's state as recorded, with ``running`` judged from the heartbeat."""

    def num(key: str) -> int | None:
        v = inbox.meta(key)
        return int(float(v)) if v else None

    state = inbox.meta("state") or ""
    beat = num("heartbeat_ms")
    running = (
        state not in ("", State.STOPPED.value, State.REFUSED.value)
        and beat is not None
        and now_ms - beat <= HEARTBEAT_STALE_MS
    )
    retry = inbox.meta("retry_s")
    return {
        "state": state or None,
        "running": running,
        "since_ms": num("state_since_ms"),
        "detail": inbox.meta("state_detail") or "",
        "retry_s": float(retry) if retry else None,
        "retry_at_ms": num("retry_at_ms"),
        "heartbeat_ms": beat,
    }
