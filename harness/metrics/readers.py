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


def summarize_results(path: str | Path, protocol: str | None = None) -> Summary:
    """Metrics of a results.jsonl file, or of every results file of a run folder as one run (last line
    of a qid wins: --retry-errors appends; across a folder's files an answered line beats a failed one).

    `protocol` (default: the one in the run folder's run.json, else robust) picks the scoring: robust
    scores level by level (below); reference scores the run's reference-format export exactly as the
    authors' `metric.py` / `metric_binary.py` do (see `summarize_reference_run`).

    Memory and time are linear in the number of distinct qids: one small tuple a question, with
    repeated strings (item ids, truths, option texts) stored once. A torn or corrupt line is skipped."""
    if (protocol or run_protocol(path)) == "reference":
        return summarize_reference_run(path)
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
    """Metrics of a reference-format result file (a JSON list of dicts), as the authors' scripts
    compute them: `metric.py` for records with `ground_truth_levelN` / `predicted_levelN`,
    `metric_binary.py` for the yes/no statement runs (records with `choices_levelN` and one key per
    option text holding 1/0/-1, no `predicted_levelN`). See `summarize_reference_records`."""
    data = orjson.loads(Path(path).read_bytes())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of result records")  # noqa: TRY004 (callers catch ValueError)
    return summarize_reference_records(data, score_from)


def is_binary_export(data: list) -> bool:
    """A `metric_binary.py` input: level choices, no `predicted_levelN` keys anywhere."""
    recs = [r for r in data if isinstance(r, dict)]
    return (any("choices_level1" in r for r in recs)
            and not any(k.startswith("predicted_level") for r in recs for k in r))


def summarize_reference_records(data: list, score_from: int | None = None, binary: bool | None = None) -> Summary:
    """Metrics of reference-format records.

    `metric.py` (`extract_hierarchies_from_results`, protocol section 5): scoring starts at level 1
    unless level 1 is the taxonomy root (then 2), as the reference's `--cub` switch did; `score_from`
    overrides. The truth list and the prediction list are collected independently, each from
    `score_from` while its key exists, each skipping None values ("Unknown"/"Error" stay and count as
    wrong); a record whose truth list or prediction list is empty is left out of N. The lists may then
    differ in length (HCA fails, POR zips): a level asked with a None truth leaves its prediction in
    the list, so such an item can never be HCA-correct. Per-level accuracy is by position (level
    `score_from + j`).

    `metric_binary.py` (`extract_hierarchies_from_new_format`): always from level 1; per level while
    `ground_truth_levelN` and `choices_levelN` exist, the prediction is the first option (letter order)
    whose lower-cased text is a key of the record holding 1, else None (kept in the list, wrong). The
    answers are keyed by option text, so when two levels offer the same text (CUB: genus and species
    "geococcyx", "sayornis") the later level's answer is the one every level reads [reference bug]."""
    binary = is_binary_export(data) if binary is None else binary
    if binary:
        score_from = 1
    elif score_from is None:
        l1 = {str(r.get("ground_truth_level1", "")).lower() for r in data if isinstance(r, dict)}
        score_from = 2 if l1 and l1 <= ROOT_NAMES else 1
    start: int = score_from

    def collect(r: dict, key: str) -> list:
        out, lv = [], start
        while key.format(lv) in r:
            v = r[key.format(lv)]
            if v is not None:
                out.append(v)
            lv += 1
        return out

    def binary_preds(r: dict) -> list:
        out, lv = [], 1
        while f"ground_truth_level{lv}" in r and f"choices_level{lv}" in r:
            out.append(next((c for c in r[f"choices_level{lv}"].values()
                             if c.lower() in r and r[c.lower()] == 1), None))
            lv += 1
        return out

    def gen():
        # truths and predictions are collected independently, not aligned level by level: that is
        # what the reference metric does (see the docstring)
        for r in data:
            if not isinstance(r, dict):
                continue
            ts = collect(r, "ground_truth_level{}")
            ps = binary_preds(r) if binary else collect(r, "predicted_level{}")
            if not ts or not ps:
                continue
            yield range(start, start + len(ts)), ts, ps

    s = summarize(gen())
    s.n_questions = sum(s.per_level_n.values())
    return s


# ------------------------------------------------------------------ the reference protocol of a run

