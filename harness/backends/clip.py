"""CLIP/SigLIP as a local scoring backend behind the engine's Backend protocol.

:class:`ClipScorer` answers `send("/clip/score", {"image": payload, "texts": [...]})` with
`{"logits": [...], "probs": [...]}` (the texts in the order given), like a server would: concurrent
requests are collected by one background task and scored together (dynamic batching: up to
`batch_size` distinct images per image-encoder call, run in one encoder thread so the event loop stays
free). The payload is made once per item by `prepare_image` (decoded and preprocessed in the engine's
image pool), its embedding is kept in a small LRU keyed by the payload id while the item's levels are
asked, so each image is encoded once per item; each distinct text is encoded once per run
(:class:`TextVocab`).

Scoring is the reference's: text `template.format(option)` (filled by the task, `harness.tasks.clip`),
logits = the model's scale x cosine (+ bias for SigLIP), softmax probabilities over the offered
options, answer = argmax of the logits. :func:`reference_scores` is the reference loop (per level: the
image and every option text encoded again), kept for checks and benchmarks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import torch

from harness.backends.contrastive import ContrastiveModel, default_workers, load_model, load_pixels
from harness.backends.http import FatalError
from harness.data.items import LETTERS, Item

#: The request path of a score request.
SCORE_PATH = "/clip/score"


class TextVocab:
    """Each distinct text encoded once: rows of one growing embedding matrix on the model's device."""

    def __init__(self, model: ContrastiveModel, batch_size: int = 256):
        self.model = model
        self.batch_size = batch_size
        self.index: dict[str, int] = {}
        self._mat: torch.Tensor | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def matrix(self) -> torch.Tensor:
        """(n, D) embeddings of the texts in index order."""
        if self._mat is None:
            raise ValueError("empty vocabulary")
        return self._mat[: self._n]

    def ids(self, texts: Iterable[str]) -> list[int]:
        """Row of each text, encoding the ones not seen yet (in batches)."""
        texts = list(texts)
        new = list(dict.fromkeys(t for t in texts if t not in self.index))
        for i in range(0, len(new), self.batch_size):
            self._append(new[i:i + self.batch_size])
        return [self.index[t] for t in texts]

    def _append(self, chunk: list[str]) -> None:
        emb = self.model.encode_texts(chunk)
        need = self._n + len(chunk)
        if self._mat is None or need > len(self._mat):  # capacity doubles: amortised O(1) per text
            cap = max(need, 2 * (len(self._mat) if self._mat is not None else 0), 1024)
            grown = torch.empty((cap, emb.shape[1]), dtype=emb.dtype, device=emb.device)
            if self._mat is not None:
                grown[: self._n] = self._mat[: self._n]
            self._mat = grown
        self._mat[self._n:need] = emb
        for t in chunk:
            self.index[t] = self._n
            self._n += 1


@dataclass(frozen=True, slots=True)
class Scored:
    """One question's scores, options in letter order."""

    logits: tuple[float, ...]
    probs: tuple[float, ...]
    best: int  # index of the highest logit (the first one on a tie)

    def record_fields(self) -> dict:
        return {"scores": {L: round(p, 6) for L, p in zip(LETTERS, self.probs)},
                "logits": {L: round(v, 5) for L, v in zip(LETTERS, self.logits)}}


def _scored(logits: torch.Tensor) -> Scored:
    lg = logits.double()
    probs = torch.softmax(lg, dim=-1)
    return Scored(tuple(lg.tolist()), tuple(probs.tolist()), int(torch.argmax(lg)))


class BatchScorer:
    """Scores questions against precomputed image embeddings through the text vocabulary."""

    def __init__(self, model: ContrastiveModel, template: str, text_batch: int = 256):
        check_template(template)
        self.model = model
        self.template = template
        self.vocab = TextVocab(model, text_batch)

    def texts(self, options: Sequence[str]) -> list[str]:
        return [fill(self.template, o) for o in options]

    def score(self, image_emb: torch.Tensor, questions: Sequence[tuple[int, Sequence[str]]]) -> list[Scored]:
        """questions: (row of image_emb, options in letter order) -> Scored, in order."""
        return self.score_texts(image_emb, [(r, self.texts(opts)) for r, opts in questions])

    def score_texts(self, image_emb: torch.Tensor, questions: Sequence[tuple[int, Sequence[str]]]) -> list[Scored]:
        """questions: (row of image_emb, option texts in letter order) -> Scored, in order.

        One (B x V) similarity matmul per batch, then a gather per question."""
        if not questions:
            return []
        texts = [list(ts) for _, ts in questions]
        flat = self.vocab.ids(t for ts in texts for t in ts)  # new texts of the batch: one pass, batched
        ids, at = [], 0
        for ts in texts:
            ids.append(flat[at:at + len(ts)])
            at += len(ts)
        sims = image_emb @ self.vocab.matrix.T  # (B, V)
        width = max(len(x) for x in ids)
        dev = sims.device
        rows = torch.tensor([r for r, _ in questions], device=dev)
        cols = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=dev)
        logits = self.model.logits(sims[rows[:, None], cols]).cpu()
        return [_scored(logits[i, :len(x)]) for i, x in enumerate(ids)]


