"""The paper's before/after comparison: visual and text-only HCA of the base and the tuned model.

Four ordinary runs (base/tuned x image/text RunSpecs) on the same held-out items, each in its own
run folder under `out` (so each resumes on its own), then `harness report`'s metrics side by side and
the tuned-minus-base deltas per mode. The paper's finding to check: finetuning on visual questions
raises text HCA more than visual HCA (iNat21-Plant: +20.66 vs +11.67).

The tuned model is whatever a server serves: a LoRA adapter name on the base model's vLLM server
(`--enable-lora --lora-modules tuned=ADAPTER`, one endpoint for both), or a merged model folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from harness.data.items import ItemError
from harness.runs.execute import RunResult, execute
from harness.runs.folder import ExitCode
from harness.runs.spec import RunSpec

MODES = ("image", "text")


@dataclass(frozen=True)
class Side:
    """One model of the comparison: its name in requests (or a local path) and its endpoints (or none:
    the run then starts a local server for the path)."""

    label: str
    model: str
    endpoints: tuple[str, ...] = ()


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def side_spec(side: Side, mode: str, data: str | Path, out: str | Path, options: Mapping[str, Any] | RunSpec = ()) -> RunSpec:
    """The RunSpec of one side in one mode: `options` (RunSpec fields shared by every run, e.g.
    {"image_root_map": [...], "backend": {"concurrency": 8}}, or a whole RunSpec as a template) with
    this side's model, endpoints, mode, items and run folder `out/<label>-<mode>`."""
    base = options.model_dump(mode="json") if isinstance(options, RunSpec) else dict(options)
    own = {"out": str(Path(out) / f"{side.label}-{mode}"), "data": str(data), "model": side.model,
           "backend": {"endpoints": list(side.endpoints)}, "task": {"mode": mode}}
    return RunSpec.model_validate(_merge(base, own))


def compare(base: Side, tuned: Side, data: str | Path, out: str | Path, *, modes=MODES,
            options: Mapping[str, Any] | RunSpec = (), progress: bool = False,
            on_result: Callable[[str, RunResult], None] | None = None) -> dict:
    """Run the four evaluations (harness.runs: the lifecycle `harness.run` calls; each resumes on its
    own) and write `compare.json` and `compare.md`. `options`: see `side_spec`; `on_result(name,
    result)` sees each run's outcome (a console prints its lines)."""
    from harness.metrics.report import rows, to_markdown

    if not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such items file")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; use image and/or text")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codes: dict[str, int] = {}
    errors: dict[str, str] = {}
    for side in (base, tuned):
        for mode in modes:
            name = f"{side.label}-{mode}"
            try:
                result = execute(side_spec(side, mode, data, out, options), progress=progress, quiet_server=not progress)
            except (ItemError, FileNotFoundError, ValueError, KeyError) as e:  # input the run refused before starting
                codes[name], errors[name] = int(ExitCode.INPUT), str(e)
                continue
            codes[name] = int(result.exit_code)
            if result.message:
                errors[name] = result.message
            if on_result is not None:
                on_result(name, result)
    present = [k for k in codes if (out / k / "results.jsonl").exists()]
    summaries = dict(zip(present, (s for _, s in rows([str(out / k) for k in present])), strict=True))
    deltas = {}
    for mode in modes:
        b, t = summaries.get(f"{base.label}-{mode}"), summaries.get(f"{tuned.label}-{mode}")
        if b is None or t is None:
            continue
        deltas[mode] = {
            "base_hca": b.hca, "tuned_hca": t.hca, "delta_hca": t.hca - b.hca,
            "base_leaf_acc": b.leaf_acc, "tuned_leaf_acc": t.leaf_acc, "delta_leaf_acc": t.leaf_acc - b.leaf_acc,
            "n_items": t.n_items, "base_unanswered": b.n_unanswered, "tuned_unanswered": t.n_unanswered,
        }
    result = {
        "data": str(data), "base": base.model, "tuned": tuned.model, "exit_codes": codes, "deltas": deltas,
        "runs": {k: s.to_json() for k, s in summaries.items()},
    }
    if errors:
        result["errors"] = errors
    if "image" in deltas and "text" in deltas:
        result["text_gain_minus_visual_gain"] = deltas["text"]["delta_hca"] - deltas["image"]["delta_hca"]
    (out / "compare.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out / "compare.md").write_text(to_markdown_deltas(deltas) + "\n" + to_markdown(
        [(k, summaries[k]) for k in present]))
    return result


def to_markdown_deltas(deltas: dict) -> str:
    lines = ["| mode | base HCA | tuned HCA | Δ HCA | base leaf | tuned leaf | Δ leaf | items |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, d in deltas.items():
        lines.append(f"| {mode} | {d['base_hca']:.2f} | {d['tuned_hca']:.2f} | {d['delta_hca']:+.2f} | "
                     f"{d['base_leaf_acc']:.2f} | {d['tuned_leaf_acc']:.2f} | {d['delta_leaf_acc']:+.2f} | {d['n_items']} |")
    return "\n".join(lines) + "\n"
