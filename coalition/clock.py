"""The one wall clock: Unix milliseconds. Broker, node, SDK and CLIs all read it here, so a
test that needs another time injects a clock instead of patching several."""

from __future__ import annotations

import time


def wall_clock_ms() -> int:
    """Now, in whole Unix milliseconds (UTC)."""
    return time.time_ns() // 1_000_000
