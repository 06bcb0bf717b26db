"""How many connections one identity keeps busy at once.

grpc Python has no hook for a new connection, so the broker cannot refuse or even see
a connection before a call arrives on it. What it can count is the connections (peers,
one per TCP connection) on which an identity has calls in progress, and refuse a call
that would add one more than the limit. Together with the per-connection stream limit
(``max_streams_per_connection``) this bounds the calls one identity holds in the broker
at once; idle connections are closed after ``max_connection_idle_ms``.
"""

from __future__ import annotations

from collections import Counter


class ConnectionLimit:
    """Peers with live calls, per identity; enter() refuses the (limit + 1)-th peer.

    A limit of 0 counts but never refuses.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._live: dict[str, Counter[str]] = {}

    def enter(self, who: str, peer: str) -> bool:
        """Count a call of who on peer; False (nothing counted) if over the limit."""
        peers = self._live.setdefault(who, Counter())
        if self.limit > 0 and peer not in peers and len(peers) >= self.limit:
            if not peers:
                del self._live[who]
            return False
        peers[peer] += 1
        return True

    def leave(self, who: str, peer: str) -> None:
        """The call counted by enter() has ended."""
        peers = self._live.get(who)
        if peers is None or peer not in peers:
            return
        peers[peer] -= 1
        if peers[peer] <= 0:
            del peers[peer]
            if not peers:
                del self._live[who]

    def busy(self, who: str) -> int:
        """How many connections of who have calls in progress."""
        return len(self._live.get(who, ()))
