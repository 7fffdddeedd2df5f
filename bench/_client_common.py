"""Shared pieces of the client benchmarks: synthetic items from the shipped CUB file, and an Engine
set up the way `harness run` sets it up (cli.run.spec_from_args -> HierarchyExperiment -> Engine)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Self

import orjson

from harness.backends.http import Client, RetryPolicy
from harness.cli import run as run_cli
from harness.engine.core import Engine
from harness.runs.hierarchy import HierarchyExperiment
from harness.runs.results import ResultStore

ROOT = Path(__file__).resolve().parents[1]
CUB = ROOT / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
MODEL = "stub-model"


def cub_records() -> list[dict]:
    return [orjson.loads(line) for line in CUB.read_bytes().splitlines() if line.strip()]


def write_items(path: Path, n_items: int, images: list[str] | None = None, unique_text: bool = True) -> Path:
    """n_items lines in the reference annotation format (4 levels each), cycling the CUB records.
    Cycles after the first get an `id` so every item id is distinct. unique_text: the label (which the
    text-mode prompt names) gets a serial number, so every question text, and so every request, is
    distinct (CUB has ~29 images per species: text-mode questions would otherwise repeat and
    `harness run`'s text-mode dedupe would answer them without a request). With `images`, item i
    uses images[i % len(images)] instead of the (absent) CUB image path."""
    recs = cub_records()
    with path.open("wb") as f:
        buf = []
        for i in range(n_items):
            rec = dict(recs[i % len(recs)])
            cycle = i // len(recs)
            if images is not None:
                rec["image"] = images[i % len(images)]
            if unique_text:
                rec["label"] = f"{rec['label']} {i + 1}"
            if cycle or images is not None:
                rec["id"] = f"{rec['image']}#{cycle}"
            buf.append(orjson.dumps(rec) + b"\n")
            if len(buf) >= 10_000:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
    return path


def run_args(url: str, data: Path, out: Path, *, mode: str, concurrency: int, extra: list[str] = ()) -> argparse.Namespace:
    """The argparse namespace `harness run` would get."""
    ap = argparse.ArgumentParser()
    run_cli.add_cli(ap.add_subparsers())
    return ap.parse_args(["run", "--endpoint", url, "--model", MODEL, "--data", str(data), "--out", str(out),
                          "--mode", mode, "--taxonomy", "cub", "--concurrency", str(concurrency), "--quiet", *extra])


class HarnessRun:
    """Engine + units as harness.runs.execute builds them (no rate limits, cache or cost cap).
    Use inside a running event loop: `async with HarnessRun(...) as h: stats = await h.run()`."""

    def __init__(self, args: argparse.Namespace, *, dedupe: bool | None = None):
        self.args = args
        self.spec = run_cli.spec_from_args(args)
        self.exp = HierarchyExperiment(self.spec, MODEL)
        self.settings = self.exp.settings
        self.dedupe = self.exp.dedupe if dedupe is None else dedupe
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.results = out / "results.jsonl"
        self.client = Client(args.endpoint, os.environ.get(args.api_key_env) or None, timeout=args.timeout,
                             connections=max(64, args.concurrency * 2))
        self.store = ResultStore(self.results)

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        self.engine = Engine(self.client, self.exp.task, self.store.append, concurrency=self.args.concurrency,
                             media=self.args.media, max_side=self.args.max_side,
                             retry=RetryPolicy(max_retries=self.args.max_retries), prices=self.exp.prices,
                             dedupe=self.dedupe)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.__aexit__(*exc)

    def work(self):
        return self.exp.units(self.store.scan())

    async def run(self):
        work = self.work()
        with self.store:
            return await self.engine.run(work)


def machine() -> dict:
    import psutil
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu_model, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "event_loop": "asyncio (uvloop not installed)" if not _has_uvloop() else "asyncio (uvloop installed, not used here)"}


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
        return True
    except ImportError:
        return False


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header, *rows]
    w = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    line = "| " + " | ".join(str(h).ljust(w[i]) for i, h in enumerate(header)) + " |"
    sep = "|" + "|".join("-" * (w[i] + 2) for i in range(len(header))) + "|"
    body = ["| " + " | ".join(str(r[i]).ljust(w[i]) for i in range(len(header))) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
