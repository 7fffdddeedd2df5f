"""Metrics of result files: results.jsonl (last line of a qid wins) and the reference output format."""

from __future__ import annotations

import gc
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson

from harness.data.taxonomy import ROOT_NAMES
from harness.metrics.hierarchy import Summary, summarize


SHARD_RESULTS = re.compile(r"results\.shard-(\d+)-of-(\d+)\.jsonl")
"""The results file of shard I of N (`--shard I/N`); an unsharded run writes results.jsonl."""


def results_files(path: str | Path) -> list[Path]:
    """The results files of a run folder, read as one run: results.jsonl, then every
    results.shard-I-of-N.jsonl in (N, I) order; a file path is itself."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    shards = sorted((int(m[2]), int(m[1]), f) for f in p.glob("results.shard-*-of-*.jsonl")
                    if (m := SHARD_RESULTS.fullmatch(f.name)))
    return ([p / "results.jsonl"] if (p / "results.jsonl").is_file() else []) + [f for *_, f in shards]


def iter_records(path: str | Path) -> Iterator[dict]:
    """Every parseable line of a results file, or of every results file of a run folder (a torn or
    corrupt line is skipped)."""
    for file in results_files(path):
        with file.open("rb") as f:
            for line in f:
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue


def latest_records(path: str | Path) -> list[dict]:
    """One line a qid of a results file or run folder: within a file the last line wins
    (--retry-errors appends); across the files of a folder an answered line wins over a failed one."""
    latest: dict[str, dict] = {}
    for file in results_files(path):
        this: dict[str, dict] = {}
        for rec in iter_records(file):
            if isinstance(rec, dict) and "qid" in rec:
                this[rec["qid"]] = rec
        for qid, rec in this.items():
            old = latest.get(qid)
            if old is None or rec.get("error") is None or old.get("error") is not None:
                latest[qid] = rec
    return list(latest.values())


def _paths_from_levels(per_item: dict[str, dict[int, tuple[str | None, str | None, bool]]]):
    for levels in per_item.values():
        ls, ts, ps = [], [], []
        for lv in sorted(levels):
            truth, pred, scored = levels[lv]
            if truth is None or not scored:
                continue
            ls.append(lv)
            ts.append(truth)
            ps.append(pred)
        yield ls, ts, ps


def summarize_results(path: str | Path) -> Summary:
    """Metrics of a results.jsonl file, or of every results file of a run folder as one run (last line
    of a qid wins: --retry-errors appends; across a folder's files an answered line beats a failed one).

    Memory and time are linear in the number of distinct qids: one small tuple a question, with
    repeated strings (item ids, truths, option texts) stored once. A torn or corrupt line is skipped."""
    files = results_files(path)
    latest: dict[str, tuple] = {}
    strings: dict[str, str] = {}
    same = strings.setdefault  # perf/memory: one object per distinct string (4-12 levels share an item)
    gc_was_enabled = gc.isenabled()
    # perf: a million retained tuples would make every cyclic-GC pass rescan all of them (the report
    # spent most of its time there); nothing built here is cyclic.
    gc.disable()
    try:
        for k, file in enumerate(files):
            # several files (shards): a qid already answered in an earlier file keeps that answer
            # over a failed line of a later one (only set up when there is more than one file)
            this: set[str] | None = set() if k else None
            for rec in iter_records(file):
                if not isinstance(rec, dict) or "qid" not in rec:
                    continue
                if this is not None:
                    qid = rec["qid"]
                    if rec.get("error") is not None and qid not in this and (old := latest.get(qid)) is not None \
                            and not old[5]:
                        continue
                    this.add(qid)
                get = rec.get
                item, truth, pred, option = rec["item"], get("truth"), get("prediction"), get("option")
                latest[rec["qid"]] = (
                    same(item, item), rec["level"],
                    truth if truth is None else same(truth, truth),
                    pred if pred is None else same(pred, pred),
                    get("scored", True), get("error") is not None, option, get("yes"), get("auto", False),
                    get("choices") if option is not None else None,  # only binary lines need it
                )
        per_item: dict[str, dict[int, tuple]] = defaultdict(dict)
        binary: dict[tuple[str, int], list] = defaultdict(list)
        n_q = n_unans = n_err = 0
        for item, level, truth, pred, scored, err, option, yes, auto, choices in latest.values():
            if option is not None:  # binary statement: collected per level below
                binary[(item, level)].append((option, yes, truth, scored, choices))
                n_q += 1
                n_err += err
                n_unans += yes is None or yes < 0
                continue
            if not auto:
                n_q += 1
                n_err += err
                n_unans += pred is None
            per_item[item][level] = (truth, pred, scored)
        del latest
        for (item, level), stmts in binary.items():
            # reference: the first option (in letter order) answered Yes; none -> wrong
            stmts.sort(key=lambda st: st[0])
            truth, scored, choices = stmts[0][2], stmts[0][3], stmts[0][4] or {}
            yes_letter = next((o for o, y, *_ in stmts if y == 1), None)
            per_item[item][level] = (truth, choices.get(yes_letter) if yes_letter else None, scored)
        s = summarize(_paths_from_levels(per_item))
    finally:
        if gc_was_enabled:
            gc.enable()
    s.n_questions, s.n_unanswered, s.n_errors = n_q, n_unans, n_err
    return s


def summarize_reference(path: str | Path, score_from: int | None = None) -> Summary:
    """Metrics of a reference-format result file: a JSON list of dicts with `ground_truth_levelN`,
    `predicted_levelN`. Scoring starts at level 1 unless level 1 is the taxonomy root (then 2), as
    the reference's `--cub` switch did; `score_from` overrides.

    Extraction is the reference's (`extract_hierarchies_from_results`, protocol section 5): the truth
    list and the prediction list are collected independently, each from `score_from` while its key
    exists, each skipping None values ("Unknown"/"Error" stay and count as wrong); a record whose
    truth list or prediction list is empty is left out of N. The lists may then differ in length
    (HCA fails, POR zips); per-level accuracy is by position (level `score_from + j`)."""
    data = orjson.loads(Path(path).read_bytes())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of result records")
    if score_from is None:
        l1 = {str(r.get("ground_truth_level1", "")).lower() for r in data if isinstance(r, dict)}
        score_from = 2 if l1 and l1 <= ROOT_NAMES else 1

    def collect(r: dict, key: str) -> list:
        out, lv = [], score_from
        while key.format(lv) in r:
            v = r[key.format(lv)]
            if v is not None:
                out.append(v)
            lv += 1
        return out

    def gen():
        # FIX: this used to align predictions to truths level by level (a None prediction counted as
        # a miss, a prediction at a None-truth level was dropped, records with no prediction stayed
        # in N), which is not what the reference metric does (see the docstring).
        for r in data:
            if not isinstance(r, dict):
                continue
            ts = collect(r, "ground_truth_level{}")
            ps = collect(r, "predicted_level{}")
            if not ts or not ps:
                continue
            yield range(score_from, score_from + len(ts)), ts, ps

    s = summarize(gen())
    s.n_questions = sum(s.per_level_n.values())
    return s


