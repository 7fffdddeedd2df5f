"""The classification experiments of a RunSpec (classification-protocol.md): generation (`classify`:
open world, closed world, N-way), log-likelihood (`loglik`) and ImageWikiQA (`wikiqa`).

Each resolves its task's fields into a :class:`Settings` subclass (what decides the answers; `limit`,
file paths and media are NOT_ANSWERS, the data hashes are fingerprinted), streams its items as engine
units and scores a run folder. The run lifecycle (folder check, engine, summary, manifest, exit codes)
is the one of :mod:`harness.runs.execute`.

Folders written before the run kinds were unified say `generation` for `classify`; both are read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import orjson
from pydantic import Field

from harness.backends.http import RetryPolicy
from harness.backends.images import ImagePayload
from harness.classification import generation as G
from harness.classification import loglik as L
from harness.classification import wikiqa as W
from harness.classification.datasets import (
    data_dir,
    load_classes,
    read_class_items,
    read_wikiqa,
    resolve,
    unique,
)
from harness.classification.prompts import catalogue, catalogue_hash, raw_template, reference_order
from harness.classification.requests import Style
from harness.data.items import ReadReport, file_hash
from harness.engine.core import Unit
from harness.engine.pricing import price_for
from harness.metrics.readers import latest_records, results_files
from harness.runs.folder import NOT_ANSWERS, OLD_KINDS, RunFolder, Settings
from harness.runs.spec import ClassifyTask, EndpointBackend, LoglikTask, RunSpec, WikiQATask

KINDS = ("classify", "loglik", "wikiqa")

_RAW_NEEDS_TEMPLATE = "--request raw needs --template (llava15, llava16-mistral, llava16-vicuna, blip2)"


# ------------------------------------------------------------------ settings (the resume rule)

class _RunSettings(Settings):
    """What every classification kind records: the model, the data and the request style."""

    model: str
    data: str = Field(json_schema_extra=NOT_ANSWERS)
    data_sha256: str
    request: str
    template: str | None
    text_first: bool
    max_side: int | None = None
    media: str = Field("base64", json_schema_extra=NOT_ANSWERS)
    limit: int | None = Field(json_schema_extra=NOT_ANSWERS)  # the whole stream is replayed: extendable
    catalogue_sha256: str


class _ClassListSettings(_RunSettings):
    """A data set with a class list (classify, loglik)."""

    dataset: str
    classes: str = Field(json_schema_extra=NOT_ANSWERS)
    classes_sha256: str
    split: str
    first_synonym: bool


class ClassifySettings(_ClassListSettings):
    task: str
    k: int | None
    order: str
    protocol: str
    stream: str
    seed: int
    wording: int
    cot: bool
    max_tokens: int | None  # None: not sent (preset reference-api)
    temperature: float | None  # None: not sent (preset reference-api)
    sampling_seed: int | None = None


class LoglikSettings(_ClassListSettings):
    question: str
    prefix: str
    method: str
    seed: int
    prior: bool = Field(False, json_schema_extra=NOT_ANSWERS)  # adds the prior line, changes no other
    protocol: str = Field("robust", json_schema_extra=NOT_ANSWERS)  # scoring only: duplicate class names


class WikiQASettings(_RunSettings):
    cot: bool
    control: str
    max_tokens: int | None  # None: not sent (preset reference-api)
    temperature: float | None  # None: not sent (preset reference-api)
    protocol: str = Field("robust", json_schema_extra=NOT_ANSWERS)  # scoring only: the random-guess stream
    sampling_seed: int | None = None


# ------------------------------------------------------------------ helpers

PRESETS: dict[str, dict] = {
    # The reference's API calls (GPT-4, Claude, Gemini; classification-protocol.md section 2) set neither
    # temperature nor a token limit: the provider's defaults apply. Not copied: its retry loop sent every
    # request 3 times and silently dropped failures [reference bug]; here each request is sent once
    # (retried only on failure) and a failure is recorded.
    "reference-api": {"max_tokens": None, "temperature": None},
}


def _style(spec: RunSpec, t: ClassifyTask | WikiQATask, model: str, default_max_tokens: int) -> Style:
    template = raw_template(t.template) if t.template else None
    if t.request == "raw" and template is None:
        raise ValueError(_RAW_NEEDS_TEMPLATE)
    preset = PRESETS[t.preset] if t.preset else {"max_tokens": default_max_tokens, "temperature": 0.0}
    return Style(model=model, request=t.request, template=template, text_first=t.text_first,
                 max_tokens=spec.max_tokens or preset["max_tokens"],
                 temperature=spec.temperature if spec.temperature is not None else preset["temperature"],
                 seed=spec.seed)


def _load_data(spec: RunSpec, t: ClassifyTask | LoglikTask):
    ds = resolve(t.dataset, spec.data, t.classes, t.split)
    classes = load_classes(ds.classes, first_synonym=t.first_synonym)
    items = read_class_items(ds.data, classes, split=ds.split, root_map=spec.image_root_map,  # type: ignore[arg-type]
                             first_synonym=t.first_synonym)
    return ds, classes, items


def resolve_k(k: int | str | None, n_unique: int, n_all: int, task: str, order: str, protocol: str) -> int | None:
    """The label-set size of a closed / N-way run (`all` or none: every class)."""
    if task == "open":
        if k is not None:
            raise ValueError("--k applies to --task closed / nway")
        return None
    if k is None or k == "all":
        return n_all if order == "fixed" and protocol == "reference" else n_unique
    try:
        return int(k)
    except ValueError:
        raise ValueError(f"--k must be an integer or `all`, got {k!r}") from None


def _adopt_old_folder(out: str | Path) -> None:
    """A generation folder written before the unified run kinds says `generation` in run.json: relabel
    it `classify` (its settings and results are unchanged) so the folder check lets it resume."""
    folder = RunFolder(out)
    try:
        m = folder.read_manifest()
    except ValueError:
        return  # the folder check names the broken file
    if m is not None and m.get("kind") in OLD_KINDS:
        m["kind"] = OLD_KINDS[m["kind"]]
        tmp = folder.manifest_path.with_name("run.json.tmp")
        tmp.write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2))
        os.replace(tmp, folder.manifest_path)


def _fake_image() -> ImagePayload:
    return ImagePayload("data:image/jpeg;base64,...", "uuid", 0, None)


# ------------------------------------------------------------------ the experiment

class ClassificationExperiment:
    """One of the three classification run kinds, in the shape :mod:`harness.runs.execute` runs."""

    def __init__(self, spec: RunSpec, model: str):
        self.spec = spec
        t = spec.task
        self.kind = t.kind
        self.report = ReadReport()  # classification readers raise on the first bad line (naming it)
        self.dedupe = False
        self.group_workers = t.group_workers if isinstance(t, LoglikTask) else None
        self.prices = price_for(model, spec.price_in, spec.price_out)
        self._units: Callable[[set[str]], Iterator[Unit]]
        self._summarize: Callable[[Path], dict]
        if isinstance(t, ClassifyTask):
            _adopt_old_folder(spec.out)
            self._classify(t, model)
        elif isinstance(t, LoglikTask):
            self._loglik(t, model)
        elif isinstance(t, WikiQATask):
            self._wikiqa(t, model)
        else:
            raise TypeError(f"not a classification task: {t.kind!r}")

    # -- generation
    def _classify(self, t: ClassifyTask, model: str) -> None:
        spec = self.spec
        ds, classes, items = _load_data(spec, t)
        uniq = unique(classes)
        k = resolve_k(t.k, len(uniq), len(classes), t.task, t.order, t.protocol)
        stream = "reference" if t.protocol == "reference" else "hashed"
        cat = catalogue()
        default_max = cat["generation"]["max_tokens_cot"] if t.cot else cat["nway" if t.task == "nway" else "generation"]["max_tokens"]
        style = _style(spec, t, model, default_max)
        self.settings = ClassifySettings(
            model=model, task=t.task, dataset=ds.name, data=str(ds.data), data_sha256=file_hash(ds.data),
            classes=str(ds.classes), classes_sha256=file_hash(ds.classes), split=ds.split, k=k, order=t.order,
            protocol=t.protocol, stream=stream, seed=t.seed, wording=t.wording, cot=t.cot, request=t.request,
            template=t.template, text_first=t.text_first, max_tokens=style.max_tokens, temperature=style.temperature,
            sampling_seed=spec.seed, max_side=spec.max_side, media=spec.media, limit=spec.limit,
            first_synonym=t.first_synonym, catalogue_sha256=catalogue_hash())
        self.task = G.GenerationTask(style, cot=t.cot, n_classes=len(uniq))

        def units(done: set[str]) -> Iterator[Unit]:
            qs = G.questions(items, classes, task=t.task, k=k, fixed_order=t.order == "fixed", stream=stream,
                             seed=t.seed, wording=t.wording)
            for q in islice(qs, spec.limit):  # the whole stream is walked: the reference RNG stays in step
                if G.qid_of(q.item) not in done:
                    yield self.task.unit(q)

        self._units = units
        self._summarize = lambda path: G.score_run(latest_records(path), classes)

    # -- log-likelihood
    def _loglik(self, t: LoglikTask, model: str) -> None:
        spec = self.spec
        ds, classes, items = _load_data(spec, t)
        uniq = unique(classes)
        cat = catalogue()["loglik"]
        template = raw_template(t.template) if t.template else None
        if t.request == "raw" and template is None:
            raise ValueError(_RAW_NEEDS_TEMPLATE)
        question = t.question or cat["question"]
        prefix = t.prefix or (template.loglik_default_prefix if template and template.loglik_default_prefix
                              and t.request == "raw" else cat["prefix"])
        style = L.LoglikStyle(model=model, question=question, prefix=prefix, request=t.request, template=template,
                              text_first=t.text_first)
        self.settings = LoglikSettings(
            model=model, dataset=ds.name, data=str(ds.data), data_sha256=file_hash(ds.data), classes=str(ds.classes),
            classes_sha256=file_hash(ds.classes), split=ds.split, question=question, prefix=prefix, method=t.method,
            request=t.request, template=t.template, text_first=t.text_first, seed=t.seed, prior=t.prior,
            max_side=spec.max_side, media=spec.media, limit=spec.limit, first_synonym=t.first_synonym,
            catalogue_sha256=catalogue_hash(), protocol=t.protocol)
        self.task = L.LoglikTask(style, uniq, t.method)

        def units(done: set[str]) -> Iterator[Unit]:
            if t.prior and L.PRIOR_QID not in done:
                yield self.task.unit(L.PRIOR_QID, None, {"item": None, "label": None})
            order, _ = reference_order(items, t.seed)
            for it in islice(order, spec.limit):
                qid = G.qid_of(it)
                if qid not in done:
                    yield self.task.unit(qid, it.image, {"item": it.key, "line": it.line, "label": it.label})

        self._units = units
        ref = classes if t.protocol == "reference" else None
        self._summarize = lambda path: L.score_run(latest_records(path), uniq, reference_classes=ref)

    # -- ImageWikiQA
    def _wikiqa(self, t: WikiQATask, model: str) -> None:
        spec = self.spec
        data = Path(spec.data) if spec.data else data_dir() / "imagewikiqa.jsonl"
        if not data.is_file():
            raise FileNotFoundError(f"{data}: no such file")
        items = list(read_wikiqa(data, root_map=spec.image_root_map))
        style = _style(spec, t, model, catalogue()["wikiqa"]["max_tokens"])
        self.settings = WikiQASettings(
            model=model, data=str(data), data_sha256=file_hash(data), cot=t.cot, control=t.control,
            request=t.request, template=t.template, text_first=t.text_first, max_tokens=style.max_tokens,
            temperature=style.temperature, sampling_seed=spec.seed, max_side=spec.max_side, media=spec.media,
            limit=spec.limit, catalogue_sha256=catalogue_hash(), protocol=t.protocol)
        self.task = W.WikiQATask(style, cot=t.cot, control=t.control)

        def units(done: set[str]) -> Iterator[Unit]:
            for it in islice(items, spec.limit):
                u = self.task.unit(it)
                if u.groups[0].qid not in done:
                    yield u

        self._units = units
        self._summarize = lambda path: W.score_run(latest_records(path))

    # -- the experiment interface
    async def prepare(self, backend) -> None:
        """Log-likelihood `trie`: plan the class-token trie with the server's /tokenize and /detokenize."""
        if isinstance(self.task, L.LoglikTask):
            b = self.spec.backend
            retry = RetryPolicy(max_retries=b.max_retries) if isinstance(b, EndpointBackend) else RetryPolicy()
            await self.task.prepare(backend, retry)

    def units(self, done: set[str]) -> Iterator[Unit]:
        return self._units(done)

    def summarize(self, results_path) -> dict:
        return self._summarize(Path(results_path))

    def headline(self, summary: dict) -> str | None:
        if not summary.get("n"):
            return None
        try:
            return "\n".join(summary_lines(self.kind, summary))
        except (KeyError, TypeError, ValueError):
            return None

    def unanswered(self, summary: dict) -> int:
        return int(summary.get("n_errors", 0))

    def dry_run(self, done: set[str]) -> list[str]:
        """The first requests (images elided) and how many items are left to ask; nothing is sent."""
        out: list[str] = []
        n = 0
        for u in self.units(done):
            for g in u.groups:
                if n < 3:
                    path, body = self.task.request(g, min(1, g.n - 1) if g.head else 0,
                                                   _fake_image() if u.image else None)
                    out.append(f"# {g.qid}  POST {path}" + (f"  ({g.n} requests in the group)" if g.n > 1 else ""))
                    out.append(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()[:4000])
                n += 1
        out.append(f"dry run: {n:,} items to ask" + (f" ({len(done):,} already done)" if done else ""))
        return out


