"""The cells of a plan: its grid expanded in a fixed order, each cell one command line with its own
run folder `OUT/<model>/<cell>`, and the state of a cell on disk (done, partial, missing, blocked).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from harness.serving.profiles import load_profile
from harness.study.plan_spec import Benchmark, ModelEntry, PlanSpec, Variant, Vars

__all__ = [
    "CELL_FILE",
    "Cell",
    "CellState",
    "Expansion",
    "blocked_reason",
    "cell_state",
    "expand",
    "select_models",
]

CELL_FILE = "plan-cell.json"


# --------------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One run of the grid. `args` is the command line without endpoint and model (added at run time)."""

    key: str
    model: str
    benchmark: str
    choice: str
    mode: str | None
    variant: Variant | None
    profile_variant: Variant | None
    answer: str | None
    protocol: str
    axes: tuple[tuple[str, str], ...]
    data: str
    out: Path
    args: tuple[str, ...]
    needs: tuple[str, ...] = ()
    """Unset variables this cell's arguments refer to."""
    n_cmd: int = 1
    """How many leading words of `args` are the subcommand (e.g. 2 for `classify run`)."""

    def command(self, endpoints: Sequence[str], served: str | None) -> list[str]:
        head, rest = list(self.args[:self.n_cmd]), list(self.args[self.n_cmd:])
        extra: list[str] = []
        for e in endpoints:
            extra += ["--endpoint", e]
        if served:
            extra += ["--model", served]
        return head + extra + rest

    def meta(self, plan: str, entry: ModelEntry, taxonomy: str | None) -> dict:
        return {"plan": plan, "key": self.key, "model": self.model, "profile": entry.profile, "benchmark": self.benchmark,
                "taxonomy": taxonomy, "choice": self.choice, "mode": self.mode, "variant": self.variant,
                "profile_variant": self.profile_variant, "answer": self.answer, "protocol": self.protocol,
                "axes": dict(self.axes), "data": self.data}


