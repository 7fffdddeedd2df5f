"""The one engine: a bounded queue of work feeds N workers that send requests to a backend.

Every run kind goes through it: hierarchy questions, binary statements, CLIP scoring, classification
candidates and log-likelihood tries. An experiment supplies a :class:`Task` (how a group of requests is
built, read back and written as one result line) and a stream of :class:`Unit` s (groups sharing one
image); the engine does the rest once: image preparation (once per unit, a few units ahead, in a thread
pool), fan-out, one retry loop, answer memo / cache / in-flight sharing, usage and cost, stop on a fatal
error, and the stats the progress display reads.

Memory stays flat with run size: units are produced lazily and block on a bounded queue; there is one
task per worker, never one per question. A unit's groups are enqueued back to back so they reach the
server in the same window and vLLM's prefix cache reuses the image. Each unit carries an affinity key
(its `key`, else its image, else its first question id) that the engine passes to `backend.send`: the
HTTP backend sends all of a unit's requests to one endpoint (and one data-parallel engine).

Two breakers stop a run that cannot progress (stats.unavailable, exit 5, unanswered questions not
recorded): the backend's (no endpoint usable for `--unavailable-after` seconds: UnavailableError) and the
engine's :class:`ErrorBreaker` (nearly every request failing the same way - uniform 500s, malformed
replies, hangs - for a while), which quotes the server's message instead of retrying a million questions.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from harness.backends.base import Backend
from harness.backends.http import FatalError, RetryableError, RetryPolicy, UnavailableError, affinity_hash
from harness.engine.cache import RequestCache
from harness.engine.fanout import Stopped, fan_out, with_retries
from harness.engine.pricing import cost

_DEFAULT_RETRY = RetryPolicy()


class GroupError(RuntimeError):
    """This group cannot be answered (recorded as its error, not retried; the run goes on)."""


@dataclass(slots=True)
class Group:
    """Requests answered together and written as one result line."""

    qid: str
    n: int = 1  # requests in the group
    data: Any = None  # the task's payload
    head: bool = False  # request 0 is answered before the others are sent (warms the prefix cache)


@dataclass(slots=True)
class Unit:
    """Groups that share one image: the image is prepared once for all of them."""

    image: str | None
    groups: list[Group]
    records: list[dict] = field(default_factory=list)  # lines written without asking (auto-filled)
    key: str | None = None  # the item asked about: affinity and `--shard` hash it (default: image, first qid)


class Task(Protocol):
    """What an experiment supplies to the engine. Optional hooks: `cache_key(group, i, image, body)` (a
    request's identity for the memo and the answer cache), `retry_empty(group, answer)` (ask once more),
    `est_tokens(group, i)` (for a tokens-per-minute budget)."""

    def request(self, group: Group, i: int, image: Any) -> tuple[str, Any]:
        """(path under /v1, body) of request i of the group."""
        ...

    def interpret(self, group: Group, i: int, resp: dict, head: Any) -> Any:
        """The answer of request i (raise RetryableError on a malformed reply). `head`: request 0's answer."""
        ...

    def record(self, group: Group, answers: list[Any]) -> dict:
        """The result line of an answered group."""
        ...

    def error_record(self, group: Group, error: str) -> dict:
        """The result line of a group that failed (`retry_errors` asks it again)."""
        ...


@dataclass
class Stats:
    """Counters of one invocation (the progress display and run.json read them)."""

    items: int = 0  # units produced
    groups: int = 0  # groups to ask this invocation
    answered: int = 0
    failed: int = 0
    requests: int = 0
    retried: int = 0
    cached: int = 0
    auto: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    images_encoded: int = 0
    started: float = field(default_factory=time.monotonic)
    fatal: str | None = None
    stopped: str | None = None
    unavailable: str | None = None  # the backend stopped answering (the run stops; a requeue resumes it)

    def to_json(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "started"}
        d["seconds"] = time.monotonic() - self.started
        return d


class ErrorBreaker:
    """Trips when nearly every request fails for a while: at least `min_failures` failures spanning
    `min_seconds` (from the first failed attempt's send), with successes at most `1 - share` of the
    attempts since. 429s (rate limiting: Retry-After waits) and connection errors (a dead server: the
    backend's health breaker and --unavailable-after) are not counted. Costs nothing per success (the
    engine counts them); the check runs on failures only."""

    def __init__(self, min_failures: int = 50, min_seconds: float = 30.0, share: float = 0.95):
        self.min_failures, self.min_seconds, self.share = min_failures, min_seconds, share
        self.start: float | None = None
        self.oks0 = self.fails = 0
        self.reasons: Counter[str] = Counter()

    def failed(self, reason: str, started: float | None, oks: int) -> str | None:
        """Record a failure (`oks`: successes so far); the message when the breaker trips."""
        if reason.startswith(("HTTP 429", "connection error")):
            return None
        now = time.monotonic()
        ok = oks - self.oks0
        if self.start is None or ok > (1 - self.share) * (ok + self.fails) + 1:
            self.start, self.oks0, self.fails, ok = (started or now), oks, 0, 0
            self.reasons.clear()
        self.fails += 1
        self.reasons[reason] += 1
        span = now - self.start
        if self.fails < self.min_failures or span < self.min_seconds:
            return None
        top, n = self.reasons.most_common(1)[0]
        return (f"nearly every request fails: {self.fails:,} of {self.fails + ok:,} attempts in the last "
                f"{span:,.0f} s failed, {n:,} with \"{top}\"")


def _prepare(backend: Backend, path: str, media: str, max_side: int | None) -> Any:
    """An image payload, or the exception (recorded for the unit's groups: the run goes on)."""
    try:
        return backend.prepare_image(path, media, max_side)
    except Exception as e:  # noqa: BLE001
        return e


class Engine:
    def __init__(self, backend: Backend, task: Task, sink: Callable[[dict], None], *, concurrency: int = 64,
                 group_workers: int | None = None, media: str = "base64", max_side: int | None = None,
                 retry: RetryPolicy = _DEFAULT_RETRY, throttle=None, token_limiter=None,
                 cache: RequestCache | None = None, dedupe: bool = False,
                 prices: tuple[float, float] = (0.0, 0.0), max_cost: float | None = None,
                 prefetch: int = 8, image_workers: int = 4, error_breaker: ErrorBreaker | None = None):
        self.backend, self.task, self.sink = backend, task, sink
        self.concurrency = concurrency
        # groups in flight; requests in flight are bounded by `concurrency` (a group may fan out)
        self.group_workers = group_workers or concurrency
        self._sem = asyncio.Semaphore(concurrency) if self.group_workers != concurrency else None
        self.media, self.max_side = media, max_side
        self.retry, self.throttle, self.token_limiter = retry, throttle, token_limiter
        self.cache, self.dedupe, self.prices, self.max_cost = cache, dedupe, prices, max_cost
        self.prefetch = prefetch
        self.stats = Stats()
        self._key = getattr(task, "cache_key", None) if (dedupe or cache is not None) else None
        self._retry_empty = getattr(task, "retry_empty", None)
        self._est = getattr(task, "est_tokens", None)
        self._inflight: dict[str, asyncio.Future | None] = {}  # key -> the waiters' future, if any
        # Bounded LRU of recent answers for dedupe: identical requests sit close together in a file
        # (CUB text mode: at most 116 questions apart), so 64k entries lose no hit while memory stays
        # flat at a million questions; the answer cache covers reuse beyond that.
        self._memo: OrderedDict[str, Any] = OrderedDict()
        self.memo_size = 65_536
        self._pool = ThreadPoolExecutor(max_workers=image_workers, thread_name_prefix="img")
        self._stop = asyncio.Event()
        self.breaker = error_breaker if error_breaker is not None else ErrorBreaker()
        self._oks = 0  # successful attempts (the error breaker's denominator)
        try:  # backends that take an affinity key get each unit's (ClipScorer accepts and ignores it)
            self._keyed = "key" in inspect.signature(backend.send).parameters
        except (TypeError, ValueError):
            self._keyed = False

    def stop(self, reason: str) -> None:
        """Stop cleanly: nothing more is sent; what is answered is written, the rest is asked on resume."""
        if self.stats.stopped is None and self.stats.fatal is None:
            self.stats.stopped = reason
        self._stop.set()

    # ------------------------------------------------------------------ one request
    async def _attempt(self, group: Group, i: int, path: str, body: Any, head: Any, key: int | None) -> Any:
        """One try: send and interpret. A reply the task cannot read is retried like a 503."""
        stats = self.stats
        if self.token_limiter is not None:
            est = self._est(group, i) if self._est is not None else 1
            await self.token_limiter.acquire(min(est, self.token_limiter.max_rate))
        if self.throttle is not None:
            async with self.throttle:
                pass
        stats.requests += 1
        send = self.backend.send
        if self._sem is None:
            resp = await (send(path, body, key=key) if self._keyed else send(path, body))
        else:
            async with self._sem:
                resp = await (send(path, body, key=key) if self._keyed else send(path, body))
        usage = resp.get("usage")
        if usage:
            pt, ct = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
            stats.prompt_tokens += pt
            stats.completion_tokens += ct
            if self.prices[0] or self.prices[1]:
                stats.cost += cost(pt, ct, self.prices)
        ans = self.task.interpret(group, i, resp, head)
        self._oks += 1
        return ans

    def _count_retry(self, e: RetryableError) -> None:
        self.stats.retried += 1
        self._breaker_check(e)

    def _breaker_check(self, e: RetryableError) -> None:
        msg = self.breaker.failed(e.reason, e.started, self._oks)
        if msg is not None:
            raise UnavailableError(msg)

    async def ask(self, group: Group, i: int, image: Any, head: Any = None, akey: int | None = None) -> Any:
        """Request i's answer: from the memo or cache, a request already in flight, or the backend."""
        path, body = self.task.request(group, i, image)
        key = self._key(group, i, image, body) if self._key is not None else None
        if key is not None:
            if key in self._memo:
                self._memo.move_to_end(key)
                self.stats.cached += 1
                return _cached(self._memo[key])
            if self.cache is not None and (hit := self.cache.get(key)) is not None:
                self.stats.cached += 1
                return _cached(hit)
            if key in self._inflight:  # the same request is being asked now: wait for its answer
                fut = self._inflight[key]
                if fut is None:  # the first waiter makes the future (most requests never have one)
                    fut = self._inflight[key] = asyncio.get_running_loop().create_future()
                self.stats.cached += 1
                return _cached(await asyncio.shield(fut))
            self._inflight[key] = None
        try:
            empty_retry = self._retry_empty is not None
            while True:
                t0 = time.monotonic()
                try:
                    ans = await self._attempt(group, i, path, body, head, akey)
                except RetryableError as e:  # the one retry loop takes over from this first failure
                    ans = await with_retries(partial(self._attempt, group, i, path, body, head, akey), self.retry,
                                             self._count_retry, self._stop, failed=e)
                if empty_retry and self._retry_empty(group, ans):  # type: ignore[misc]
                    empty_retry = False  # one more try for an empty completion, then keep it
                    self.stats.retried += 1
                    continue
                break
            if isinstance(ans, dict):
                ans["latency"] = round(time.monotonic() - t0, 4)
            if key is not None:
                if self.dedupe:
                    self._memo[key] = ans
                    if len(self._memo) > self.memo_size:
                        self._memo.popitem(last=False)
                if self.cache is not None:
                    self.cache.put(key, ans)
                if (fut := self._inflight.pop(key, None)) is not None:
                    fut.set_result(ans)
            return ans
        except BaseException as e:
            if key is not None and (fut := self._inflight.pop(key, None)) is not None and not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved
            raise

    # ------------------------------------------------------------------ one group
    async def answer(self, group: Group, image: Any, akey: int | None = None) -> list[Any]:
        """Every answer of a group: request 0 first when it is a head, the rest fanned out."""
        answers: list[Any] = [None] * group.n
        start = 0
        head = None
        if group.head:
            head = answers[0] = await self.ask(group, 0, image, None, akey)
            start = 1
        rest = iter(range(start, group.n))

        async def fan() -> None:
            for i in rest:  # shared iterator: each index is taken by exactly one fan task
                if self._stop.is_set():
                    return
                answers[i] = await self.ask(group, i, image, head, akey)

        tasks = [asyncio.create_task(fan()) for _ in range(min(self.concurrency, group.n - start))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return answers

    def _unavailable(self, why: str) -> None:
        if self.stats.unavailable is None and self.stats.fatal is None:
            self.stats.unavailable = why
        self._stop.set()

    def _fail(self, group: Group, error: str) -> None:
        self.sink(self.task.error_record(group, error[:300]))
        self.stats.failed += 1

    async def handle(self, job: tuple[Group, Any]) -> None:
        group, image, akey = job
        if isinstance(image, Exception):
            self._fail(group, f"image: {type(image).__name__}: {image}")
            return
        try:
            answers = [await self.ask(group, 0, image, None, akey)] if group.n == 1 \
                else await self.answer(group, image, akey)
        except RetryableError as e:
            if self._stop.is_set():
                return  # the run stopped meanwhile: asked again on resume
            try:
                self._breaker_check(e)
            except UnavailableError as u:
                self._unavailable(str(u))
                return
            self._fail(group, f"gave up after retries: {e.reason}")
            return
        except UnavailableError as e:
            self._unavailable(str(e))
            return  # nothing written: the group is asked again when the run is resumed
        except Stopped:
            return
        except GroupError as e:
            self._fail(group, str(e))
            return
        except FatalError as e:
            if self.stats.fatal is None:
                self.stats.fatal = str(e)
            self._stop.set()
            return
        if self._stop.is_set() and any(a is None for a in answers):
            return  # stopped mid-group: nothing written, the group is asked again on resume
        self.sink(self.task.record(group, answers))
        self.stats.answered += 1
        if self.max_cost is not None and self.stats.cost >= self.max_cost:
            self.stop(f"--max-cost {self.max_cost:.2f} USD reached ({self.stats.cost:.2f} USD spent)")

    # ------------------------------------------------------------------ pipeline
    async def produce(self, units: Iterable[Unit], put) -> None:
        loop = asyncio.get_running_loop()
        window: deque = deque()
        stats = self.stats

        keyed = self._keyed

        async def emit(unit: Unit, fut) -> None:
            image = await fut if fut is not None else None
            akey = affinity_hash(unit.key or unit.image or unit.groups[0].qid) if keyed else None
            for g in unit.groups:
                if self._stop.is_set():
                    return
                await put((g, image, akey))

        for unit in units:
            if self._stop.is_set():
                break
            stats.items += 1
            for rec in unit.records:
                self.sink(rec)
            stats.auto += len(unit.records)
            if not unit.groups:
                continue
            stats.groups += len(unit.groups)
            fut = None
            if unit.image is not None:
                fut = loop.run_in_executor(self._pool, _prepare, self.backend, unit.image, self.media, self.max_side)
                stats.images_encoded += 1
            window.append((unit, fut))
            if len(window) > self.prefetch:
                await emit(*window.popleft())
        while window and not self._stop.is_set():
            await emit(*window.popleft())

    def _crash(self, job, e: Exception) -> None:
        self._fail(job[0], f"internal: {type(e).__name__}: {e}")

    async def run(self, units: Iterable[Unit]) -> Stats:
        try:
            await fan_out(lambda put: self.produce(units, put), self.handle, self._crash,
                          workers=self.group_workers, stop=self._stop)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self.cache is not None:
                self.cache.flush()
        return self.stats


def _cached(ans: Any) -> Any:
    return ans | {"cached": True} if isinstance(ans, dict) else ans
