"""The Python API: `run(spec)` and `report(paths)`, what the CLI, plans and notebooks call.

    import harness
    spec = harness.RunSpec(out="runs/qwen-cub", data="data/hierarchy/CUB200_with_similar_choice.jsonl",
                           backend={"endpoints": ["http://127.0.0.1:8000"]}, task={"mode": "text"})
    result = harness.run(spec)          # resumable: the same spec again continues the run
    print(result.summary["hca"], harness.report([spec.out])[0]["leaf_acc"])
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from harness.runs.execute import RunResult, execute
from harness.runs.report import summarize_path
from harness.runs.spec import RunSpec


def run(spec: RunSpec | dict, *, dry_run: bool = False, progress: bool = False) -> RunResult:
    """Run `spec` into `spec.out` (results.jsonl, run.json with the spec, summary.json) and return the
    outcome: `.summary` (the metrics), `.exit_code`, `.status`, `.message`. Running it again resumes."""
    if not isinstance(spec, RunSpec):
        spec = RunSpec.model_validate(spec)
    on_line = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    return execute(spec, dry_run=dry_run, progress=progress, on_line=on_line)


def report(paths: Sequence[str | Path] | str | Path, score_from: int | None = None) -> list[dict]:
    """The metrics of run folders or result files (any run kind), one dict a path, numbers unrounded
    as stored (`harness report --json` prints the same)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    return [summarize_path(p, score_from) | {"run": str(p)} for p in paths]
