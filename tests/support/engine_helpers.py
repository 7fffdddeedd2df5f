"""Helpers of the serving-engine tests: small image item files, an in-process engine run, the CLI
run in-process or as a subprocess, a standalone stub subprocess, and a replica of the stub's fault
schedule (to predict, per question, what the engine must record)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import orjson

from harness.backends.http import Client, RetryPolicy
from harness.engine.core import Engine
from harness.tasks.hierarchy import ChatTask, Decoding, questions, units
from harness.data.items import read_items
from harness.prompts.hierarchy import PromptConfig, Renderer
from harness.runs.results import ResultStore
from tests.support.stub_server import Stub, _h, free_port

REPO = Path(__file__).resolve().parents[2]
CUB_SIMILAR = REPO / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
CUB_RANDOM = REPO / "data" / "hierarchy" / "CUB200_with_random_choice.jsonl"
HARNESS_BIN = Path(sys.executable).with_name("harness")

RETRYABLE_FAULTS = ("429", "500", "503", "drop", "slow", "malformed")


# ------------------------------------------------------------------ data

def cub_lines(n: int, source: Path = CUB_SIMILAR) -> list[dict]:
    out = []
    with source.open("rb") as f:
        for line in f:
            out.append(orjson.loads(line))
            if len(out) == n:
                break
    return out


def make_png(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    im.putpixel((0, 0), (seed % 256, 0, 255))
    im.save(path, format="PNG")


def image_items(tmp_path: Path, n: int, *, size: tuple[int, int] = (40, 30), missing: Iterable[int] = (),
                name: str = "items.jsonl") -> Path:
    """The first n CUB items with their image paths pointing at PNGs generated under tmp_path
    (item k's image is not created when k is in `missing`)."""
    missing = set(missing)
    recs = cub_lines(n)
    with (tmp_path / name).open("wb") as f:
        for k, rec in enumerate(recs):
            img = tmp_path / "img" / f"{k:04d}.png"
            if k not in missing:
                make_png(img, size, k)
            rec["image"] = str(img)
            f.write(orjson.dumps(rec) + b"\n")
    return tmp_path / name


def cub_text_questions(data: Path, *, limit: int | None = None, variant: int = 0, answer: str = "generate"):
    """The questions a `--mode text` run asks (auto-filled leaves left out)."""
    cfg = PromptConfig(taxonomy="cub", mode="text", variant=variant)
    r = Renderer(cfg, answer=answer)
    out = []
    for k, item in enumerate(read_items(data)):
        if limit is not None and k >= limit:
            break
        out.extend(q for q in r.render(item) if q.auto is None)
    return out


# ------------------------------------------------------------------ results

def read_results(path: Path) -> list[dict]:
    """Every line of a results file; fails on a line that does not parse."""
    recs = []
    with Path(path).open("rb") as f:
        for k, line in enumerate(f, 1):
            assert line.endswith(b"\n"), f"{path}:{k}: torn line"
            recs.append(orjson.loads(line))
    return recs


def by_qid(recs: list[dict], *, unique: bool = True) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in recs:
        if unique:
            assert r["qid"] not in out, f"qid {r['qid']} twice"
        out[r["qid"]] = r
    return out


# ------------------------------------------------------------------ the stub's fault schedule

def fault_schedule(stub: Stub, text: str, n: int = 8) -> list[str | None]:
    """The faults the stub injects on attempts 0..n-1 of a text (a replica of Stub.pick_fault)."""
    out: list[str | None] = []
    for k in range(n):
        f = None
        if k < stub.fault_attempts and stub.faults:
            r = (_h(text, f"fault{k}") % 10_000) / 10_000
            acc = 0.0
            for name, p in stub.faults.items():
                acc += p
                if r < acc:
                    f = name
                    break
        out.append(f)
    return out


def expected_outcome(stub: Stub, text: str, max_retries: int, *, slow_times_out: bool = True,
                     attempts: bool = False):
    """What the engine must record for a generate-mode question: ("answer", letter), ("empty", None)
    (empty twice: kept as the model's answer) or ("failed", fault) (retries exhausted); with
    attempts=True, also the number of requests the stub sees for the text.

    Mirrors Engine.ask/_send: retryable faults are retried up to max_retries times per _send call;
    one empty completion is asked again (a fresh _send, so a fresh retry budget), a second is kept."""
    sched = fault_schedule(stub, text, 64)
    k, retries, empty_retry = 0, 0, True
    while True:
        f = sched[k]
        if f == "slow" and not slow_times_out:
            f = None
        if f in RETRYABLE_FAULTS:
            if retries >= max_retries:
                return ("failed", f, k + 1) if attempts else ("failed", f)
            retries += 1
            k += 1
            continue
        if f == "empty":
            if empty_retry:
                empty_retry, retries = False, 0
                k += 1
                continue
            return ("empty", None, k + 1) if attempts else ("empty", None)
        return ("answer", stub.answer(text), k + 1) if attempts else ("answer", stub.answer(text))


# ------------------------------------------------------------------ in-process engine

def run_engine(url: str | list[str], data: Path, out: Path, *, mode: str = "text", answer: str = "generate",
               model: str = "stub-model", concurrency: int = 32, retry: RetryPolicy | None = None,
               timeout: float = 10.0, api_key: str | None = None, dedupe: bool | None = None,
               limit: int | None = None, retry_errors: bool = False, prompt: dict | None = None,
               **engine_kw) -> Engine:
    """Render `data` and run the Engine in a fresh event loop, resuming from out/results.jsonl."""
    cfg = PromptConfig(taxonomy="cub", mode=mode, **(prompt or {}))

    async def main() -> Engine:
        client = Client([url] if isinstance(url, str) else url, api_key, timeout=timeout)
        async with client:
            store = ResultStore(out / "results.jsonl")
            done = store.scan(retry_errors=retry_errors)
            engine = Engine(client, ChatTask(cfg, Decoding(model=model, answer=answer)), store.append,
                            concurrency=concurrency, retry=retry or RetryPolicy(max_retries=8, base=0.005, cap=0.05),
                            dedupe=(mode == "text") if dedupe is None else dedupe, **engine_kw)
            renderer = Renderer(cfg, answer=answer)

            items = islice(read_items(data), limit)
            with store:
                await engine.run(units(questions(items, renderer, done)))
            return engine

    out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(main())


# ------------------------------------------------------------------ the CLI

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`harness ...` in-process: (exit code, stdout, stderr)."""
    import harness.cli

    capsys.readouterr()
    rc = harness.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(COLUMNS="400", PYTHONUNBUFFERED="1")
    env.pop("HARNESS_PROGRESS", None)
    env.update(extra)
    return env


def harness_cmd(*argv) -> list[str]:
    if HARNESS_BIN.exists():
        return [str(HARNESS_BIN), *map(str, argv)]
    return [sys.executable, "-m", "harness.cli", *map(str, argv)]


# ------------------------------------------------------------------ a standalone stub process

def _wait_http(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"stub at {url} did not start")
        time.sleep(0.05)


@contextlib.contextmanager
def stub_process(*, latency: float = 0.0, faults: str = "", api_key: str | None = None):
    """`python -m tests.support.stub_server` in a subprocess; yields its /v1 URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.support.stub_server", "--port", str(port), "--latency", str(latency)]
    if faults:
        cmd += ["--faults", faults]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", time.monotonic() + 20)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def port_is_closed() -> int:
    """A local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