# ------------------------------------------------------------------ scoring a run folder

def run_kind(manifest: dict) -> str:
    """The run kind of a classification manifest (`generation` in older folders -> `classify`)."""
    kind = str(manifest.get("kind"))
    return OLD_KINDS.get(kind, kind)


def read_manifest(run: str | Path) -> dict:
    p = Path(run)
    folder = RunFolder(p if p.is_dir() else p.parent)
    m = folder.read_manifest()
    if m is None:
        raise FileNotFoundError(f"{folder.manifest_path}: no run.json (is this a `harness classify` run folder?)")
    return m


def run_classes(manifest: dict, first_synonym: bool | None = None) -> list[str]:
    """The class list of a classify / loglik run (as the run read it)."""
    st = manifest["settings"]
    fs = st.get("first_synonym", False) if first_synonym is None else first_synonym
    return load_classes(st["classes"], first_synonym=fs)


def _records(run: str | Path) -> list[dict]:
    """The latest line of every qid of a run folder: every results file (all shards) as one run; a
    results file given directly is read alone."""
    p = Path(run)
    if not p.is_dir() and p.name == "results.jsonl":
        p = p.parent  # a folder's main results file stands for the folder (as before shards)
    if not results_files(p) or not all(f.is_file() for f in results_files(p)):
        raise FileNotFoundError(f"{p / 'results.jsonl' if p.is_dir() else p}: no results")
    return latest_records(p)


