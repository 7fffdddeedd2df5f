"""The async engine: a bounded queue of questions feeds N workers that talk to the endpoint(s).

Memory stays flat with run size: the producer renders items lazily and blocks on a bounded queue;
there is one task per worker, never one per question. An item's image is encoded once (in a
thread pool, a few items ahead) and its level questions are enqueued back to back, so they reach
the server in the same window and vLLM's prefix cache reuses the image.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import orjson

from harness.engine.cache import RequestCache, request_key
from harness.backends.http import Client, FatalError, RetryableError, RetryPolicy
from harness.engine.fanout import encode_or_error, fan_out, with_retries
from harness.engine.images import ImagePayload
from harness.data.items import Item
from harness.prompts.parsing import parse_letter, parse_yes_no
from harness.engine.pricing import cost
from harness.prompts.hierarchy import PromptConfig, Question, build_messages
from harness.runs.results import ResultStore, record

AnswerMode = Literal["generate", "choice", "logprobs"]


@dataclass
class Decoding:
    model: str
    answer: AnswerMode = "generate"
    max_tokens: int = 10
    temperature: float = 0.0
    seed: int | None = None
    top_logprobs: int = 20
    parser: str = "robust"


@dataclass
class Stats:
    total: int = 0  # questions to ask this session (after resume)
    answered: int = 0
    failed: int = 0
    retried: int = 0
    cached: int = 0
    auto: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    images_encoded: int = 0
    items: int = 0
    started: float = field(default_factory=time.monotonic)
    fatal: str | None = None
    stopped: str | None = None


class Engine:
    def __init__(self, *, client: Client, store: ResultStore, prompt: PromptConfig, decoding: Decoding,
                 concurrency: int = 64, media: str = "base64", max_side: int | None = None,
                 retry: RetryPolicy = RetryPolicy(), throttle=None, token_limiter=None,
                 cache: RequestCache | None = None, prices: tuple[float, float] = (0.0, 0.0),
                 max_cost: float | None = None, dedupe: bool = False, prefetch: int = 8,
                 image_workers: int = 4):
        self.client, self.store, self.prompt, self.dec = client, store, prompt, decoding
        self.concurrency, self.media, self.max_side = concurrency, media, max_side
        self.retry, self.throttle, self.token_limiter = retry, throttle, token_limiter
        self.cache, self.prices, self.max_cost = cache, prices, max_cost
        self.dedupe, self.prefetch = dedupe, prefetch
        self.stats = Stats()
        self._inflight: dict[str, asyncio.Future] = {}
        # Bounded LRU of recent answers for text-mode dedupe: identical questions sit close together
        # in a file (CUB: at most 116 questions apart), so 64k entries lose no hit while memory stays
        # flat at a million questions; --cache covers reuse beyond that.
        self._memo: OrderedDict[str, dict] = OrderedDict()
        self.memo_size = 65_536
        self._pool = ThreadPoolExecutor(max_workers=image_workers, thread_name_prefix="img")
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ requests
    def body(self, q: Question, image: ImagePayload | None, *, for_key: bool = False) -> dict:
        url = None
        if image is not None:
            url = f"digest:{image.uuid}:{image.n_bytes}" if for_key else image.url
        msgs = build_messages(q, url, self.prompt, uuid=None if for_key or image is None else image.uuid)
        d = self.dec
        b: dict = {"model": d.model, "messages": msgs, "temperature": d.temperature}
        if d.seed is not None:
            b["seed"] = d.seed
        letters = list(q.choices)
        if d.answer == "logprobs":
            b.update(max_tokens=1, logprobs=True, top_logprobs=d.top_logprobs)
        else:
            b["max_tokens"] = d.max_tokens
        if d.answer == "choice":
            b["structured_outputs"] = {"choice": ["Yes", "No"] if q.option is not None else letters}
        return b

    def interpret(self, q: Question, resp: dict) -> dict:
        """Response JSON -> the answer fields of a result line. Raises RetryableError if malformed."""
        try:
            choice = resp["choices"][0]
            raw = choice["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RetryableError("malformed response (no choices[0].message)") from None
        if raw is None:
            raw = ""
        out: dict = {"raw": raw}
        usage = resp.get("usage") or {}
        out["tokens"] = [usage.get("prompt_tokens", 0) or 0, usage.get("completion_tokens", 0) or 0]
        if q.option is not None:  # binary statement
            out["yes"] = parse_yes_no(raw)
            out["letter"] = None
            return out
        if self.dec.answer == "logprobs":
            if choice.get("logprobs") is None:
                raise FatalError("the endpoint returned no logprobs: it does not support `--answer logprobs` "
                                 "(transformers serve ignores it); use `--answer generate`, or vLLM")
            lp = (choice.get("logprobs") or {}).get("content") or []
            top = lp[0].get("top_logprobs") or [] if lp else []
            dist: dict[str, float] = {}
            for t in top:
                tok = str(t.get("token", "")).strip().strip("().:*")
                if tok in q.choices and tok not in dist:
                    dist[tok] = float(t.get("logprob", float("-inf")))
            out["letter"] = max(dist, key=dist.__getitem__) if dist else None
            out["letter_logprobs"] = dist
            return out
        # FIX: an empty completion (a transient fault: ask() retries it once, then keeps it) made this
        # fatal and stopped the whole run; only a non-empty answer outside the letters shows that the
        # endpoint ignored structured_outputs.
        if self.dec.answer == "choice" and raw.strip() and raw.strip() not in q.choices:
            raise FatalError(f"`--answer choice` got {raw[:40]!r}, not one of the offered letters: the endpoint "
                             "ignored vLLM's structured_outputs; use `--answer logprobs` or `--answer generate`")
        out["letter"] = parse_letter(raw, q.choices, self.dec.parser)  # type: ignore[arg-type]
        return out

    async def _send(self, body: bytes, est_tokens: int, q: Question | None = None) -> dict:
        """POST and (given the question) interpret, retried as one: a reply without choices is a
        fault like a 503."""
        async def attempt() -> dict:
            if self.token_limiter is not None:
                await self.token_limiter.acquire(min(est_tokens, self.token_limiter.max_rate))
            if self.throttle is not None:
                async with self.throttle:
                    pass
            resp = await self.client.post("/chat/completions", body)
            return resp if q is None else self.interpret(q, resp)

        return await with_retries(attempt, self.retry, self._count_retry)

    def _count_retry(self, _e: RetryableError) -> None:
        self.stats.retried += 1

    async def ask(self, q: Question, image: ImagePayload | None) -> dict:
        """Answer fields of one question: from the memo/cache, a request already in flight, or the server."""
        key = request_key(self.body(q, image, for_key=True))
        if key in self._memo:
            self._memo.move_to_end(key)
            self.stats.cached += 1
            return self._memo[key] | {"cached": True}
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats.cached += 1
            return hit | {"cached": True}
        if key in self._inflight:
            self.stats.cached += 1
            return (await asyncio.shield(self._inflight[key])) | {"cached": True}
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            body = self.body(q, image)
            est = len(q.text) // 4 + (85 if image else 0) + body.get("max_tokens", 1)
            empty_retry = True
            while True:
                t0 = time.monotonic()
                ans = await self._send(orjson.dumps(body), est, q)
                if ans["raw"] == "" and empty_retry and q.option is None and self.dec.answer != "logprobs":
                    empty_retry = False  # one more try for an empty completion, then keep it
                    self.stats.retried += 1
                    continue
                break
            ans["latency"] = round(time.monotonic() - t0, 4)
            pt, ct = ans["tokens"]
            self.stats.prompt_tokens += pt
            self.stats.completion_tokens += ct
            self.stats.cost += cost(pt, ct, self.prices)
            if self.dedupe:
                self._memo[key] = ans
                if len(self._memo) > self.memo_size:
                    self._memo.popitem(last=False)
            if self.cache is not None:
                self.cache.put(key, ans)
            fut.set_result(ans)
            return ans
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved
            raise
        finally:
            self._inflight.pop(key, None)

    # ------------------------------------------------------------------ pipeline
    async def produce(self, work: Iterator[tuple[Item, list[Question]]], put) -> None:
        loop = asyncio.get_running_loop()
        window: deque = deque()

        async def emit(item: Item, qs: list[Question], fut) -> None:
            image = await fut if fut is not None else None
            self.stats.items += 1
            for q in qs:
                if self._stop.is_set():
                    return
                await put((q, image))

        for item, qs in work:
            if self._stop.is_set():
                break
            asked = []
            for q in qs:
                if q.auto is not None:
                    self.store.append(record(q, letter=None, raw=None, error=None))
                    self.stats.auto += 1
                else:
                    asked.append(q)
            if not asked:
                continue
            needs_image = any(q.image for q in asked)
            fut = (loop.run_in_executor(self._pool, encode_or_error, item.image, self.media, self.max_side)
                   if needs_image else None)
            if needs_image:
                self.stats.images_encoded += 1
            window.append((item, asked, fut))
            if len(window) > self.prefetch:
                await emit(*window.popleft())
        while window and not self._stop.is_set():
            await emit(*window.popleft())

    def _crash(self, job, e: Exception) -> None:
        q, _ = job
        self.store.append(record(q, letter=None, raw=None, error=f"internal: {type(e).__name__}: {e}"[:300]))
        self.stats.failed += 1

    async def handle(self, q: Question, image) -> None:
        if isinstance(image, Exception):
            self.store.append(record(q, letter=None, raw=None, error=f"image: {type(image).__name__}: {image}"[:300]))
            self.stats.failed += 1
            return
        try:
            ans = await self.ask(q, image)
        except RetryableError as e:
            self.store.append(record(q, letter=None, raw=None, error=f"gave up after retries: {e.reason}"))
            self.stats.failed += 1
            return
        except FatalError as e:
            if self.stats.fatal is None:
                self.stats.fatal = str(e)
            self._stop.set()
            return
        ans = dict(ans)  # the memo, cache and in-flight waiters share the original
        letter = ans.pop("letter")
        raw = ans.pop("raw")
        self.store.append(record(q, letter=letter, raw=raw, error=None, **ans))
        self.stats.answered += 1
        if self.max_cost is not None and self.stats.cost >= self.max_cost and not self._stop.is_set():
            self.stats.stopped = f"--max-cost {self.max_cost:.2f} USD reached ({self.stats.cost:.2f} USD spent)"
            self._stop.set()

    async def run(self, work: Iterator[tuple[Item, list[Question]]]) -> Stats:
        try:
            await fan_out(lambda put: self.produce(work, put), lambda job: self.handle(*job), self._crash,
                          workers=self.concurrency, stop=self._stop)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.store.flush()
            if self.cache is not None:
                self.cache.flush()
        return self.stats
