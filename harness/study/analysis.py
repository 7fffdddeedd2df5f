"""Analyses across finished runs: the questions the studies answer with many runs at once.

- a results table across runs (rich, CSV, markdown), each run described by its manifest (run.json)
  and, for plan cells, by plan-cell.json (short model name, the profile's prompt variant);
- text HCA vs visual HCA across models: Pearson and Spearman with percentile bootstrap intervals
  that resample models (a model's taxonomies stay together), and the least-squares fit;
- the leaf-accuracy vs HCA gap; per-level accuracy curves;
- prompt-variant spread (mean, std, min, max of HCA over variants, per model and taxonomy);
- before/after finetuning deltas (text and visual HCA).

`analyze()` writes CSV/markdown/JSON tables, PNG figures (harness.study.figures) and report.md embedding
them. Needs scipy and matplotlib (the `[analysis]` extra).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson

from harness.metrics.readers import results_files
from harness.metrics.report import summarize_path
from harness.runs.report import headline, run_kind
from harness.runs.report import summarize_path as summarize_run
from harness.study.records import (
    Correlation,
    Delta,
    Point,
    RunInfo,
    Spread,
    asked_levels,
    level_name,
    read_json,
)

__all__ = [
    "Correlation",
    "Delta",
    "Point",
    "RunInfo",
    "Spread",
    "analyze",
    "correlate",
    "find_runs",
    "finetune_deltas",
    "fmt",
    "leaf_gap",
    "load_run",
    "load_runs",
    "text_visual_points",
    "variant_spread",
]


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def find_runs(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(run path, label) for each argument: a run folder, a result file, or a folder searched
    recursively for run folders (labels relative to it)."""
    out: list[tuple[Path, str]] = []
    for a in paths:
        p = Path(a)
        if p.is_file():
            out.append((p, p.parent.name if p.name == "results.jsonl" else p.name))
        elif p.is_dir() and results_files(p):
            out.append((p, p.name or str(p)))
        elif p.is_dir():
            found = sorted({f.parent for f in p.rglob("results*.jsonl") if results_files(f.parent)})
            if not found:
                raise FileNotFoundError(f"{p}: no run folders (results.jsonl) under this folder")
            out += [(f, str(f.relative_to(p))) for f in found]
        else:
            raise FileNotFoundError(f"{p}: no such run folder or file")
    return out




def _s(v) -> str | None:
    return None if v is None else str(v)


def load_run(path: str | Path, label: str | None = None) -> RunInfo:
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    manifest = read_json(folder / "run.json") if (p.is_dir() or p.name == "results.jsonl") else {}
    settings = manifest.get("settings", {}) if isinstance(manifest.get("settings"), dict) else {}
    prompt = settings.get("prompt", {}) if isinstance(settings.get("prompt"), dict) else {}
    cell = read_json(folder / "plan-cell.json") if (p.is_dir() or p.name == "results.jsonl") else {}
    label = label or (folder.name if p.is_dir() else p.name)
    served = settings.get("model")
    model = cell.get("model") or served or label
    names = frozenset(n for n in (cell.get("model"), served, cell.get("profile"), model) if n)
    data = settings.get("data") or cell.get("data")
    return RunInfo(
        label=label, path=p, model=model, names=names,
        taxonomy=prompt.get("taxonomy") or cell.get("taxonomy"),
        mode=prompt.get("mode") or cell.get("mode"),
        variant=_s(prompt.get("variant", cell.get("variant"))),
        profile_variant=_s(cell.get("profile_variant")),
        answer=settings.get("answer") or cell.get("answer"),
        protocol=settings.get("protocol") or cell.get("protocol"),
        data=Path(data).name if data else None,
        summary=summarize_path(p),
    )


def load_runs(paths: Sequence[str | Path]) -> list[RunInfo]:
    """The hierarchy runs among `paths` (what the cross-run hierarchy analyses use)."""
    return [load_run(p, label) for p, label in find_runs(paths) if run_kind(p) == "hierarchy"]


CLASSIFICATION_COLUMNS = ["run", "kind", "model", "dataset", "n", "accuracy", "n_errors"]