@dataclass
class Expansion:
    plan: PlanSpec
    out: Path
    cells: list[Cell]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(cell key or model, reason) of grid points that do not exist (LLM in image mode, ...)."""
    entries: dict[str, ModelEntry] = field(default_factory=dict)


def _slug(v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(v)).strip("_") or "_"


def select_models(plan: PlanSpec, names: Sequence[str] | None) -> list[ModelEntry]:
    if not names:
        return [m for m in plan.models if not m.opt_in]
    known = {m.name: m for m in plan.models}
    by_profile = {m.profile: m for m in plan.models if m.profile}
    out = []
    for n in names:
        m = known.get(n) or by_profile.get(n)
        if m is None:
            raise ValueError(f"--models: {n!r} is not a model of plan {plan.name!r} ({', '.join(known)})")
        out.append(m)
    return out


def expand(plan: PlanSpec, *, variables: Vars | None = None, models: Sequence[str] | None = None,
           out: str | None = None, limit: int | None = None, extra_args: Sequence[str] = (),
           only: Sequence[str] = ()) -> Expansion:
    """The plan's cells in a fixed order (model, benchmark, choice, mode, variant, answer, protocol,
    axes), with the grid points that do not exist listed as skipped."""
    variables = variables or Vars(plan)
    root_s, root_missing = variables.sub(out or plan.out)
    if root_missing:
        raise ValueError(f"plan {plan.name}: out = {plan.out!r} needs variable(s) {', '.join(root_missing)}")
    root = Path(root_s)
    limit = limit or plan.limit
    exp = Expansion(plan, root, [])
    axis_names = list(plan.axes)
    axis_grid: list[tuple[tuple[str, str], ...]] = [()]
    for a in axis_names:
        axis_grid = [g + ((a, str(v)),) for g in axis_grid for v in plan.axes[a].values]
    classify = plan.kind != "run"
    seen: set[str] = set()
    for entry in select_models(plan, models):
        exp.entries[entry.name] = entry
        prof = load_profile(entry.profile) if entry.profile else None
        for bench in plan.benchmarks:
            for choice in plan.choices:
                if choice not in bench.items:
                    exp.skipped.append((f"{entry.name}/{bench.name}.{choice}", f"benchmark {bench.name} has no {choice!r} items file"))
                    continue
                data, data_missing = variables.sub(bench.items[choice])
                for mode in ([None] if classify else plan.modes):
                    if mode is not None:
                        why = _mode_excluded(mode, entry, prof, bench)
                        if why:
                            exp.skipped.append((f"{entry.name}/{bench.name}.{choice}.{mode}", why))
                            continue
                    for variant in ([None] if classify else plan.variants):
                        pv = _profile_variant(prof, bench.taxonomy, mode)
                        if variant == "profile":
                            if prof is not None:
                                if isinstance(pv, Exception):
                                    exp.skipped.append((f"{entry.name}/{bench.name}.{choice}.{mode}", str(pv)))
                                    continue
                                var_key, var_arg = pv, None
                            elif entry.preset:
                                var_key, var_arg = "preset", None
                            else:
                                raise ValueError(f"plan {plan.name}: variants = \"profile\" but models "
                                                 f"[{entry.name}] has no profile or preset; list explicit variants")
                        else:
                            var_key, var_arg = variant, variant
                        for answer in ([None] if classify else plan.answers):
                            for protocol in plan.protocol:
                                for axes in axis_grid:
                                    parts = [bench.name, choice]
                                    if not classify:
                                        parts += [str(mode), f"v{_slug(var_key)}", str(answer)]
                                    parts.append(protocol)
                                    parts += [f"{a}{_slug(v)}" for a, v in axes]
                                    if limit:
                                        parts.append(f"n{limit}")
                                    key = f"{entry.name}/{'.'.join(parts)}"
                                    if only and not any(fnmatch.fnmatchcase(key, g) for g in only):
                                        continue
                                    if key in seen:  # "profile" and the same explicit variant: one run
                                        exp.skipped.append((key, "listed twice (the profile's variant is also listed)"))
                                        continue
                                    seen.add(key)
                                    cell_out = root / entry.name / ".".join(parts)
                                    args, needs = _cell_args(plan, entry, bench, data, cell_out, mode, var_arg,
                                                             answer, protocol, axes, limit, extra_args, variables)
                                    exp.cells.append(Cell(
                                        key=key, model=entry.name, benchmark=bench.name, choice=choice, mode=mode,
                                        variant=var_key if not classify else None,
                                        profile_variant=None if isinstance(pv, Exception) else pv,
                                        answer=answer, protocol=protocol, axes=axes, data=data, out=cell_out,
                                        args=tuple(args), needs=tuple(dict.fromkeys(data_missing + needs)),
                                        n_cmd=len(plan.cell_command)))
    return exp


def _mode_excluded(mode: str, entry: ModelEntry, prof, bench: Benchmark) -> str | None:
    if entry.modes is not None and mode not in entry.modes:
        return f"model {entry.name} is restricted to modes {', '.join(entry.modes)}"
    if bench.modes is not None and mode not in bench.modes:
        return f"benchmark {bench.name} is restricted to modes {', '.join(bench.modes)}"
    if prof is not None and prof.kind == "llm" and mode != "text":
        return f"profile {prof.name} is a text-only LLM"
    return None


def _profile_variant(prof, taxonomy: str | None, mode: str | None) -> Variant | Exception | None:
    if prof is None or taxonomy is None or mode is None:
        return None
    try:
        return prof.prompt_variant_for(taxonomy, "text" if mode == "text" else "image")
    except ValueError as e:
        return e


def _cell_args(plan: PlanSpec, entry: ModelEntry, bench: Benchmark, data: str, out: Path, mode: str | None,
               variant: Variant | None, answer: str | None, protocol: str, axes, limit: int | None,
               extra_args: Sequence[str], variables: Vars) -> tuple[list[str], tuple[str, ...]]:
    args = [*plan.cell_command, "--data", data, "--out", str(out)]
    if plan.kind == "run":
        args += ["--taxonomy", str(bench.taxonomy), "--mode", str(mode), "--answer", str(answer)]
    args += ["--protocol", protocol]
    if entry.profile and plan.kind == "run":
        args += ["--profile", entry.profile]
    if variant is not None:
        args += ["--prompt-variant", str(variant)]
    if entry.preset:
        args += ["--preset", entry.preset]
    if limit:
        args += ["--limit", str(limit)]
    if plan.kind == "run" and mode != "text":
        for m in plan.image_root_map:
            args += ["--image-root-map", m]
    args += [*plan.args, *bench.args, *entry.args]
    for a, v in axes:
        args += [plan.axes[a].flag, v]
    args += list(extra_args)
    needs: list[str] = []
    out_args = []
    for a in args:
        s, miss = variables.sub(a)
        needs += miss
        out_args.append(s)
    return out_args, tuple(needs)


# --------------------------------------------------------------------------------------------------
# State of a cell (status) and availability of its command
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellState:
    state: Literal["done", "partial", "missing", "blocked"]
    detail: str = ""
    lines: int = 0
    hca: float | None = None
    leaf: float | None = None


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n



def blocked_reason(cell: Cell, commands: Collection[str] | None = None) -> str | None:
    """Why a cell cannot run here: its command is not built yet, a variable is unset, data is missing."""
    cmd = cell.args[0]
    if commands is not None and cmd not in commands:
        return f"`harness {cmd}` not available yet"
    if cell.needs:
        return "needs " + ", ".join(f"${{{n}}}" for n in cell.needs) + " (--set NAME=VALUE or export it)"
    if not Path(cell.data).is_file():
        return f"no data: {cell.data}"
    return None


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when it is missing, torn (a killed writer) or not an object."""
    try:
        d = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def cell_state(cell: Cell, commands: Collection[str] | None = None) -> CellState:
    """Where a cell stands on disk; `commands`: the subcommands that exist (None: do not check)."""
    results = cell.out / "results.jsonl"
    status = _read_json(cell.out / "run.json").get("status")
    lines = _count_lines(results) if results.is_file() else 0
    s = _read_json(cell.out / "summary.json")
    hca, leaf = s.get("hca", s.get("accuracy")), s.get("leaf_acc")  # classification runs: accuracy
    if status == "done":
        return CellState("done", "", lines, hca, leaf)
    why = blocked_reason(cell, commands)
    if status is not None or lines:
        return CellState("partial", f"run.json: {status or '-'}" + (f"; {why}" if why else ""), lines, hca, leaf)
    if why:
        return CellState("blocked", why, 0)
    return CellState("missing", "", 0)