def score_folder(run: str | Path, *, synonyms: str | None = None, mapper=None,
                 direct: str = "contained") -> tuple[str, dict]:
    """(kind, metrics) of a classification run folder: every scorer of a generation run (with optional
    synonyms and label-set mapping), log-likelihood top-1 / top-5 and sweeps, ImageWikiQA accuracy."""
    from harness.classification.scoring import load_synonyms

    m = read_manifest(run)
    kind = run_kind(m)
    records = _records(run)
    if kind == "classify":
        classes = run_classes(m)
        syn = load_synonyms(synonyms, classes) if synonyms else None
        return kind, G.score_run(records, classes, synonyms=syn, mapper=mapper, direct_rule=direct)
    if kind == "loglik":
        classes = run_classes(m)
        ref = classes if m["settings"].get("protocol") == "reference" else None
        return kind, L.score_run(records, unique(classes), reference_classes=ref)
    if kind == "wikiqa":
        return kind, W.score_run(records)
    raise ValueError(f"{run}/run.json: not a classification run (kind {kind!r})")


def score_wikiqa_stream(runs: list[str | Path]) -> list[dict]:
    """ImageWikiQA runs scored as the reference notebook scored its output files: one seed-1234 random
    stream for the MMMU parser's guesses, continued from run to run in the order given (each run in
    line order). Give the runs in the notebook's file order to reproduce its numbers."""
    return W.score_runs([_records(r) for r in runs])