def fill(template: str, option: str) -> str:
    """The text of an option: `{}` or `{cls}` in the template is replaced by the option."""
    return template.format(option, cls=option)


def check_template(template: str) -> None:
    try:
        if fill(template, "\x00") == template:
            raise ValueError
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"text template {template!r} must contain `{{}}` or `{{cls}}` for the option "
                         f"(e.g. 'a photo of a {{}}.')") from None


def reference_scores(model: ContrastiveModel, item: Item, template: str) -> list[Scored]:
    """The reference loop, for checks and benchmarks: per level, encode the image and every option
    text again (the image is decoded and preprocessed once per item). Levels with no truth are skipped."""
    pixels = load_pixels(item.image, model)[None]
    out = []
    for lv in item.levels:
        if lv.truth is None:
            continue
        img = model.encode_images(pixels)
        txt = model.encode_texts([fill(template, o) for o in lv.choices])
        out.append(_scored(model.logits(img @ txt.T)[0].cpu()))
    return out


# --- the backend ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class ClipImage:
    """An item's image payload: its preprocessed pixels and an id (the embedding cache's key)."""

    id: int
    pixels: torch.Tensor
    path: str


@dataclass(slots=True)
class _Request:
    image: ClipImage
    texts: list[str]
    fut: asyncio.Future


