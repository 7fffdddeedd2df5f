"""results.jsonl: the append-only store of a run folder (the line format is DESIGN.md section 4;
each task builds its lines). Resume = skip the qids already present; a torn last line (a crash
mid-write) is cut off."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import orjson

from harness.metrics.readers import iter_records


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no trailing newline) off an append-only JSONL file. Returns bytes cut."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # scan back for the last newline
        pos = size
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                f.truncate(cut)
                return size - cut
            pos = start
        f.truncate(0)
        return size


class ResultStore:
    """Append-only results.jsonl, written in small batches (flushed by count or time)."""

    def __init__(self, path: Path, *, flush_every: int = 256, flush_seconds: float = 0.5, fsync: bool = False):
        self.path = path
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.fsync = fsync
        self._buf: list[bytes] = []
        self._last = time.monotonic()
        self._f = None

    def scan(self, *, retry_errors: bool = False) -> set[str]:
        """Repair the tail, then return the qids to skip (with `retry_errors`, not the failed ones)."""
        repair_tail(self.path)
        done: set[str] = set()
        if not self.path.exists():
            return done
        for rec in iter_records(self.path):
            qid = rec.get("qid")
            if qid is None:
                continue
            if retry_errors and rec.get("error") is not None:
                done.discard(qid)  # a later success line (if any) adds it back
                continue
            done.add(qid)
        return done

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("ab")

    def append(self, rec: dict) -> None:
        self._buf.append(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
        if len(self._buf) >= self.flush_every or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._buf and self._f is not None:
            # one write of whole lines: a crash can tear only the last line
            self._f.write(b"".join(self._buf))
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
            self._buf.clear()
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> ResultStore:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with path.open("wb") as f:
        for r in records:
            f.write(orjson.dumps(r) + b"\n")
