"""stop_task: a background task is stopped without swallowing the caller's own
cancellation (the pattern it replaced, suppress(CancelledError) around ``await task``,
let a shutdown step's bound pass unnoticed and the step go on)."""

from __future__ import annotations

import asyncio

import pytest

from broker.tasks import stop_task

pytestmark = pytest.mark.asyncio


async def _slow_to_stop(stopped: asyncio.Event) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(0.5)  # cleanup that takes a while (a last write)
        stopped.set()
        raise


async def test_the_callers_bound_is_honoured_while_the_task_is_stopping() -> None:
    stopped = asyncio.Event()
    task = asyncio.create_task(_slow_to_stop(stopped))
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await stop_task(task)
    await asyncio.wait([task])
    assert task.cancelled()


async def test_the_tasks_own_end_is_not_raised() -> None:
    stopped = asyncio.Event()
    task = asyncio.create_task(_slow_to_stop(stopped))
    await asyncio.sleep(0)
    await stop_task(task)
    assert stopped.is_set() and task.cancelled()

    async def failing() -> None:
        raise ValueError("already failed")

    failed = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await stop_task(failed)  # logged, not raised
