"""A bounded streaming request loop for the classification experiments.

The hierarchy Engine is built around its Question type; these experiments need request *groups*: one
image with one request (generation, ImageWikiQA) or with one request per class name (log-likelihood:
a head request on the prefix, then every class, written as one result line). The shape is the same:
a producer walks the groups lazily and blocks on a bounded queue, a fixed number of group workers
take them, images are encoded once per group in a thread pool a few groups ahead, every HTTP request
holds a slot of one global semaphore (`concurrency`), retries back off through the shared
`RetryPolicy`, and a fatal error stops the run cleanly. Memory is flat in the run size; the number of
tasks is bounded by the settings, never by the number of questions.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from harness import __version__
from harness.backends.http import Client, FatalError, RetryableError, RetryPolicy, redact_url
from harness.engine.fanout import encode_or_error, fan_out, with_retries
from harness.engine.images import ImagePayload
from harness.runs.results import ResultStore

_RETRY = RetryPolicy()


class GroupError(RuntimeError):
    """This group cannot be answered (recorded as its error, not retried, the run goes on)."""


@dataclass
class Group:
    """Requests answered together and written as one result line."""

    qid: str
    image: str | None  # image file to encode once for all requests (None: text only)
    n: int  # requests in the group
    data: Any = None  # the task's payload
    head: bool = False  # request 0 must be answered before the others are sent (warms the prefix cache)


class Task(Protocol):
    """What an experiment supplies to the loop."""

    def request(self, group: Group, i: int, image: ImagePayload | None) -> tuple[str, dict]:
        """(path under /v1, JSON body) of request i of the group."""

    def interpret(self, group: Group, i: int, resp: dict, head: Any) -> Any:
        """The answer of request i (raise RetryableError on a malformed reply). `head`: request 0's answer."""

    def record(self, group: Group, answers: list[Any]) -> dict:
        """The result line of a finished group."""

    def error_record(self, group: Group, error: str) -> dict:
        """The result line of a group that failed (resume with --retry-errors asks it again)."""


@dataclass
class Stats:
    groups: int = 0  # groups to do this session
    done: int = 0
    failed: int = 0
    requests: int = 0
    retried: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images_encoded: int = 0
    started: float = field(default_factory=time.monotonic)
    fatal: str | None = None

    def to_json(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "started"}
        d["seconds"] = round(time.monotonic() - self.started, 3)
        return d


