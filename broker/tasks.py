"""Stopping a background task without swallowing the caller's own cancellation.

``task.cancel()`` then ``await task`` inside ``contextlib.suppress(CancelledError)``
also swallows a cancellation aimed at the caller (a shutdown step's time bound, a test's
teardown), which then goes on past its bound. ``stop_task`` waits with ``asyncio.wait``:
the task's own end is never raised, the caller's cancellation always is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel task and wait until it has ended; raises only the caller's cancellation."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task %s had failed: %r", task.get_name(), exc)
