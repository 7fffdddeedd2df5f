"""CLIP/SigLIP as a local scoring backend: the same results.jsonl as an endpoint run.

Each question's options are scored as the reference did (options in file order, text
`template.format(option)`, argmax of the logits), but each image is decoded and encoded once per item
(not once per level) and each distinct option text once per run (:class:`TextVocab`); images are
decoded in a background pool while the encoder works, and encoded in batches.

Result lines are `harness.runs.results.record()` lines (qid from :func:`harness.prompts.hierarchy.make_qid` with
mode "image", the text template as the prompt variant and answer mode "clip"), plus `scores` (letter
-> softmax probability over the offered options) and `logits` (letter -> the model's logit: 100 x
cosine for open_clip CLIP, exp(logit_scale) x cosine + logit_bias for SigLIP). `harness report` reads
them unchanged; a rerun skips the qids already written (resume), `retry_errors` asks failed ones again.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import orjson
import torch

from harness import __version__
from harness.backends.contrastive import ContrastiveModel, EncoderCounts, load_pixels, prefetch
from harness.data.items import LETTERS, Item, ItemError, ReadReport, file_hash, read_items
from harness.prompts.hierarchy import Question, make_qid
from harness.runs.results import ResultStore
from harness.tasks.hierarchy import record
from harness.metrics.readers import summarize_results

ANSWER_MODE = "clip"
EXIT_OK, EXIT_INPUT, EXIT_UNANSWERED = 0, 2, 3
#: Settings that change answers: a resumed run folder must have been written with the same ones.
FINGERPRINT = ("model", "data_sha256", "template", "dtype", "limit", "answer")


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
        """questions: (row of image_emb, options in letter order) -> Scored, in order.

        One (B x V) similarity matmul per batch, then a gather per question."""
        if not questions:
            return []
        texts = [self.texts(opts) for _, opts in questions]
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


def questions_for(item: Item, template: str) -> list[Question]:
    """The questions of an item (options in file order, as the reference CLIP/SigLIP runs)."""
    out = []
    for t, lv in enumerate(item.levels):
        if lv.truth is None:
            continue
        qid = make_qid(item.id, lv.n, "image", template, ANSWER_MODE)
        out.append(Question(qid, item.id, lv.n, t, lv.choices, lv.truth, None, "", item.image, not lv.root))
    return out


@dataclass
class ScoreStats:
    items: int = 0
    questions: int = 0
    failed: int = 0
    seconds: float = 0.0
    counts: EncoderCounts = field(default_factory=EncoderCounts)
    vocab: int = 0

    def as_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "counts"}
        d["encoders"] = self.counts.as_dict()
        return d


def score_items(model: ContrastiveModel, work: Iterable[tuple[Item, list[Question]]], template: str, *,
                batch_size: int = 64, workers: int = 4, text_batch: int = 256,
                stats: ScoreStats | None = None) -> Iterator[dict]:
    """Result records for (item, questions) pairs: images decoded ahead in `workers` threads,
    encoded `batch_size` at a time, option texts through one vocabulary. An image that cannot be
    read gives error records for its questions (asked again with retry_errors)."""
    scorer = BatchScorer(model, template, text_batch)
    stats = stats if stats is not None else ScoreStats()
    start_counts = EncoderCounts(**model.counts.as_dict())
    t0 = time.monotonic()
    batch: list[tuple[list[Question], torch.Tensor]] = []

    def flush() -> Iterator[dict]:
        if not batch:
            return
        emb = model.encode_images(torch.stack([px for _, px in batch]))
        flat = [(i, q) for i, (qs, _) in enumerate(batch) for q in qs]
        for (_, q), s in zip(flat, scorer.score(emb, [(i, q.options) for i, q in flat])):
            L = LETTERS[s.best]
            yield record(q, letter=L, raw=L, error=None, **s.record_fields())
        stats.questions += len(flat)
        batch.clear()

    for (item, qs), px in prefetch(work, lambda w: load_pixels(w[0].image, model), workers,
                                    ahead=max(batch_size * 2, workers * 4)):
        stats.items += 1
        if isinstance(px, BaseException):
            err = f"image: {type(px).__name__}: {px}"[:300]
            for q in qs:
                yield record(q, letter=None, raw=None, error=err)
            stats.failed += len(qs)
            continue
        batch.append((qs, px))
        if len(batch) >= batch_size:
            yield from flush()
    yield from flush()
    stats.seconds += time.monotonic() - t0
    now = model.counts
    stats.counts = EncoderCounts(now.image_calls - start_counts.image_calls, now.images - start_counts.images,
                                 now.text_calls - start_counts.text_calls, now.texts - start_counts.texts)
    stats.vocab = len(scorer.vocab)


# --- a run folder -----------------------------------------------------------------------------------


@dataclass
class ClipRun:
    """`harness clip-run`: what to score and where (everything that changes answers is in FINGERPRINT)."""

    model: str
    data: str
    out: str
    template: str = "a photo of a {}."
    image_root_map: Sequence[str] = ()
    batch_size: int = 64
    workers: int = 4
    text_batch: int = 256
    device: str = "auto"
    dtype: str = "float32"
    limit: int | None = None
    strict: bool = False
    retry_errors: bool = False
    force: bool = False

    def settings(self) -> dict:
        return {"backend": "clip", "model": self.model, "data": str(self.data),
                "data_sha256": file_hash(self.data), "template": self.template, "option_order": "file",
                "dtype": self.dtype, "limit": self.limit, "answer": ANSWER_MODE,
                "image_root_map": list(self.image_root_map)}


def _check_resume(out: Path, settings: dict, force: bool) -> None:
    manifest = out / "run.json"
    if force or not manifest.exists():
        return
    old = orjson.loads(manifest.read_bytes()).get("settings", {})
    if old.get("backend") != "clip":
        raise ValueError(f"{manifest}: this folder holds a run of another backend; use another --out")
    for k in FINGERPRINT:
        if k in old and old[k] != settings[k]:
            raise ValueError(f"{manifest}: this folder holds a run with other settings ({k}: {old[k]!r} -> "
                             f"{settings[k]!r}). Use another --out, or --force to resume anyway.")


def _write_manifest(out: Path, settings: dict, run: ClipRun, status: str, started: str, model=None,
                    stats: ScoreStats | None = None) -> None:
    m = {"harness_version": __version__, "status": status, "started": started,
         "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": settings,
         "runtime": {"device": str(model.device) if model is not None else run.device,
                     "batch_size": run.batch_size, "workers": run.workers, "text_batch": run.text_batch,
                     "torch": torch.__version__},
         "python": platform.python_version()}
    if stats is not None:
        m["stats"] = stats.as_dict()
    tmp = out / "run.json.tmp"
    tmp.write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2))
    tmp.replace(out / "run.json")


def run_clip(run: ClipRun, model: ContrastiveModel | None = None, log=None) -> int:
    """Score `run.data` into `run.out` (results.jsonl, run.json, summary.json); resumable.
    Returns an exit code: 0 done, 2 invalid input lines skipped, 3 questions left unanswered."""
    log = log or sys.stderr
    if not Path(run.data).is_file():
        raise FileNotFoundError(f"items file not found: {run.data}")
    check_template(run.template)
    if run.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {run.batch_size}")
    out = Path(run.out)
    settings = run.settings()
    _check_resume(out, settings, run.force)
    if model is None:  # before the folder is made: a model that cannot load leaves nothing behind
        from harness.backends.contrastive import load_model

        model = load_model(run.model, run.device, run.dtype)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / "results.jsonl")
    done = store.scan(retry_errors=run.retry_errors)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_manifest(out, settings, run, "running", started, model)
    report = ReadReport()
    items: Iterable[Item] = read_items(run.data, root_map=run.image_root_map, strict=run.strict, report=report)
    if run.limit is not None:
        items = islice(items, run.limit)
    skipped = 0

    def work() -> Iterator[tuple[Item, list[Question]]]:
        nonlocal skipped
        for item in items:
            qs = [q for q in questions_for(item, run.template) if q.qid not in done]
            if qs:
                yield item, qs
            else:
                skipped += 1

    stats = ScoreStats()
    fatal = None
    with store:
        try:
            for rec in score_items(model, work(), run.template, batch_size=run.batch_size, workers=run.workers,
                                   text_batch=run.text_batch, stats=stats):
                store.append(rec)
        except ItemError as e:  # strict: stop at the bad line; what was scored is kept
            fatal = e
    summary = summarize_results(out / "results.jsonl") if (out / "results.jsonl").exists() else None
    if summary is not None:
        (out / "summary.json").write_bytes(orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2))
    unanswered = summary.n_errors if summary else 0
    status = "fatal" if fatal else "incomplete" if unanswered else "done"
    _write_manifest(out, settings, run, status, started, model, stats)
    c = stats.counts
    rate = stats.items / max(stats.seconds, 1e-9)
    print(f"{stats.questions + stats.failed:,} questions of {stats.items:,} items in {stats.seconds:,.1f} s "
          f"({rate:,.1f} images/s) on {model.device}: {c.images:,} images in {c.image_calls:,} encoder calls, "
          f"{c.texts:,} distinct texts in {c.text_calls:,} calls; {stats.failed:,} failed; "
          f"{skipped:,} items already done", file=log)
    for e in report.errors[:20]:
        print(f"invalid input, skipped: {e}", file=log)
    if summary is not None and summary.n_items:
        print(f"HCA {summary.hca:.2f} [{summary.hca_ci[0]:.2f}, {summary.hca_ci[1]:.2f}]  leaf {summary.leaf_acc:.2f}"
              f"  unanswered {summary.n_unanswered:,}  -> {out / 'summary.json'}", file=log)
    if fatal is not None:
        raise fatal
    if unanswered:
        print(f"{unanswered:,} question(s) failed; rerun with --retry-errors to ask them again", file=log)
        return EXIT_UNANSWERED
    return EXIT_INPUT if report.errors else EXIT_OK