class Loop:
    def __init__(self, *, client: Client, store: ResultStore, task: Task, concurrency: int = 64,
                 group_workers: int | None = None, media: str = "base64", max_side: int | None = None,
                 retry: RetryPolicy = _RETRY, throttle=None, prefetch: int = 4, image_workers: int = 4,
                 progress_every: float | None = None):
        self.client, self.store, self.task = client, store, task
        self.concurrency = concurrency
        self.group_workers = group_workers or concurrency
        self.media, self.max_side, self.retry, self.throttle = media, max_side, retry, throttle
        self.prefetch = prefetch
        self.stats = Stats()
        self._pool = ThreadPoolExecutor(max_workers=image_workers, thread_name_prefix="img")
        self._stop = asyncio.Event()
        self._sem = asyncio.Semaphore(concurrency)
        self._progress_every = progress_every

    # ------------------------------------------------------------------ requests
    async def call(self, group: Group, i: int, image: ImagePayload | None, head: Any = None) -> Any:
        path, body = self.task.request(group, i, image)
        data = orjson.dumps(body)

        async def attempt() -> Any:
            if self.throttle is not None:
                async with self.throttle:
                    pass
            async with self._sem:
                self.stats.requests += 1
                resp = await self.client.post(path, data)
            usage = resp.get("usage") or {}
            self.stats.prompt_tokens += usage.get("prompt_tokens", 0) or 0
            self.stats.completion_tokens += usage.get("completion_tokens", 0) or 0
            return self.task.interpret(group, i, resp, head)  # a malformed reply is retried too

        return await with_retries(attempt, self.retry, self._count_retry)

    def _count_retry(self, _e: RetryableError) -> None:
        self.stats.retried += 1

    async def answer_group(self, group: Group, image: ImagePayload | None) -> list[Any]:
        answers: list[Any] = [None] * group.n
        start = 0
        if group.head:
            answers[0] = await self.call(group, 0, image)
            start = 1
        rest = iter(range(start, group.n))
        if group.n - start <= 0:
            return answers
        if group.n - start == 1:
            i = next(rest)
            answers[i] = await self.call(group, i, image, answers[0] if group.head else None)
            return answers

        async def fan() -> None:
            for i in rest:  # shared iterator: each index is taken by exactly one fan task
                if self._stop.is_set():
                    return
                answers[i] = await self.call(group, i, image, answers[0] if group.head else None)

        tasks = [asyncio.create_task(fan()) for _ in range(min(self.concurrency, group.n - start))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return answers

    async def handle(self, group: Group, image) -> None:
        if isinstance(image, Exception):
            self.store.append(self.task.error_record(group, f"image: {type(image).__name__}: {image}"[:300]))
            self.stats.failed += 1
            return
        try:
            answers = await self.answer_group(group, image)
        except RetryableError as e:
            self.store.append(self.task.error_record(group, f"gave up after retries: {e.reason}"))
            self.stats.failed += 1
            return
        except FatalError as e:
            if self.stats.fatal is None:
                self.stats.fatal = str(e)
            self._stop.set()
            return
        except GroupError as e:
            self.store.append(self.task.error_record(group, str(e)[:300]))
            self.stats.failed += 1
            return
        if self._stop.is_set() and any(a is None for a in answers):
            return  # stopped mid-group: nothing written, the group is asked again on resume
        self.store.append(self.task.record(group, answers))
        self.stats.done += 1

    # ------------------------------------------------------------------ pipeline
    async def produce(self, groups: Iterable[Group], put) -> None:
        loop = asyncio.get_running_loop()
        window: deque = deque()
        for g in groups:
            if self._stop.is_set():
                break
            self.stats.groups += 1
            fut = None
            if g.image is not None:
                fut = loop.run_in_executor(self._pool, encode_or_error, g.image, self.media, self.max_side)
                self.stats.images_encoded += 1
            window.append((g, fut))
            if len(window) > self.prefetch:
                await put(window.popleft())
        while window and not self._stop.is_set():
            await put(window.popleft())

    async def _handle_job(self, job) -> None:
        g, fut = job
        await self.handle(g, (await fut) if fut is not None else None)

    def _crash(self, job, e: Exception) -> None:
        g, _ = job
        self.store.append(self.task.error_record(g, f"internal: {type(e).__name__}: {e}"[:300]))
        self.stats.failed += 1

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self._progress_every or 5.0)
            s = self.stats
            dt = max(1e-9, time.monotonic() - s.started)
            print(f"  {s.done + s.failed:,} done ({s.failed:,} failed), {s.requests:,} requests, "
                  f"{s.requests / dt:,.1f} req/s, {s.retried:,} retries", file=sys.stderr, flush=True)

    async def run(self, groups: Iterable[Group]) -> Stats:
        ticker = asyncio.create_task(self._ticker()) if self._progress_every else None
        try:
            await fan_out(lambda put: self.produce(groups, put), self._handle_job, self._crash,
                          workers=self.group_workers, stop=self._stop)
        finally:
            if ticker is not None:
                ticker.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.store.flush()
        return self.stats


async def post_root(client: Client, path: str, body: dict, retry: RetryPolicy = _RETRY) -> dict:
    """POST to a server path outside /v1 (vLLM's /tokenize, /detokenize) with the client's session,
    auth, error classification, and retries."""
    data = orjson.dumps(body)
    attempt = 0
    while True:
        try:
            return await client.post(path, data, root=True)
        except RetryableError as e:
            if attempt >= retry.max_retries:
                raise RetryableError(f"{path}: {e}") from None
            await asyncio.sleep(retry.delay(attempt, e.retry_after))
            attempt += 1


# ---------------------------------------------------------------- run folders

# Settings that do not change any answer already given: a run may be extended with a larger --limit
# (the candidate stream is replayed from its start, so earlier items keep their candidates).
NOT_FINGERPRINT = frozenset({"limit"})


def check_resume(out: Path, settings: dict, force: bool = False) -> None:
    """Refuse to resume a run folder whose answer-changing settings differ."""
    manifest = out / "run.json"
    if not manifest.exists() or force:
        return
    old = orjson.loads(manifest.read_bytes()).get("settings", {})
    for k, v in settings.items():
        if k not in NOT_FINGERPRINT and k in old and old[k] != v:
            raise ValueError(f"{manifest}: this folder holds a run with other settings ({k}: {old[k]!r} -> {v!r}). "
                             "Use another --out, or --force to resume anyway.")


def write_manifest(out: Path, *, kind: str, settings: dict, endpoints: list[str], api_key_env: str | None,
                   transport: dict, status: str, stats: Stats | None = None, started: str | None = None) -> None:
    """run.json: what was run and how (never a key: only the name of the variable holding it)."""
    m = {
        "harness_version": __version__,
        "kind": kind,
        "status": status,
        "started": started,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "endpoints": [redact_url(e) for e in endpoints],
        "api_key_env": api_key_env,
        "settings": settings,
        "transport": transport,
        "python": platform.python_version(),
    }
    if stats is not None:
        m["stats"] = stats.to_json()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "run.json.tmp"
    tmp.write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2))
    os.replace(tmp, out / "run.json")


def read_manifest(run: str | Path) -> dict:
    p = Path(run)
    p = p / "run.json" if p.is_dir() else p.with_name("run.json")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no run.json (is this a `harness classify` run folder?)")
    return orjson.loads(p.read_bytes())


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
