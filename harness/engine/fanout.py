"""The streaming core shared by every engine: a bounded queue feeding N worker tasks, retries of one
request, and image encoding that never raises. One task per worker, never one per question, so memory
stays flat with run size (lm-evaluation-harness hangs at ~20k tasks created up front)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from harness.backends.http import RetryableError, RetryPolicy

T = TypeVar("T")
Job = Any


class Stopped(Exception):
    """The run stopped while a request waited to be retried (nothing is written for it)."""


async def fan_out(produce: Callable[[Callable[[Job], Awaitable[None]]], Awaitable[None]],
                  handle: Callable[[Job], Awaitable[None]], on_crash: Callable[[Job, Exception], None], *,
                  workers: int, stop: asyncio.Event) -> None:
    """Run `produce(put)` while `workers` tasks `handle` what it puts (the queue holds 2 per worker,
    so the producer blocks instead of materialising the run). After `stop` is set, queued jobs are
    dropped (they are asked again on resume). A handler's unexpected exception goes to `on_crash`
    and the worker lives on: a dead worker would leave the producer blocked forever."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=workers * 2)

    async def worker() -> None:
        while True:
            job = await queue.get()
            try:
                if job is None:
                    return
                if stop.is_set():
                    continue
                try:
                    await handle(job)
                except Exception as e:  # noqa: BLE001 - recorded by on_crash
                    on_crash(job, e)
            finally:
                queue.task_done()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await produce(queue.put)
        for _ in tasks:
            await queue.put(None)
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def with_retries(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy,
                       on_retry: Callable[[RetryableError], None] | None = None,
                       stop: asyncio.Event | None = None, failed: RetryableError | None = None) -> T:
    """`attempt()` again after each RetryableError (backoff with full jitter, Retry-After honoured),
    at most `policy.max_retries` times; then the last error propagates. `failed`: the error of a first
    try the caller made itself (so a success, the common case, costs no extra coroutine). When `stop`
    is set (the run stops) a waiting retry raises :class:`Stopped` at once instead of being sent."""
    n = 0
    error = failed
    while True:
        if error is None:
            try:
                return await attempt()
            except RetryableError as e:
                error = e
        if n >= policy.max_retries:
            raise error
        if on_retry is not None:
            on_retry(error)
        delay = policy.delay(n, error.retry_after)
        error = None
        if stop is None:
            await asyncio.sleep(delay)
        else:
            if stop.is_set():
                raise Stopped from None
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            if stop.is_set():
                raise Stopped from None
        n += 1