def classification_rows(paths: Sequence[str | Path]) -> list[dict]:
    """One row per classification run (classify, loglik, wikiqa) among `paths`: its headline accuracy
    (the kind's reference scorer, harness.runs.report.headline) beside the run's identity."""
    rows = []
    for p, label in find_runs(paths):
        if run_kind(p) == "hierarchy":
            continue
        folder = p if p.is_dir() else p.parent
        summary = summarize_run(folder)
        settings = read_json(folder / "run.json").get("settings") or {}
        rows.append({"run": label, "kind": summary["kind"], "model": settings.get("model"),
                     "dataset": settings.get("dataset") or Path(str(settings.get("data") or "")).name or None,
                     "n": summary.get("n"), "accuracy": headline(summary)[0], "n_errors": summary.get("n_errors")})
    return rows


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _key(r: RunInfo) -> tuple:
    """What must match for two runs to measure the same thing (model and mode aside)."""
    return (r.taxonomy, r.data, r.answer, r.protocol)


def _prefer_profile_variant(rs: list[RunInfo]) -> list[RunInfo]:
    """Of several runs of one (model, benchmark, mode), the one(s) with the model's own variant."""
    best = [r for r in rs if r.is_profile_variant]
    return best or rs


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ["run", "model", "taxonomy", "mode", "variant", "answer", "protocol", "data", "n_items", "hca",
                 "hca_ci_lo", "hca_ci_hi", "leaf_acc", "leaf_minus_hca", "por", "strict_por", "tor",
                 "leaf_right_ancestor_wrong", "n_questions", "n_unanswered"]


