"""The cells of a plan: its grid expanded in a fixed order, each cell one RunSpec with its own run
folder `OUT/<model>/<cell>`, and the state of a cell on disk (done, partial, missing, blocked).

A plan's `args` (and `harness plan run --run-args`) spell RunSpec fields as the `harness` commands'
flags do (`--max-side 1680`, `--rps 20`, `--k all`): `apply_flags` turns them into spec fields, and
`spec_flags` prints a spec back that way for people to read.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ValidationError

from harness.metrics.readers import results_files
from harness.runs.report import headline, summarize_path
from harness.runs.spec import ClassifyTask, EndpointBackend, HierarchyTask, LoglikTask, RunSpec, WikiQATask
from harness.serving.profiles import load_profile
from harness.study.plan_spec import Benchmark, ModelEntry, PlanSpec, Variant, Vars
from harness.study.records import read_json

__all__ = [
    "CELL_FILE",
    "TASK_KINDS",
    "Cell",
    "CellState",
    "Expansion",
    "apply_flags",
    "blocked_reason",
    "cell_scores",
    "cell_state",
    "expand",
    "headline",
    "select_models",
    "spec_flags",
]

CELL_FILE = "plan-cell.json"


# --------------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its RunSpec without endpoints (added at run time, with the served model)."""

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
    spec: RunSpec | None
    """What the cell runs; None when its arguments are not accepted (`error`) or its command is unknown."""
    command: tuple[str, ...] = ("run",)
    """The harness subcommand this cell's spec corresponds to (for messages and the printed line)."""
    kind: str | None = "hierarchy"
    """The task kind of `spec` (None: the plan's command names no task kind that exists)."""
    needs: tuple[str, ...] = ()
    """Unset variables this cell's arguments refer to."""
    error: str | None = None
    """Why the plan's arguments for this cell do not make a RunSpec (an unknown flag, a bad value)."""
    quiet: bool = False
    """No progress display (`--quiet` among the plan's arguments)."""

    def spec_for(self, endpoints: Sequence[str], served: str | None) -> RunSpec:
        """The cell's spec against `endpoints`, asking for model `served` (None: the endpoint's only one)."""
        if self.spec is None:
            raise ValueError(f"{self.key}: {self.error or f'`harness {shlex.join(self.command)}` is not available'}")
        backend = self.spec.backend.model_copy(update={"endpoints": list(endpoints)})
        update: dict[str, Any] = {"backend": backend}
        if served:
            update["model"] = served
        return self.spec.model_copy(update=update)

    def command_line(self, endpoints: Sequence[str], served: str | None) -> list[str]:
        """The cell as a `harness ...` command line, for people to read (the executor runs the spec)."""
        if self.spec is None:
            return ["harness", *self.command]
        return ["harness", *self.command, *spec_flags(self.spec_for(endpoints, served))]

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
    axes), with the grid points that do not exist listed as skipped. `extra_args`: further arguments
    for every cell, spelled as the plan's `args` are."""
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
                                    made = _cell_spec(plan, entry, bench, data, cell_out, mode, var_arg,
                                                      answer, protocol, axes, limit, extra_args, variables)
                                    exp.cells.append(Cell(
                                        key=key, model=entry.name, benchmark=bench.name, choice=choice, mode=mode,
                                        variant=var_key if not classify else None,
                                        profile_variant=None if isinstance(pv, Exception) else pv,
                                        answer=answer, protocol=protocol, axes=axes, data=data, out=cell_out,
                                        spec=made.spec, command=tuple(plan.cell_command), kind=made.kind,
                                        needs=tuple(dict.fromkeys(data_missing + made.needs)), error=made.error,
                                        quiet=made.quiet))
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


# --------------------------------------------------------------------------------------------------
# A cell's RunSpec
# --------------------------------------------------------------------------------------------------

