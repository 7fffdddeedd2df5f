"""The progress line: totals including resumed work, ETA, width, the waiting state, plain lines off a TTY."""

from __future__ import annotations

import asyncio
import io
import time

from harness.engine.core import Stats
from harness.engine.progress import Progress


def _stats(answered: int, failed: int = 0, groups: int | None = None, seconds: float = 10.0) -> Stats:
    s = Stats(answered=answered, failed=failed, groups=answered + failed if groups is None else groups)
    s.started = time.monotonic() - seconds
    return s


def test_line_counts_resumed_work_and_gives_an_eta():
    p = Progress(_stats(100, failed=5), total=1_000, done_before=2_000, stream=io.StringIO())
    line = p.line()
    assert line.startswith("2,105/3,000 (70.2%)")
    assert "ETA 1m25s" in line  # 895 left at 10.5/s
    assert "failed 5" in line and "10/s" in line


def test_line_fits_the_width():
    p = Progress(_stats(100), total=1_000, stream=io.StringIO())
    assert len(p.line(20)) == 20 and p.line(20).endswith("…")
    assert len(p.line(200)) < 200


def test_waiting_for_the_server_when_nothing_comes_back():
    s = _stats(10, groups=74)  # 64 in flight
    p = Progress(s, total=100, stall=0.05, stream=io.StringIO())
    assert "waiting" not in p.line()
    time.sleep(0.08)
    assert p.line().startswith("waiting for the server (nothing back for ")
    s.answered += 1
    assert "waiting" not in p.line()


def test_plain_lines_every_n_seconds_off_a_terminal():
    out = io.StringIO()
    s = _stats(0, groups=0)

    async def main():
        async with Progress(s, total=50, every=0.05, stream=out):
            for _ in range(4):
                s.answered += 5
                s.groups += 5
                await asyncio.sleep(0.03)

    asyncio.run(main())
    lines = out.getvalue().splitlines()
    assert lines and all(x.startswith("progress: ") for x in lines)
    assert "/50 (" in lines[-1]


def test_disabled_progress_writes_nothing():
    out = io.StringIO()

    async def main():
        async with Progress(_stats(1), enabled=False, every=0.01, stream=out):
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert out.getvalue() == ""
