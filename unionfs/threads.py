"""Blocking calls in worker threads, for handlers on the trio thread."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def in_worker(function: Callable[..., T], *args: Any) -> T:
    """Run function(*args) in a worker thread and return what it returns
    (or raise what it raised), as trio.to_thread.run_sync does without its
    CapacityLimiter: taking a token passes through trio's scheduler, which
    made the hop cost 80 µs of CPU on a small VM instead of 60 (an fsync in
    `dpkg -i` is one per file). Threads are bounded by the requests pyfuse3
    serves at once. Cancellation, as there: checked before the call, never
    during it (a thread cannot be stopped)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: Any) -> None:  # an outcome.Outcome
        with contextlib.suppress(trio.RunFinishedError):  # trio ended first
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def abort(_: Any) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED  # the thread runs on: wait for it

    trio.lowlevel.start_thread_soon(functools.partial(function, *args), deliver)
    result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    return result