# The plan's `command` -> the task kind its cells run (the commands' flags are RunSpec fields).
TASK_KINDS: dict[tuple[str, ...], str] = {
    ("run",): "hierarchy",
    ("classify",): "classify",
    ("classify", "run"): "classify",
    ("classify", "loglik"): "loglik",
    ("classify", "wikiqa"): "wikiqa",
}
_TASKS: dict[str, type[BaseModel]] = {"hierarchy": HierarchyTask, "classify": ClassifyTask, "loglik": LoglikTask,
                                      "wikiqa": WikiQATask}
_PRESENTATION = {"--quiet"}  # accepted in a plan's arguments: no progress display for the cell


def _field_kind(annotation: Any) -> str:
    """flag: a bool (no value); list: repeatable; value: one value."""
    if annotation is bool:
        return "flag"
    if get_origin(annotation) is list:
        return "list"
    return "value"


def _where(name: str, task: type[BaseModel]) -> tuple[str | None, str] | None:
    """(section, kind) of RunSpec field `name`: the task's own fields first (`--seed` of a
    classification task is its candidate seed), then the endpoint backend's, then the spec's."""
    for section, model in (("task", task), ("backend", EndpointBackend), (None, RunSpec)):
        f = model.model_fields.get(name)
        if f is not None and name != "kind" and not (section is None and name in ("backend", "task")):
            return section, _field_kind(f.annotation)
    return None


def apply_flags(fields: dict, flags: Sequence[str], task_kind: str = "hierarchy") -> dict:
    """`fields` (a RunSpec as a dict) with plan arguments applied. A plan spells RunSpec fields as the
    `harness` commands do: `--max-side 1680` sets `max_side`, `--rps 20` the backend's `rps`, `--k all`
    the task's `k`; a bool field is a bare flag, a list field repeats (`--image-root-map`). A later
    value overrides an earlier one. Raises ValueError naming an unknown flag or a missing value."""
    task = _TASKS[task_kind]
    out = {**fields, "backend": dict(fields.get("backend") or {}), "task": dict(fields.get("task") or {})}
    it = iter(flags)
    for a in it:
        if a in _PRESENTATION:
            continue
        if not a.startswith("--") or len(a) < 3:
            raise ValueError(f"unrecognized arguments: {a}")
        flag, eq, value = a.partition("=")
        where = _where(flag[2:].replace("-", "_"), task)
        if where is None:
            raise ValueError(f"unrecognized arguments: {flag}")
        section, kind = where
        target = out if section is None else out[section]
        name = flag[2:].replace("-", "_")
        if kind == "flag":
            if eq:
                raise ValueError(f"argument {flag}: ignored explicit argument {value!r}")
            target[name] = True
            continue
        if not eq:
            value = next(it, None)
            if value is None or (value.startswith("--") and len(value) > 2):
                raise ValueError(f"argument {flag}: expected one argument")
        if kind == "list":
            target[name] = [*target.get(name, []), value]
        else:
            target[name] = value
    return out


def spec_flags(spec: RunSpec) -> list[str]:
    """A spec as command-line flags for people to read (`harness plan expand`): the fields that differ
    from their defaults, spelled as `apply_flags` reads them."""
    d = spec.model_dump(mode="json", exclude_defaults=True)
    d.pop("backend", None)
    d.pop("task", None)
    task = spec.task.model_dump(mode="json", exclude_defaults=True)
    backend = spec.backend.model_dump(mode="json", exclude_defaults=True)
    if spec.task.kind == "hierarchy" and getattr(spec.task, "answer", None) == "clip":
        task.pop("answer", None)
    out: list[str] = []
    endpoints = backend.pop("endpoints", [])
    for e in endpoints:
        out += ["--endpoint", e]
    head = {k: d.pop(k) for k in ("model", "data", "out") if k in d}
    for section in (head, task, d, backend):
        for name, v in section.items():
            if name == "kind":
                continue
            flag = "--" + name.replace("_", "-")
            if v is True:
                out.append(flag)
            elif v is False or v is None:
                continue
            elif isinstance(v, list):
                for x in v:
                    out += [flag, str(x)]
            else:
                out += [flag, str(v)]
    return out


