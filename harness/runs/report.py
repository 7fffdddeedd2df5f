"""Metrics of any run folder or result file, by run kind (what `harness report` and `harness.report` read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from harness.metrics.readers import SHARD_RESULTS
from harness.metrics.report import summarize_path as summarize_hierarchy
from harness.runs.folder import OLD_KINDS

CLASSIFICATION_KINDS = ("classify", "loglik", "wikiqa")


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
    return OLD_KINDS.get(kind, kind)


def summarize_path(path: str | Path, score_from: int | None = None) -> dict:
    """The summary dict of a run (`kind` says which metrics it carries), with whether it is complete:
    `complete`, `n_not_asked` (questions of the run not answered yet: a run still going, or stopped),
    `n_failed`, `n_unparsed`. Raises ValueError for a file with no result lines."""
    p = Path(path)
    kind = run_kind(p)
    if kind in CLASSIFICATION_KINDS:
        from harness.runs.classification import summarize_folder

        folder = p if p.is_dir() else p.parent
        return completeness({"kind": kind} | summarize_folder(folder), *run_status(folder))
    summary = {"kind": "hierarchy"} | summarize_hierarchy(p, score_from).to_json()
    if not summary.get("n_questions") and not summary.get("n_items"):
        raise ValueError(f"{p}: no result lines (an empty file, or not a results file)")
    if p.is_file() and p.name.endswith(".json"):  # the reference format: a finished run's output
        return completeness(summary, "done", 0)
    folder = p if p.is_dir() else p.parent
    return completeness(summary, *run_status(folder))


def completeness(summary: dict, status: str | None, n_not_asked: int | None) -> dict:
    """`summary` with complete / n_not_asked / n_failed / n_unparsed (unparsed: answered, but no letter
    could be read; failed: no answer after retries)."""
    n_failed = int(summary.get("n_errors") or 0)
    n_unparsed = None
    if summary.get("kind", "hierarchy") == "hierarchy":
        n_unparsed = max(0, int(summary.get("n_unanswered") or 0) - n_failed)
    elif isinstance(summary.get("robust"), dict) and "unparsed" in summary["robust"]:
        n_unparsed = summary["robust"]["unparsed"]
    complete = status == "done" and n_not_asked == 0 and n_failed == 0
    return summary | {"complete": complete, "status": status, "n_not_asked": n_not_asked, "n_failed": n_failed,
                      "n_unparsed": n_unparsed}


def run_status(folder: Path) -> tuple[str | None, int | None]:
    """(the run's status from run.json, questions not asked yet) - None, None without a run.json."""
    if not (folder / "run.json").is_file():
        return None, None
    try:
        m = orjson.loads((folder / "run.json").read_bytes())
    except orjson.JSONDecodeError:
        return None, None
    status = m.get("status") if isinstance(m, dict) else None
    if status == "done":
        return status, 0
    return status, not_asked(folder, m)


def not_asked(folder: Path, manifest: dict) -> int | None:
    """How many questions of a run are not in its results yet (rendered from its recorded spec; None when
    that cannot be done here: the data file moved, an older run.json, a kind that needs its server)."""
    from harness.runs.experiments import experiment_for
    from harness.runs.folder import RunFolder
    from harness.runs.spec import RunSpec

    try:
        spec = RunSpec.model_validate(manifest["spec"]).model_copy(update={"shard": None})
        exp = experiment_for(spec, (manifest.get("settings") or {}).get("model") or spec.model or "")
        if getattr(exp, "kind", None) == "loglik":
            return None
        done = RunFolder(folder).done(repair=False)  # failed questions are n_failed, not 'not asked'
        return sum(len(u.groups) for u in exp.units(done))
    except (KeyError, ValueError, OSError, TypeError):
        return None


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
