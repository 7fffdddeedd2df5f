"""Progress of a run from the engine's stats, read by a ticker (never per request, so it costs nothing
at thousands of questions a second).

On a terminal: one status line fitted to its width (done/total, percent, rate, ETA, failures, cost).
Elsewhere (batch jobs, logs): a plain line every `every` seconds. Both say "waiting for the server"
when questions are in flight but nothing has come back for `stall` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import TextIO

from harness.engine.core import Stats


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, stats: Stats, enabled: bool = True, *, total: int | None = None, done_before: int = 0,
                 every: float | None = None, stall: float = 20.0, stream: TextIO | None = None):
        self.stats, self.total, self.done_before = stats, total, done_before
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() or bool(os.environ.get("HARNESS_PROGRESS"))
        self.enabled = enabled
        env_every = os.environ.get("HARNESS_PROGRESS_EVERY")
        self.every = every if every is not None else float(env_every) if env_every else 30.0
        self.stall = stall
        self._task: asyncio.Task | None = None
        self._last_n, self._last_change = 0, time.monotonic()

    # ------------------------------------------------------------------ the line
    def line(self, width: int | None = None) -> str:
        """The status as one line (at most `width` characters)."""
        s = self.stats
        now = time.monotonic()
        n = s.answered + s.failed
        if n != self._last_n:
            self._last_n, self._last_change = n, now
        dt = max(1e-6, now - s.started)
        rate = n / dt
        done = self.done_before + n  # auto-filled lines are not questions to ask (not in total)
        parts = []
        if self.total:
            total = self.done_before + self.total
            parts.append(f"{done:,}/{total:,} ({100 * done / max(total, 1):.1f}%)")
            left = self.total - n
            if rate > 0 and left > 0:
                parts.append(f"ETA {_duration(left / rate)}")
        else:
            parts.append(f"{done:,} done")
        parts.append(f"{rate:,.0f}/s")
        if s.failed:
            parts.append(f"failed {s.failed:,}")
        if s.retried:
            parts.append(f"retried {s.retried:,}")
        if s.cost:
            parts.append(f"${s.cost:,.2f}")
        in_flight = s.groups - n
        if in_flight > 0 and now - self._last_change >= self.stall:
            parts.insert(0, f"waiting for the server (nothing back for {_duration(now - self._last_change)})")
        text = "  ".join(parts)
        if width is not None and len(text) > width:
            text = text[: max(0, width - 1)] + "…"
        return text

    # ------------------------------------------------------------------ ticking
    async def __aenter__(self) -> Progress:
        if self.enabled:
            self._task = asyncio.create_task(self._tick_tty() if self.tty else self._tick_plain())
        return self

    async def _tick_tty(self) -> None:
        import shutil

        while True:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + self.line(width).ljust(width))
            self.stream.flush()
            await asyncio.sleep(0.25)

    async def _tick_plain(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            print(f"progress: {self.line()}", file=self.stream, flush=True)

    async def __aexit__(self, *exc) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self.tty:
            import shutil

            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + self.line(width).ljust(width) + "\n")
            self.stream.flush()