@dataclass(frozen=True)
class _Made:
    spec: RunSpec | None
    kind: str | None
    needs: tuple[str, ...]
    error: str | None
    quiet: bool


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if x not in ("hierarchy", "classify", "loglik", "wikiqa", "openai"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _cell_spec(plan: PlanSpec, entry: ModelEntry, bench: Benchmark, data: str, out: Path, mode: str | None,
               variant: Variant | None, answer: str | None, protocol: str, axes, limit: int | None,
               extra_args: Sequence[str], variables: Vars) -> _Made:
    needs: list[str] = []

    def sub(v: str) -> str:
        s, miss = variables.sub(v)
        needs.extend(miss)
        return s

    kind = TASK_KINDS.get(tuple(plan.cell_command))
    flags = [sub(a) for a in [*plan.args, *bench.args, *entry.args,
                              *(x for a, v in axes for x in (plan.axes[a].flag, v)), *extra_args]]
    quiet = any(f in _PRESENTATION for f in flags)
    if kind is None:
        return _Made(None, None, tuple(needs), None, quiet)
    task: dict[str, Any] = {"kind": kind, "protocol": protocol}
    fields: dict[str, Any] = {"out": str(out), "data": data, "backend": {"kind": "openai"}, "task": task}
    if plan.kind == "run":
        task |= {"taxonomy": bench.taxonomy, "mode": mode, "answer": answer}
        if entry.profile:
            task["profile"] = entry.profile
        if entry.preset:
            task["preset"] = entry.preset
        if mode != "text" and plan.image_root_map:
            fields["image_root_map"] = [sub(m) for m in plan.image_root_map]
    if variant is not None:
        task["prompt_variant"] = str(variant)
    if entry.model:
        fields["model"] = entry.model
    if limit:
        fields["limit"] = limit
    try:
        spec = RunSpec.model_validate(apply_flags(fields, flags, kind))
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        msg = _validation_message(e) if isinstance(e, ValidationError) else str(e)
        return _Made(None, kind, tuple(needs), msg, quiet)
    return _Made(spec, kind, tuple(needs), None, quiet)


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



def blocked_reason(cell: Cell, kinds: Collection[str] | None = None) -> str | None:
    """Why a cell cannot run here: its command does not exist (or its task kind cannot run here;
    `kinds`: the task kinds that can, None: do not check), a variable is unset, data is missing."""
    if cell.kind is None or (kinds is not None and cell.kind not in kinds):
        return f"`harness {shlex.join(cell.command)}` not available yet"
    if cell.needs:
        return "needs " + ", ".join(f"${{{n}}}" for n in cell.needs) + " (--set NAME=VALUE or export it)"
    if not Path(cell.data).is_file():
        return f"no data: {cell.data}"
    return None


def cell_scores(cell: Cell) -> tuple[float | None, float | None]:
    """`headline` of the cell's run folder (None, None before it has results or when they cannot be read)."""
    if not cell.out.is_dir() or not results_files(cell.out):
        return None, None
    try:
        return headline(summarize_path(cell.out))
    except (ImportError, OSError, ValueError, KeyError):
        return None, None


def cell_state(cell: Cell, kinds: Collection[str] | None = None, *, scores: bool = False) -> CellState:
    """Where a cell stands on disk; `kinds`: the task kinds that can run here (None: do not check);
    `scores`: also read its metrics (HCA and leaf accuracy, or accuracy), which reads its results."""
    status = read_json(cell.out / "run.json").get("status")
    lines = sum(_count_lines(f) for f in results_files(cell.out)) if cell.out.is_dir() else 0  # every shard
    hca, leaf = cell_scores(cell) if scores and lines else (None, None)
    if status == "done":
        return CellState("done", "", lines, hca, leaf)
    why = blocked_reason(cell, kinds)
    if status is not None or lines:
        return CellState("partial", f"run.json: {status or '-'}" + (f"; {why}" if why else ""), lines, hca, leaf)
    if why:
        return CellState("blocked", why, 0)
    return CellState("missing", "", 0)