def summarize_folder(folder: str | Path) -> dict:
    """The metrics of a classification run folder (what `harness report` prints)."""
    return score_folder(folder)[1]


def per_class(run: str | Path, scorer: str = "substring") -> tuple[list[str], dict[str, float]]:
    """(classes, per-class accuracy) of a generation run (under `scorer`) or a log-likelihood run
    (top-1 of the mean score)."""
    m = read_manifest(run)
    kind = run_kind(m)
    classes = run_classes(m)
    records = _records(run)
    if kind == "classify":
        return classes, G.score_run(records, classes, per_class_scorer=scorer)["per_class"]
    if kind == "loglik":
        return classes, L.per_class_top1(records, unique(classes))
    raise ValueError(f"{run}: per-class accuracy needs a classify or loglik run, not {kind!r}")


def _fmt_acc(a: dict) -> str:
    return f"{a['accuracy']:.2f} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] ({a['correct']:,}/{a['n']:,})"


def summary_lines(kind: str, s: dict) -> list[str]:
    """A classification summary as console lines (its main accuracy numbers)."""
    kind = OLD_KINDS.get(kind, kind)
    out: list[str] = []
    if kind == "classify":
        out.append(f"n {s['n']:,}  errors {s['n_errors']:,}")
        for k in ("substring", "exact", "corrected"):
            out.append(f"  {k:<10} {_fmt_acc(s[k])}")
        out.append(f"  corrected verdicts: {s['corrected_status']}")
        if "mapping" in s:
            m = s["mapping"]
            out.append(f"  label-set mapping ({m['mapper'] or 'no mapper'}, direct: {m['direct_rule']}): {m['how']}; "
                       f"needed mapping {m['needed_mapping']:,}")
            out.append(f"  macro P {m['precision']:.4f}  R {m['recall']:.4f}  F1 {m['f1']:.4f}  "
                       f"accuracy {m['accuracy']:.4f}")
    elif kind == "loglik":
        out.append(f"n {s['n']:,} images x {s['n_classes']:,} classes  errors {s['n_errors']:,}  "
                   f"misaligned {s.get('misaligned', 0):,}")
        for k in ("sum", "mean"):
            if k in s:
                out.append(f"  {k:<5} top-1 {s[k]['top1']:.2f}  top-5 {s[k]['top5']:.2f}")
        for k in ("sum_calibrated", "mean_calibrated", "sum_prior", "mean_prior"):
            if k in s:
                best = max(s[k].items(), key=lambda kv: kv[1]["top1"])
                out.append(f"  {k:<16} best alpha {best[0]}: top-1 {best[1]['top1']:.2f}  top-5 {best[1]['top5']:.2f}")
        if "cost_per_image" in s:
            c = s["cost_per_image"]
            out.append(f"  per image: {c['requests']:,.0f} requests here vs {c['reference_forwards']:,} forwards "
                       "in the reference loop")
    elif kind == "wikiqa":
        out.append(f"n {s['n']:,}  errors {s['n_errors']:,}")
        r, b = s["reference"], s["robust"]
        out.append(f"  reference (MMMU) {_fmt_acc(r)}  random guesses {r['random_guesses']:,} "
                   f"({r['random_right']:,} right)")
        out.append(f"  robust           {_fmt_acc(b)}  unparsed {b['unparsed']:,}")
    return out
