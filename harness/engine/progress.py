"""Progress of a run from the engine's stats: a few redraws a second from a ticker, never per request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time

from harness.engine.core import Stats


class Progress:
    def __init__(self, stats: Stats, enabled: bool = True):
        self.stats = stats
        self.enabled = enabled and (sys.stderr.isatty() or bool(os.environ.get("HARNESS_PROGRESS")))
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Progress:
        if not self.enabled:
            return self
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}"),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
        self.bar.start()
        self.tid = self.bar.add_task("questions", total=None, info="")
        self._task = asyncio.create_task(self._tick())
        return self

    def _update(self) -> None:
        s = self.stats
        dt = max(1e-6, time.monotonic() - s.started)
        done = s.answered + s.failed
        info = (f"{done / dt:,.0f}/s  ok {s.answered:,}  failed {s.failed:,}  retried {s.retried:,}  "
                f"cached {s.cached:,}  items {s.items:,}" + (f"  ${s.cost:,.2f}" if s.cost else ""))
        self.bar.update(self.tid, completed=done, info=info)

    async def _tick(self) -> None:
        while True:
            self._update()
            await asyncio.sleep(0.25)

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._update()
            self.bar.stop()