class ClipScorer:
    """The Backend of a CLIP run: a local model scoring option texts against images, batched.

    `model` may be given already loaded (tests, benchmarks); otherwise `spec` is loaded on entry.
    `max_delay`: how long the batcher waits for one more request before scoring a batch that is not
    full (seconds). `cache_size`: image embeddings kept (LRU; default 16 x batch_size, at least 1024)."""

    def __init__(self, spec: str, *, device: str = "auto", dtype: str = "float32", batch_size: int = 64,
                 workers: int | None = None, text_batch: int = 256,
                 max_delay: float = 0.002, cache_size: int | None = None, model: ContrastiveModel | None = None):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.spec, self.device, self.dtype = spec, device, dtype
        self.batch_size, self.text_batch, self.max_delay = batch_size, text_batch, max_delay
        #: image decoding threads wanted (the engine's image pool decodes: `prepare_image`)
        self.image_workers = default_workers() if workers is None else workers
        self.cache_size = cache_size or max(1024, 16 * batch_size)
        self.model = model
        self.scorer: BatchScorer | None = None
        self._ids = itertools.count()
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # image id -> embedding (D,)
        self._queue: list[_Request] = []
        self._batch: list[_Request] = []  # the batch being scored
        self._arrived: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._broken: str | None = None
        self.batches = 0  # scoring steps (each: at most one image-encoder call)
        self.requests = 0

    # -- lifecycle
    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        # one encoder thread: every model call (load, images, texts) runs there, in order
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-encoder")
        try:
            if self.model is None:
                self.model = await loop.run_in_executor(self._pool, load_model, self.spec, self.device, self.dtype)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        self.scorer = BatchScorer(self.model, "{}", self.text_batch)  # texts come filled
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._serve(), name="clip-batcher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._cache.clear()

    async def health(self) -> list[str]:
        if self.model is None:
            raise FatalError(f"CLIP model {self.spec!r} is not loaded (enter the backend first)")
        return [self.spec]

    @property
    def counts(self):
        """The model's encoder counters (calls and inputs encoded)."""
        return self.model.counts if self.model is not None else None

    def stats(self) -> dict:
        """Encoder work of this backend (for a manifest or a benchmark)."""
        return {"encoders": self.model.counts.as_dict() if self.model is not None else {},
                "vocab": len(self.scorer.vocab) if self.scorer is not None else 0,
                "batches": self.batches, "requests": self.requests}

    # -- Backend protocol
    def prepare_image(self, path: str, media: str, max_side: int | None) -> ClipImage:
        """Decode and preprocess (in the engine's image pool). `media` and `max_side` do not apply:
        the model's own preprocessing resizes."""
        assert self.model is not None, "enter the backend first"
        return ClipImage(next(self._ids), load_pixels(path, self.model), path)

    async def send(self, path: str, body: Any, *, key: object = None) -> dict:
        """`key` (the engine's per-item affinity key) is accepted and ignored: one local scorer."""
        if path != SCORE_PATH:
            raise FatalError(f"the CLIP backend answers {SCORE_PATH} only, not {path}")
        if self._broken is not None:
            raise FatalError(self._broken)
        if self._arrived is None:
            raise FatalError("the CLIP backend is not entered (use `async with ClipScorer(...)`)")
        image, texts = body["image"], body["texts"]
        if not isinstance(image, ClipImage):
            raise FatalError(f"the CLIP backend needs a payload from its prepare_image, got {type(image).__name__}")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(image, list(texts), fut))
        self.requests += 1
        self._arrived.set()
        return await fut

    # -- the batcher
    def _new_images(self) -> int:
        return len({r.image.id for r in self._queue if r.image.id not in self._cache})

    async def _gather(self) -> None:
        """Let concurrent senders join the batch: while new requests keep arriving (each loop tick, or
        within `max_delay`) and fewer than `batch_size` images need encoding."""
        assert self._arrived is not None
        while self._new_images() < self.batch_size:
            n = len(self._queue)
            await asyncio.sleep(0)  # senders woken by the last batch's answers send their next request
            if len(self._queue) > n:
                continue
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), self.max_delay)
            except TimeoutError:
                return

    def _take(self) -> tuple[list[_Request], list[ClipImage]]:
        """The next batch: queued requests in arrival order whose image is cached or among the first
        `batch_size` new images; the others wait for the next batch."""
        batch, rest, encode, chosen = [], [], [], set()
        for r in self._queue:
            if r.fut.done():  # the sender was cancelled (the run stopped)
                continue
            iid = r.image.id
            if iid in self._cache or iid in chosen:
                batch.append(r)
            elif len(encode) < self.batch_size:
                chosen.add(iid)
                encode.append(r.image)
                batch.append(r)
            else:
                rest.append(r)
        self._queue = rest
        return batch, encode

    def _compute(self, batch: list[_Request], encode: list[ClipImage]) -> list[dict]:
        """In the encoder thread: encode the new images, then score every request of the batch."""
        assert self.model is not None and self.scorer is not None
        if encode:
            emb = self.model.encode_images(torch.stack([im.pixels for im in encode]))
            for im, e in zip(encode, emb):
                self._cache[im.id] = e
        ids = list(dict.fromkeys(r.image.id for r in batch))
        for i in ids:
            self._cache.move_to_end(i)
        rows = {i: k for k, i in enumerate(ids)}
        image_emb = torch.stack([self._cache[i] for i in ids])
        scored = self.scorer.score_texts(image_emb, [(rows[r.image.id], r.texts) for r in batch])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return [{"logits": list(s.logits), "probs": list(s.probs)} for s in scored]

    async def _serve(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._gather()
                batch, encode = self._take()
                if not batch:
                    continue
                self.batches += 1
                self._batch = batch
                try:
                    answers = await loop.run_in_executor(self._pool, self._compute, batch, encode)
                except Exception as e:  # noqa: BLE001 - every further batch would fail alike: stop the run
                    self._broken = f"CLIP scorer ({self.spec}): {type(e).__name__}: {str(e)[:300]}"
                    self._fail(batch + self._queue, FatalError(self._broken))
                    self._queue, self._batch = [], []
                    continue
                self._batch = []  # (on cancel it is failed below)
                for r, a in zip(batch, answers):
                    if not r.fut.done():
                        r.fut.set_result(a)
        finally:
            self._fail(self._batch + self._queue, FatalError("the CLIP backend was closed"))
            self._queue, self._batch = [], []

    @staticmethod
    def _fail(requests: Iterable[_Request], error: BaseException) -> None:
        for r in requests:
            if not r.fut.done():
                r.fut.set_exception(error)