def run_protocol(path: str | Path) -> str:
    """The protocol a hierarchy run folder recorded (run.json settings.protocol); robust when the
    path has no readable run.json (a lone results file, an older folder)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    try:
        m = orjson.loads((folder / "run.json").read_bytes())
        proto = m["settings"]["protocol"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return "robust"
    return proto if proto in ("reference", "robust") else "robust"


def reference_export(path: str | Path, protocol: str | None = None) -> tuple[list[dict], int, bool]:
    """(records, first scored level, binary?) of a run in the reference result format: what the
    authors' scripts wrote, so their `utils/metric.py` (add `--cub` when the first scored level is 1)
    or `utils/metric_binary.py` (binary runs) reads it unchanged.

    Multiple-choice runs: per item `image` (the item id), levels 1..deepest with
    `ground_truth_levelN`, `predicted_levelN` (the option text; "Unknown" when unparsed, "Error" when
    the request failed), `predicted_levelN_letter`, `prediction_levelN` (raw answer) and
    `choices_levelN` (letter -> text). A level with no result line (robust runs do not ask a None
    truth; an unfinished run) gets None truth and prediction, which both scripts skip. Under robust a
    None-truth level's prediction is written None (robust skips it); under reference it is kept, as the
    reference text and GPT scripts kept it.

    Binary runs: per item and level (in order) `ground_truth_levelN`, `choices_levelN` and, per option
    in letter order, `"<option text>"` = 1/0/-1 (-1 also for a failed request) and
    `"<option text>_predction"` (the reference's key spelling) = the stripped, lower-cased answer; a
    later level's option of the same text overwrites the earlier one, as in the reference."""
    protocol = protocol or run_protocol(path)
    records = latest_records(path)
    by_item: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    binary = False
    for r in records:
        if r.get("level") is None or "item" not in r:
            continue
        binary |= r.get("option") is not None
        by_item[r["item"]][r["level"]].append(r)
    scored = [lv for levels in by_item.values() for lv, rs in levels.items()
              if any(x.get("scored", True) and x.get("truth") is not None for x in rs)]
    score_from = min(scored) if scored else 1
    out: list[dict] = []
    for item, levels in by_item.items():
        rec: dict = {"image": item}
        if binary:
            for lv in sorted(levels):
                stmts = sorted(levels[lv], key=lambda x: x.get("option") or "")
                choices = dict(stmts[0].get("choices") or {})
                for st in stmts:
                    text = choices.get(st.get("option"))
                    if text is None:
                        continue
                    raw = st.get("raw")
                    rec[f"{text}_predction"] = raw.strip().lower() if isinstance(raw, str) else "error"
                    yes = st.get("yes")
                    rec[text] = yes if yes in (0, 1) else -1
                rec[f"ground_truth_level{lv}"] = stmts[0].get("truth")
                rec[f"choices_level{lv}"] = choices
            out.append(rec)
            continue
        for lv in range(1, max(levels) + 1):
            rs = levels.get(lv)
            x = rs[-1] if rs else None
            truth = x.get("truth") if x else None
            if x is None or (truth is None and protocol != "reference"):
                pred = letter = raw = None
            else:
                pred = x.get("prediction")
                letter = x.get("letter")
                raw = x.get("raw")
                if pred is None:
                    pred = "Error" if x.get("error") is not None else "Unknown"
                    letter = "Error" if x.get("error") is not None else "Unknown"
                    raw = "Error" if raw is None else raw
            rec[f"ground_truth_level{lv}"] = truth
            rec[f"prediction_level{lv}"] = raw
            rec[f"predicted_level{lv}_letter"] = letter
            rec[f"predicted_level{lv}"] = pred
            rec[f"choices_level{lv}"] = (x.get("choices") if x else None) or {}
        out.append(rec)
    return out, score_from, binary


def write_reference_export(path: str | Path, out: str | Path, protocol: str | None = None) -> tuple[int, int, bool]:
    """Write the run's reference-format export to `out` (indented JSON list, as the reference wrote
    it); (records, first scored level, binary?)."""
    records, score_from, binary = reference_export(path, protocol)
    Path(out).write_bytes(orjson.dumps(records, option=orjson.OPT_INDENT_2))
    return len(records), score_from, binary


def _question_counts(records: list[dict]) -> tuple[int, int, int]:
    n_q = n_unans = n_err = 0
    for r in records:
        if r.get("auto") or r.get("level") is None:
            continue
        n_q += 1
        n_err += r.get("error") is not None
        if r.get("option") is not None:
            n_unans += r.get("yes") is None or r["yes"] < 0
        else:
            n_unans += r.get("prediction") is None
    return n_q, n_unans, n_err


def summarize_reference_run(path: str | Path) -> Summary:
    """A run scored under the reference protocol: its reference export read by the reference metric
    (`summarize_reference_records`), so `harness report RUN` equals `harness report` of the export and
    the authors' scripts on it. Differs from robust scoring only where the reference does: binary
    answers keyed by option text (the later level wins), a None-truth level asked (HCA always fails)."""
    records, score_from, binary = reference_export(path, "reference")
    s = summarize_reference_records(records, score_from, binary)
    s.n_questions, s.n_unanswered, s.n_errors = _question_counts(latest_records(path))
    return s