def table_rows(runs: Sequence[RunInfo]) -> list[dict]:
    rows = []
    for r in runs:
        s = r.summary
        rows.append({"run": r.label, "model": r.model, "taxonomy": r.taxonomy, "mode": r.mode, "variant": r.variant,
                     "answer": r.answer, "protocol": r.protocol, "data": r.data, "n_items": s.n_items,
                     "hca": s.hca, "hca_ci_lo": s.hca_ci[0], "hca_ci_hi": s.hca_ci[1], "leaf_acc": s.leaf_acc,
                     "leaf_minus_hca": s.leaf_acc - s.hca, "por": s.por, "strict_por": s.strict_por, "tor": s.tor,
                     "leaf_right_ancestor_wrong": s.leaf_right_ancestor_wrong, "n_questions": s.n_questions,
                     "n_unanswered": s.n_unanswered,
                     **{f"level{lv}": acc for lv, acc in s.per_level.items()}})
    return rows


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def to_csv(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    cols = list(columns or _all_columns(rows))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for row in rows:
        w.writerow(["" if row.get(c) is None else (round(row[c], 4) if isinstance(row.get(c), float) else row[c])
                    for c in cols])
    return buf.getvalue()


def _all_columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    return cols


def to_markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_table(rows: Sequence[dict], columns: Sequence[str], title: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c in ("run", "model", "taxonomy", "mode", "text_model", "data") else "right",
                     overflow="fold")
    for row in rows:
        t.add_row(*[fmt(row.get(c)) for c in columns])
    console.print(t)


# --------------------------------------------------------------------------------------------------
# Text vs visual HCA
# --------------------------------------------------------------------------------------------------


def text_visual_points(runs: Sequence[RunInfo], pair_text: dict[str, str] | None = None) -> list[Point]:
    """Pair each VLM's image runs with the text runs of the same model (or of `pair_text[model]`,
    e.g. its original LLM) on the same items file, answer mode and protocol. Several runs of one side
    (prompt variants) are reduced to the model's own variant when known, else averaged."""
    pair_text = pair_text or {}
    text_by: dict[tuple, list[RunInfo]] = defaultdict(list)
    for r in runs:
        if r.mode == "text":
            for n in r.names:
                text_by[(n, *_key(r))].append(r)
    visual: dict[tuple, list[RunInfo]] = defaultdict(list)
    for r in runs:
        if r.mode == "image":
            visual[(r.model, *_key(r))].append(r)
    points = []
    for (model, *key), vs in visual.items():
        names = vs[0].names
        target = next((pair_text[n] for n in names if n in pair_text), None)
        ts = text_by.get((target or model, *key), [])
        if not ts:
            continue
        vs, ts = _prefer_profile_variant(vs), _prefer_profile_variant(list(dict.fromkeys(ts)))
        points.append(Point(model=model, text_model=ts[0].model, taxonomy=key[0], data=key[1],
                            visual_hca=_mean(r.hca for r in vs), text_hca=_mean(r.hca for r in ts),
                            visual_leaf=_mean(r.leaf for r in vs), n_visual_runs=len(vs), n_text_runs=len(ts)))
    return sorted(points, key=lambda p: (p.taxonomy or "", p.model))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xm, ym = x - x.mean(), y - y.mean()
    d = math.sqrt(float((xm * xm).sum() * (ym * ym).sum()))
    return float((xm * ym).sum() / d) if d > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def correlate(x: Sequence[float], y: Sequence[float], groups: Sequence[str] | None = None, *, draws: int = 2000,
              seed: int = 0, scope: str = "all") -> Correlation:
    """Pearson and Spearman of y on x, with 95% percentile bootstrap intervals that resample groups
    (models) with replacement; draws with fewer than 3 distinct models or a constant side are
    dropped. Fewer than 3 points (or 3 groups, for the intervals) give NaN."""
    from scipy import stats

    xa, ya = np.asarray(x, float), np.asarray(y, float)
    groups = list(groups) if groups is not None else [str(i) for i in range(len(xa))]
    uniq = list(dict.fromkeys(groups))
    nan2 = (float("nan"), float("nan"))
    n = len(xa)
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return Correlation(scope, n, len(uniq), float("nan"), float("nan"), nan2, float("nan"), float("nan"), nan2,
                           float("nan"), float("nan"))
    pr = stats.pearsonr(xa, ya)
    sr = stats.spearmanr(xa, ya)
    slope, intercept = np.polyfit(xa, ya, 1)
    idx = {g: [i for i, gg in enumerate(groups) if gg == g] for g in uniq}
    p_ci = s_ci = nan2
    if len(uniq) >= 3 and draws > 0:
        rng = np.random.default_rng(seed)
        ps, ss = [], []
        for _ in range(draws):
            pick = rng.integers(0, len(uniq), len(uniq))
            if len(set(pick.tolist())) < 3:  # two distinct models always correlate +-1: no information
                continue
            ii = np.fromiter((i for k in pick for i in idx[uniq[k]]), int)
            bx, by = xa[ii], ya[ii]
            if np.ptp(bx) == 0 or np.ptp(by) == 0:
                continue
            ps.append(_pearson(bx, by))
            ss.append(_pearson(_ranks(bx), _ranks(by)))
        if ps:
            p_ci = tuple(float(v) for v in np.percentile(ps, [2.5, 97.5]))  # type: ignore[assignment]
            s_ci = tuple(float(v) for v in np.percentile(ss, [2.5, 97.5]))  # type: ignore[assignment]
    return Correlation(scope, n, len(uniq), float(pr.statistic), float(pr.pvalue), p_ci, float(sr.statistic),
                       float(sr.pvalue), s_ci, float(slope), float(intercept))


def correlations(points: Sequence[Point], *, draws: int = 2000, seed: int = 0) -> list[Correlation]:
    """Over all points (bootstrap over models) and per taxonomy (points = models)."""
    out = [correlate([p.text_hca for p in points], [p.visual_hca for p in points], [p.model for p in points],
                     draws=draws, seed=seed, scope="all")]
    by_tax: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        by_tax[p.taxonomy or "-"].append(p)
    if len(by_tax) > 1:
        for tax, ps in sorted(by_tax.items()):
            out.append(correlate([p.text_hca for p in ps], [p.visual_hca for p in ps], [p.model for p in ps],
                                 draws=draws, seed=seed, scope=tax))
    return out


# --------------------------------------------------------------------------------------------------
# Leaf vs HCA, per level, variant spread, finetuning deltas
# --------------------------------------------------------------------------------------------------


def leaf_gap(runs: Sequence[RunInfo]) -> list[dict]:
    """Leaf accuracy minus HCA per run (image/binary runs: a text run's leaf is filled in, always 100)."""
    return [{"run": r.label, "model": r.model, "taxonomy": r.taxonomy, "mode": r.mode, "hca": r.hca, "leaf_acc": r.leaf,
             "gap": r.leaf - r.hca, "leaf_right_ancestor_wrong": r.summary.leaf_right_ancestor_wrong}
            for r in runs if r.mode != "text"]


def per_level_rows(runs: Sequence[RunInfo]) -> list[dict]:
    return [{"run": r.label, "model": r.model, "taxonomy": r.taxonomy, "mode": r.mode, "level": int(lv),
             "level_name": level_name(r.taxonomy, lv), "accuracy": acc, "n": r.summary.per_level_n.get(lv, 0)}
            for r in runs for lv, acc in asked_levels(r)]


def variant_spread(runs: Sequence[RunInfo]) -> list[Spread]:
    """HCA over prompt variants, for each (model, benchmark, mode, answer, protocol) run with >= 2 variants."""
    groups: dict[tuple, dict[str, RunInfo]] = defaultdict(dict)
    for r in runs:
        if r.variant is not None:
            groups[(r.model, r.mode, *_key(r))][r.variant] = r
    out = []
    for (model, mode, tax, data, _a, _p), by_v in groups.items():
        if len(by_v) < 2:
            continue
        vs = sorted(by_v, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
        h = np.array([by_v[v].hca for v in vs])
        leaf = np.array([by_v[v].leaf for v in vs])
        out.append(Spread(model, tax, mode, data, tuple(vs), tuple(float(x) for x in h), float(h.mean()),
                          float(h.std()), float(h.min()), float(h.max()), float(leaf.mean()), float(leaf.std())))
    return sorted(out, key=lambda s: (s.model, s.taxonomy or "", s.mode or "", s.data or ""))


def _side(runs: Sequence[RunInfo], sel: str) -> list[RunInfo]:
    base = Path(sel).resolve()
    return [r for r in runs if sel in r.names or base == r.path.resolve() or base in r.path.resolve().parents]


def finetune_deltas(runs: Sequence[RunInfo], compare: Sequence[tuple[str, str]]) -> list[Delta]:
    """For each (BEFORE, AFTER) selector (a model name, or a folder holding runs), the HCA and leaf
    change on every benchmark/mode/variant both sides ran."""
    out = []
    for before, after in compare:
        b = {(r.mode, r.variant, *_key(r)): r for r in _side(runs, before)}
        a = {(r.mode, r.variant, *_key(r)): r for r in _side(runs, after)}
        if not b or not a:
            missing = before if not b else after
            raise ValueError(f"--compare {before}={after}: no runs match {missing!r} (a model name or a folder)")
        for k in sorted(set(b) & set(a), key=str):
            rb, ra = b[k], a[k]
            out.append(Delta(rb.taxonomy, rb.mode, rb.data, rb.variant, before, after, rb.hca, ra.hca, rb.leaf, ra.leaf))
    return out


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------


@dataclass
class Analysis:
    runs: list[RunInfo]
    points: list[Point]
    correlations: list[Correlation]
    gaps: list[dict]
    levels: list[dict]
    spreads: list[Spread]
    deltas: list[Delta]
    classification: list[dict] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _corr_row(c: Correlation) -> dict:
    return {"scope": c.scope, "n": c.n, "models": c.n_models, "pearson": c.pearson, "pearson_lo": c.pearson_ci[0],
            "pearson_hi": c.pearson_ci[1], "pearson_p": c.pearson_p, "spearman": c.spearman,
            "spearman_lo": c.spearman_ci[0], "spearman_hi": c.spearman_ci[1], "spearman_p": c.spearman_p,
            "slope": c.slope, "intercept": c.intercept}


def _spread_row(s: Spread) -> dict:
    return {"model": s.model, "taxonomy": s.taxonomy, "mode": s.mode, "data": s.data, "variants": ",".join(s.variants),
            "mean": s.mean, "std": s.std, "min": s.min, "max": s.max, "range": s.max - s.min,
            "leaf_mean": s.leaf_mean, "leaf_std": s.leaf_std}


def _delta_row(d: Delta) -> dict:
    return {"before": d.before, "after": d.after, "taxonomy": d.taxonomy, "mode": d.mode, "variant": d.variant,
            "hca_before": d.hca_before, "hca_after": d.hca_after, "hca_delta": d.hca_delta,
            "leaf_before": d.leaf_before, "leaf_after": d.leaf_after, "leaf_delta": d.leaf_delta}


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError


def _clean(v):
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def analyze(runs: Sequence[RunInfo], out: str | Path, *, pair_text: dict[str, str] | None = None,
            compare: Sequence[tuple[str, str]] = (), draws: int = 2000, figures: bool = True,
            classification: Sequence[dict] = ()) -> Analysis:
    """Compute every analysis, write tables (CSV, markdown), analysis.json, figures and report.md.
    `classification`: rows of classification_rows(), tabulated beside the hierarchy runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = list(runs)
    points = text_visual_points(runs, pair_text)
    corrs = correlations(points, draws=draws) if points else []
    an = Analysis(runs, points, corrs, leaf_gap(runs), per_level_rows(runs), variant_spread(runs),
                  finetune_deltas(runs, compare), list(classification))
    rows = table_rows(runs)
    tables = {
        "runs": (rows, TABLE_COLUMNS),
        "text_vs_visual": ([asdict(p) for p in points], None),
        "correlation": ([_corr_row(c) for c in corrs], None),
        "leaf_gap": (an.gaps, None),
        "per_level": (an.levels, None),
        "variant_spread": ([_spread_row(s) for s in an.spreads], None),
        "finetune_deltas": ([_delta_row(d) for d in an.deltas], None),
        "classification": (list(classification), CLASSIFICATION_COLUMNS),
    }
    for name, (trs, cols) in tables.items():
        if trs:
            p = out / f"{name}.csv"
            p.write_text(to_csv(trs, cols))
            an.files[name] = p
    (out / "analysis.json").write_bytes(orjson.dumps(_clean({k: v[0] for k, v in tables.items()}),
                                                     option=orjson.OPT_INDENT_2, default=_json_default))
    an.files["json"] = out / "analysis.json"
    if figures:
        from harness.study import figures as fig  # matplotlib only when drawing

        if points:
            an.figures["text_vs_visual"] = fig.text_visual_scatter(points, corrs[0], out / "text_vs_visual.png")
        if an.levels:
            an.figures["per_level"] = fig.per_level_curves(runs, out / "per_level.png")
        if an.gaps:
            an.figures["hca_vs_leaf"] = fig.hca_leaf_bars(runs, out / "hca_vs_leaf.png")
        if an.spreads:
            an.figures["variant_spread"] = fig.variant_spread_plot(an.spreads, out / "variant_spread.png")
        if an.deltas:
            an.figures["finetune_deltas"] = fig.finetune_delta_bars(an.deltas, out / "finetune_deltas.png")
    (out / "report.md").write_text(report_markdown(an))
    an.files["report"] = out / "report.md"
    return an


SHORT_COLUMNS = ["run", "model", "taxonomy", "mode", "variant", "n_items", "hca", "leaf_acc", "leaf_minus_hca",
                 "n_unanswered"]


def report_markdown(an: Analysis) -> str:
    """report.md: the tables and the figures (relative links) in one page."""
    md = ["# Analysis report", "", f"{len(an.runs)} runs.", ""]

    def img(name: str, title: str) -> None:
        if name in an.figures:
            md.extend([f"![{title}]({an.figures[name].name})", ""])

    md += ["## Results", "", to_markdown(table_rows(an.runs), SHORT_COLUMNS)]
    if an.classification:
        md += ["## Classification runs", "", to_markdown(an.classification, CLASSIFICATION_COLUMNS)]
    md += ["## Text HCA vs visual HCA", ""]
    if an.points:
        img("text_vs_visual", "text vs visual HCA")
        md.append(to_markdown([_corr_row(c) for c in an.correlations],
                              ["scope", "n", "models", "pearson", "pearson_lo", "pearson_hi", "spearman", "spearman_lo",
                               "spearman_hi", "slope", "intercept"]))
        md.append("Intervals: 95% percentile bootstrap over models. Points:\n")
        md.append(to_markdown([asdict(p) for p in an.points],
                              ["model", "text_model", "taxonomy", "text_hca", "visual_hca", "visual_leaf"]))
    else:
        md.append("No model has both image and text runs on the same items file (see --pair-text).\n")
    md += ["## Leaf accuracy vs HCA", ""]
    img("hca_vs_leaf", "HCA vs leaf accuracy")
    if an.gaps:
        md.append(to_markdown(an.gaps, ["run", "model", "taxonomy", "hca", "leaf_acc", "gap", "leaf_right_ancestor_wrong"]))
    md += ["## Per-level accuracy", ""]
    img("per_level", "per-level accuracy")
    if an.spreads:
        md += ["## Prompt-variant spread (HCA)", ""]
        img("variant_spread", "prompt variant spread")
        md.append(to_markdown([_spread_row(s) for s in an.spreads],
                              ["model", "taxonomy", "mode", "data", "variants", "mean", "std", "min", "max", "range"]))
        md.append("std: population standard deviation over the variants.\n")
    if an.deltas:
        md += ["## Finetuning deltas", ""]
        img("finetune_deltas", "finetuning deltas")
        md.append(to_markdown([_delta_row(d) for d in an.deltas],
                              ["before", "after", "taxonomy", "mode", "variant", "hca_before", "hca_after", "hca_delta",
                               "leaf_delta"]))
        by_mode: dict[str, list[float]] = defaultdict(list)
        for d in an.deltas:
            by_mode[d.mode or "-"].append(d.hca_delta)
        md.append("Mean HCA change: " + ", ".join(f"{m} {_mean(v):+.2f}" for m, v in sorted(by_mode.items())) + "\n")
    return "\n".join(md)
