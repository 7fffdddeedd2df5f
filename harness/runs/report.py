"""Metrics of any run folder or result file, by run kind (what `harness report` and `harness.report` read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from harness.metrics.readers import SHARD_RESULTS
from harness.metrics.report import summarize_path as summarize_hierarchy

CLASSIFICATION_KINDS = ("classify", "loglik", "wikiqa")
_OLD_KINDS = {"generation": "classify"}  # run.json of folders written before the run kinds were unified


def run_kind(path: str | Path) -> str:
    """The kind recorded in a run folder's run.json (hierarchy for result files and older folders)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent if p.name == "results.jsonl" or SHARD_RESULTS.fullmatch(p.name) else None
    if folder is None or not (folder / "run.json").is_file():
        return "hierarchy"
    try:
        m = orjson.loads((folder / "run.json").read_bytes())
    except orjson.JSONDecodeError:
        return "hierarchy"
    kind = str(m.get("kind") or "hierarchy") if isinstance(m, dict) else "hierarchy"
    return _OLD_KINDS.get(kind, kind)


def summarize_path(path: str | Path, score_from: int | None = None) -> dict:
    """The summary dict of a run (`kind` says which metrics it carries)."""
    kind = run_kind(path)
    if kind in CLASSIFICATION_KINDS:
        from harness.runs.classification import summarize_folder

        p = Path(path)
        return {"kind": kind} | summarize_folder(p if p.is_dir() else p.parent)
    return {"kind": "hierarchy"} | summarize_hierarchy(path, score_from).to_json()


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


# The accuracy a classification run kind reports first (its reference scorer), as a path in its summary.
HEADLINE = {"classify": ("substring", "accuracy"), "loglik": ("sum", "top1"), "wikiqa": ("reference", "accuracy")}


def headline(summary: dict) -> tuple[float | None, float | None]:
    """(main score, leaf accuracy) of a summary from harness.runs.report.summarize_path, by its `kind`:
    a hierarchy run's HCA and leaf accuracy; a classification run's accuracy (`accuracy` when the
    summary has one, else its reference scorer's, `HEADLINE`) and no leaf."""
    kind = summary.get("kind", "hierarchy")
    if kind == "hierarchy":
        return _number(summary.get("hca")), _number(summary.get("leaf_acc"))
    if _number(summary.get("accuracy")) is not None:
        return _number(summary["accuracy"]), None
    node: Any = summary
    for k in HEADLINE.get(kind, ("accuracy",)):
        node = node.get(k) if isinstance(node, dict) else None
    return _number(node), None
