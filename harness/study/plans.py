"""Experiment plans: a study's grid (models x benchmarks x modes x prompt variants x answer modes x
choice types) as one small TOML file, run cell by cell through the engine.

A plan expands deterministically into cells; each cell is one `harness run` (or, for `kind =
"classify"`, one call of another subcommand) with its own run folder `OUT/<model>/<cell>`. Resume
is two-level: a cell whose run.json says "done" is skipped without contacting any server, and a
started cell resumes inside `harness run`. Cells of one model run back to back against one server:
an endpoint from the plan or `--endpoint NAME=URL`, or a server the plan starts once (vLLM with the
model's `servers/` profile, or `transformers serve` for a local `path`).

Paths may use `${NAME}` variables (`--set NAME=VALUE` > environment > the plan's `[vars]` >
built-ins `SHIPPED` / `SHIPPED_CLS`, the shipped hierarchy / classification files, and `PLAN`), so plans can name data
that is not public; `harness plan status` says which variable or file a cell still needs.

CLI: `harness plan expand|status|run PLAN`, and `harness analyze RUNS... --out DIR` (cross-run
analyses and figures, in harness.study.analysis / harness.study.figures).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.paths import data_dir
from harness.data.taxonomy import TAXONOMIES

__all__ = [
    "Axis",
    "Benchmark",
    "Cell",
    "CellState",
    "Expansion",
    "ModelEntry",
    "Plan",
    "PlanError",
    "PlanSpec",
    "Vars",
    "add_cli",
    "cell_state",
    "expand",
    "launch_server",
    "load_plan",
    "plans_dir",
    "run_plan",
]

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
BenchName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
Mode = Literal["image", "text", "binary"]
Variant = int | str
CELL_FILE = "plan-cell.json"
EXIT_FATAL = 4  # harness run: the endpoint refused (harness.cli.run.EXIT_FATAL)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PlanError(ValueError):
    """A plan that cannot be found, parsed or validated (the message names the file and field)."""


def _listify(v: Any) -> Any:
    return [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v


# --------------------------------------------------------------------------------------------------
# The plan file
# --------------------------------------------------------------------------------------------------


class ModelEntry(BaseModel):
    """`[[models]]`: one model of the grid and how to reach it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    """Short id: the first folder of its cells and the name `--endpoint NAME=URL` refers to."""
    profile: str | None = None
    """A servers/ profile: the paper's prompt variant, system prompt and token budget (`--profile`),
    and the vLLM arguments when the plan starts the server itself."""
    endpoint: list[str] = Field(default_factory=list)
    """OpenAI-compatible base URL(s); `--endpoint NAME=URL` on the command line overrides."""
    model: str | None = None
    """Served model name (default: the profile's HF id; without a profile the endpoint's only model)."""
    path: str | None = None
    """Local folder or hub id to serve when no endpoint is given (e.g. a merged LoRA model)."""
    preset: str | None = None
    """`harness run --preset` (API models, e.g. "gpt-4o")."""
    modes: list[Mode] | None = None
    """Restrict this model to these modes (an LLM profile allows text only anyway)."""
    opt_in: bool = False
    """Left out unless named with `--models` (paid APIs)."""
    args: list[str] = Field(default_factory=list)
    """Further arguments for this model's cells (e.g. ["--rps", "20", "--max-cost", "50"])."""

    @field_validator("endpoint", "modes", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v)


class Benchmark(BaseModel):
    """`[[benchmarks]]`: an items file per choice type, and its taxonomy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: BenchName
    taxonomy: str | None = None
    """Taxonomy id (required for `kind = "run"`)."""
    items: dict[str, str]
    """Choice type -> items file, e.g. {similar = "...", random = "..."}; `${VAR}`s allowed."""
    modes: list[Mode] | None = None
    """Restrict this benchmark to these modes (e.g. Food-101 has no text runs)."""
    args: list[str] = Field(default_factory=list)

    @field_validator("modes", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v)

    @field_validator("taxonomy")
    @classmethod
    def _taxonomy(cls, v: str | None) -> str | None:
        if v is not None and v not in TAXONOMIES:
            raise ValueError(f"unknown taxonomy {v!r}; known: {', '.join(TAXONOMIES)}")
        return v

    @field_validator("items")
    @classmethod
    def _items(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("name at least one items file, e.g. items = {similar = \"...\"}")
        for k in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", k):
                raise ValueError(f"choice type {k!r}: letters, digits, '_' and '-' only")
        return v


class Axis(BaseModel):
    """`[axes.NAME]`: a further grid dimension passed as one flag (e.g. the label-set size K)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flag: Annotated[str, Field(pattern=r"^--?[A-Za-z0-9][A-Za-z0-9-]*$")]
    values: Annotated[list[int | float | str], Field(min_length=1)]


class PlanSpec(BaseModel):
    """A plan file (TOML). Axis fields take one value or a list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    description: str = ""
    kind: Literal["run", "classify"] = "run"
    """What one cell is: a `harness run`, or a classification command (`command`)."""
    command: list[str] | None = None
    """The harness subcommand of a cell (default ["run"], or ["classify"] for kind "classify")."""
    out: str = "runs/${PLAN}"
    """Root folder of the cells' run folders."""
    vars: dict[str, str] = Field(default_factory=dict)
    """Defaults of `${NAME}` variables (the environment and `--set` override them)."""
    image_root_map: list[str] = Field(default_factory=list)
    """`--image-root-map OLD=NEW` for image and binary cells."""
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    benchmarks: Annotated[list[Benchmark], Field(min_length=1)]
    modes: list[Mode] = Field(default_factory=lambda: ["image"])
    variants: list[Variant] = Field(default_factory=lambda: ["profile"])
    """Prompt variants: 0..4, a named catalogue row, or "profile" (the model's own, per taxonomy)."""
    answers: list[Literal["generate", "choice", "logprobs"]] = Field(default_factory=lambda: ["generate"])
    choices: list[str] = Field(default_factory=lambda: ["similar"])
    """Choice types: keys of the benchmarks' `items`."""
    protocol: list[Literal["reference", "robust"]] = Field(default_factory=lambda: ["robust"])
    limit: Annotated[int, Field(ge=1)] | None = None
    """First N items of every file (for smoke runs; part of the cell name)."""
    args: list[str] = Field(default_factory=list)
    """Arguments added to every cell."""
    axes: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], Axis] = Field(default_factory=dict)

    @field_validator("modes", "variants", "answers", "choices", "protocol", "image_root_map", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v)

    @model_validator(mode="after")
    def _consistent(self) -> PlanSpec:
        for what, names in (("models", [m.name for m in self.models]), ("benchmarks", [b.name for b in self.benchmarks])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: duplicate name(s) {', '.join(dup)}")
        known = {c for b in self.benchmarks for c in b.items}
        for c in self.choices:
            if c not in known:
                raise ValueError(f"choices: {c!r} is not a key of any benchmark's items ({', '.join(sorted(known))})")
        if self.kind == "run":
            for i, b in enumerate(self.benchmarks):
                if b.taxonomy is None:
                    raise ValueError(f"benchmarks[{i}] ({b.name}): taxonomy is required for kind = \"run\"")
            for i, m in enumerate(self.models):
                if m.preset is not None:
                    from harness.cli.run import PRESETS

                    if m.preset not in PRESETS:
                        raise ValueError(f"models[{i}] ({m.name}).preset: unknown preset {m.preset!r}; known: {', '.join(PRESETS)}")
        else:
            set_here = self.model_fields_set & {"modes", "variants", "answers"}
            if set_here:
                raise ValueError(f"{', '.join(sorted(set_here))}: not used by kind = \"classify\" (use axes)")
        return self

    @property
    def cell_command(self) -> list[str]:
        return list(self.command or (["run"] if self.kind == "run" else ["classify"]))


@dataclass(frozen=True)
class Plan:
    spec: PlanSpec
    source: Path


def plans_dir() -> Path:
    """The shipped `plans/` folder."""
    try:
        return data_dir("plans")
    except FileNotFoundError:
        return Path(__file__).resolve().parents[2] / "plans"


def _loc(loc: Sequence[Any], raw: dict) -> str:
    out, node = "", raw
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and part < len(node) and isinstance(node[part], dict) else None
            out += f"[{part}]" + (f" ({name})" if name else "")
        else:
            out += ("." if out else "") + str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or "(top level)"


def load_plan(name_or_path: str | os.PathLike[str]) -> Plan:
    """A plan by path, or by name from the shipped `plans/` folder."""
    s = str(name_or_path)
    p = Path(s)
    if not p.is_file():
        shipped = plans_dir() / (s if s.endswith(".toml") else f"{s}.toml")
        if shipped.is_file() and os.sep not in s:
            p = shipped
        else:
            avail = ", ".join(sorted(x.stem for x in plans_dir().glob("*.toml"))) if plans_dir().is_dir() else "(none)"
            raise FileNotFoundError(f"{s}: no such plan file (shipped plans: {avail})")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{p}: invalid TOML: {e}") from None
    try:
        spec = PlanSpec.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = "unknown key (not a plan field)" if err["type"] == "extra_forbidden" else err["msg"]
            msg = msg.removeprefix("Value error, ")
            lines.append(f"  {_loc(err['loc'], raw)}: {msg}")
        raise PlanError(f"{p}: invalid plan:\n" + "\n".join(lines)) from None
    from harness.serving.profiles import ProfileError, load_profile

    for i, m in enumerate(spec.models):
        if m.profile:
            try:
                load_profile(m.profile)
            except ProfileError as e:
                raise PlanError(f"{p}: models[{i}] ({m.name}).profile: {e}") from None
    return Plan(spec, p)


# --------------------------------------------------------------------------------------------------
# Variables
# --------------------------------------------------------------------------------------------------


class Vars:
    """`${NAME}` lookup: overrides (--set) > environment > plan [vars] > built-ins."""

    def __init__(self, plan: PlanSpec, overrides: dict[str, str] | None = None, env: dict[str, str] | None = None):
        self.layers = [overrides or {}, dict(os.environ if env is None else env), plan.vars, self.builtins(plan)]

    @staticmethod
    def builtins(plan: PlanSpec) -> dict[str, str]:
        out = {"PLAN": plan.name}
        with contextlib.suppress(FileNotFoundError):
            out["SHIPPED"] = str(data_dir("hierarchy"))
        # the classification lists (issue 7's package), where it ships them; else the variable stays unset
        with contextlib.suppress(ImportError, FileNotFoundError, AttributeError):
            from harness.classification.datasets import data_dir as cls_dir

            out["SHIPPED_CLS"] = str(cls_dir())
        return out

    def get(self, name: str) -> str | None:
        for layer in self.layers:
            if layer.get(name):
                return layer[name]
        return None

    def sub(self, s: str) -> tuple[str, tuple[str, ...]]:
        """(s with known variables replaced, names of the unset ones)."""
        missing: list[str] = []

        def rep(m: re.Match) -> str:
            v = self.get(m.group(1))
            if v is None:
                missing.append(m.group(1))
                return m.group(0)
            return v

        return _VAR.sub(rep, s), tuple(dict.fromkeys(missing))


def parse_assignments(pairs: Sequence[str], flag: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k or not v:
            raise ValueError(f"{flag} {p!r}: expected NAME=VALUE")
        out.setdefault(k, []).append(v)
    return out


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
    from harness.serving.profiles import load_profile

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


def available_commands() -> set[str]:
    """Subcommands the `harness` CLI has right now (plugins that exist)."""
    from harness.cli import build_parser

    p = build_parser()
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return set(a.choices)
    return set()


def blocked_reason(cell: Cell, commands: set[str] | None = None) -> str | None:
    """Why a cell cannot run here: its command is not built yet, a variable is unset, data is missing."""
    cmd = cell.args[0]
    if commands is not None and cmd not in commands:
        return f"`harness {cmd}` not available yet"
    if cell.needs:
        return "needs " + ", ".join(f"${{{n}}}" for n in cell.needs) + " (--set NAME=VALUE or export it)"
    if not Path(cell.data).is_file():
        return f"no data: {cell.data}"
    return None


def cell_state(cell: Cell, commands: set[str] | None = None) -> CellState:
    run_json, results = cell.out / "run.json", cell.out / "results.jsonl"
    status = None
    if run_json.is_file():
        with contextlib.suppress(Exception):
            status = orjson.loads(run_json.read_bytes()).get("status")
    lines = _count_lines(results) if results.is_file() else 0
    hca = leaf = None
    summ = cell.out / "summary.json"
    if summ.is_file():
        with contextlib.suppress(Exception):
            s = orjson.loads(summ.read_bytes())
            hca, leaf = s.get("hca", s.get("accuracy")), s.get("leaf_acc")  # classification runs: accuracy
    if status == "done":
        return CellState("done", "", lines, hca, leaf)
    why = blocked_reason(cell, commands)
    if status is not None or lines:
        return CellState("partial", f"run.json: {status or '-'}" + (f"; {why}" if why else ""), lines, hca, leaf)
    if why:
        return CellState("blocked", why, 0)
    return CellState("missing", "", 0)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


class LaunchUnavailable(RuntimeError):
    """No endpoint is known for a model and none can be started here."""


Launcher = Callable[[ModelEntry, Path], contextlib.AbstractContextManager]


@contextlib.contextmanager
def launch_server(entry: ModelEntry, log_dir: Path) -> Iterator[tuple[list[str], str | None]]:
    """Start one server for all of a model's cells; yields (endpoints, served model name).

    vLLM with the entry's profile (and `path` as the weights, if given) when vLLM is installed;
    otherwise `transformers serve` for a `path`. The server listens on loopback without a key."""
    import importlib.util

    from harness.serving.launcher import LOOPBACK, free_port, local_server, managed_server

    prof = None
    if entry.profile:
        from harness.serving.profiles import load_profile, serve_command

        prof = load_profile(entry.profile)
    if prof is not None and importlib.util.find_spec("vllm") is not None:
        port = free_port()
        cmd = serve_command(prof, host=LOOPBACK, port=port, model_path=entry.path,
                            launcher="cli" if shutil.which("vllm") else "module")
        env = dict(os.environ)
        env.pop("VLLM_API_KEY", None)  # loopback only; no key to leak or to mismatch
        log_dir.mkdir(parents=True, exist_ok=True)
        print(f"harness plan: starting vLLM for {entry.name} on {LOOPBACK}:{port} (log {log_dir / (entry.name + '.log')})",
              file=sys.stderr)
        with managed_server(cmd, port, env=env, timeout=3600, log_path=log_dir / f"{entry.name}.log",
                            name=f"vLLM ({entry.name})") as url:
            yield [url], entry.model or prof.hf_id
        return
    if entry.path:
        with local_server(entry.path) as (url, served):
            yield [url], entry.model or served
        return
    hint = f" (e.g. after `docker compose up -d {prof.compose_service}`)" if prof else ""
    raise LaunchUnavailable(
        f"model {entry.name}: no endpoint, and " + ("vLLM is not installed here to serve its profile" if prof
                                                    else "no profile or path to start a server from")
        + f"; pass --endpoint {entry.name}=URL{hint}")


def launch_description(entry: ModelEntry) -> str:
    """What `launch_server` would start for `entry` here (for dry runs)."""
    import importlib.util

    if entry.profile and importlib.util.find_spec("vllm") is not None:
        return f"a vLLM server the plan starts with profile {entry.profile}"
    if entry.path:
        return f"a local server the plan starts for {entry.path}"
    return f"nothing: no endpoint and no way to start one here (pass --endpoint {entry.name}=URL)"


@contextlib.contextmanager
def _given(endpoints: list[str], served: str | None):
    yield endpoints, served


def _served_for(entry: ModelEntry) -> str | None:
    if entry.model:
        return entry.model
    if entry.profile:
        from harness.serving.profiles import load_profile

        return load_profile(entry.profile).hf_id
    return None


def _invoke(argv: list[str]) -> int:
    """One cell through the real CLI, in-process (argparse errors become exit code 2)."""
    from harness import cli

    try:
        return int(cli.main(argv) or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def _check_args(argv: list[str]) -> str | None:
    from harness.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


@dataclass
class Outcome:
    key: str
    result: str  # done | skipped (done) | failed (rc N) | blocked: ... | not run
    rc: int = 0


def run_plan(exp: Expansion, *, endpoints: dict[str, list[str]] | None = None, launcher: Launcher = launch_server,
             fail_fast: bool = False, dry_run: bool = False, invoke: Callable[[list[str]], int] = _invoke,
             log: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run every cell that is not done. Cells are grouped by server (same endpoint, or same model to
    start) in plan order; a group whose cells are all done or blocked starts nothing."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    endpoints = endpoints or {}
    commands = available_commands()
    outcomes: list[Outcome] = []
    groups: dict[tuple, list[Cell]] = {}
    given: dict[tuple, list[str]] = {}
    for c in exp.cells:
        e = exp.entries[c.model]
        urls = endpoints.get(e.name) or (endpoints.get(e.profile) if e.profile else None) or e.endpoint
        gk = ("endpoint", tuple(urls), e.model) if urls else ("launch", e.profile, e.path, e.model, e.name if not (e.profile or e.path) else "")
        if urls:
            given[gk] = list(urls)
        groups.setdefault(gk, []).append(c)
    for gk, cells in groups.items():
        todo: list[Cell] = []
        for c in cells:
            st = cell_state(c, commands)
            if st.state == "done":
                outcomes.append(Outcome(c.key, "skipped (done)"))
            elif st.state == "blocked" or (st.state == "partial" and blocked_reason(c, commands)):
                outcomes.append(Outcome(c.key, f"blocked: {blocked_reason(c, commands)}", 1))
            elif (bad := _check_args(c.command(["http://127.0.0.1:9/v1"], "m"))) is not None:
                outcomes.append(Outcome(c.key, f"failed: arguments not accepted by `harness {c.args[0]}`: {bad}", 2))
            else:
                todo.append(c)
        if not todo:
            continue
        entry = exp.entries[todo[0].model]
        if dry_run:
            where = ", ".join(given[gk]) if gk in given else launch_description(entry)
            for c in todo:
                outcomes.append(Outcome(c.key, f"would run against {where}"))
            continue
        ctx = _given(given[gk], _served_for(entry)) if gk in given else launcher(entry, exp.out / "_logs")
        try:
            with ctx as (urls, served):
                for c in todo:
                    e = exp.entries[c.model]
                    c.out.mkdir(parents=True, exist_ok=True)
                    tax = next((b.taxonomy for b in exp.plan.benchmarks if b.name == c.benchmark), None)
                    (c.out / CELL_FILE).write_bytes(orjson.dumps(c.meta(exp.plan.name, e, tax), option=orjson.OPT_INDENT_2))
                    argv = c.command(urls, e.model or served)
                    log(f"harness plan: [{len(outcomes) + 1}/{len(exp.cells)}] {c.key}")
                    rc = invoke(argv)
                    outcomes.append(Outcome(c.key, "done" if rc == 0 else f"failed (exit {rc})", rc))
                    if rc == 130:
                        raise KeyboardInterrupt
                    if rc and fail_fast:
                        return outcomes
                    if rc == EXIT_FATAL:  # the server refused (model not served, bad key, ...): same for the rest
                        for rest in todo[todo.index(c) + 1:]:
                            outcomes.append(Outcome(rest.key, f"not run: {c.key} stopped with a server error (exit 4)", 4))
                        break
        except LaunchUnavailable as err:
            for c in todo:
                if not any(o.key == c.key for o in outcomes):
                    outcomes.append(Outcome(c.key, f"blocked: {err}", 1))
        except Exception as err:  # a server that did not start: the other models still run
            from harness.serving.launcher import ServerStartError

            if not isinstance(err, ServerStartError):
                raise
            for c in todo:
                if not any(o.key == c.key for o in outcomes):
                    outcomes.append(Outcome(c.key, f"failed: server did not start: {str(err).splitlines()[0]}", 4))
            if fail_fast:
                return outcomes
    return outcomes


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan file, or the name of a shipped plan (plans/*.toml)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a ${NAME} variable of the plan")
    p.add_argument("--models", help="comma-separated model names to include (opt-in models only this way)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB", help="cells whose key matches (repeatable)")
    p.add_argument("--out", help="root folder of the cells (default: the plan's `out`)")
    p.add_argument("--limit", type=int, help="first N items of every file (a smoke run; part of the cell names)")


def _expansion(args, extra: Sequence[str] = ()) -> Expansion:
    plan = load_plan(args.plan)
    sets = {k: v[-1] for k, v in parse_assignments(args.set, "--set").items()}
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    return expand(plan.spec, variables=Vars(plan.spec, sets), models=models, out=args.out, limit=args.limit,
                  extra_args=extra, only=args.only)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _cmd_expand(args) -> int:
    exp = _expansion(args)
    if args.json:
        sys.stdout.write(orjson.dumps([{"key": c.key, "out": str(c.out), "argv": ["harness", *c.command(["<ENDPOINT>"], None)],
                                        "needs": list(c.needs)} for c in exp.cells], option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    con = _console()
    con.print(f"[bold]{exp.plan.name}[/]: {len(exp.cells)} cells under {exp.out}", highlight=False)
    for c in exp.cells:
        con.print(f"[cyan]{c.key}[/]", highlight=False)
        con.print("  harness " + shlex.join(c.command([f"<{c.model} endpoint>"], None)), highlight=False, soft_wrap=True)
    for what, why in exp.skipped:
        con.print(f"[dim]not a cell: {what}: {why}[/]", highlight=False)
    return 0


def _cmd_status(args) -> int:
    from rich.table import Table

    exp = _expansion(args)
    commands = available_commands()
    states = [(c, cell_state(c, commands)) for c in exp.cells]
    if args.json:
        sys.stdout.write(orjson.dumps([{"key": c.key, "state": s.state, "detail": s.detail, "lines": s.lines, "hca": s.hca,
                                        "leaf_acc": s.leaf, "out": str(c.out)} for c, s in states],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        t = Table(title=f"plan {exp.plan.name} ({exp.out})")
        for col in ("cell", "state", "lines", "HCA/acc", "leaf", "note"):
            t.add_column(col, justify="right" if col in ("lines", "HCA/acc", "leaf") else "left", overflow="fold")
        colour = {"done": "green", "partial": "yellow", "missing": "white", "blocked": "red"}
        for c, s in states:
            t.add_row(c.key, f"[{colour[s.state]}]{s.state}[/]", f"{s.lines:,}" if s.lines else "",
                      f"{s.hca:.2f}" if s.hca is not None else "", f"{s.leaf:.2f}" if s.leaf is not None else "", s.detail)
        con = _console()
        con.print(t)
        counts = {k: sum(s.state == k for _, s in states) for k in ("done", "partial", "missing", "blocked")}
        con.print(f"{len(states)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()), highlight=False)
        needs = sorted({n for c, s in states if s.state != "done" for n in c.needs})
        if needs:
            con.print("unset variables: " + ", ".join(needs) + " (--set NAME=VALUE or export NAME=...)", highlight=False)
        missing = sorted({c.data for c, s in states if s.state == "blocked" and s.detail.startswith("no data")})
        for m in missing:
            con.print(f"[red]missing data file[/]: {m}", highlight=False)
    return 0 if all(s.state == "done" for _, s in states) else 3


def _cmd_run(args) -> int:
    exp = _expansion(args, shlex.split(args.run_args or ""))
    eps = parse_assignments(args.endpoint, "--endpoint")
    known = set(exp.entries) | {e.profile for e in exp.entries.values() if e.profile}
    for k in eps:
        if k not in known:
            raise ValueError(f"--endpoint {k}=...: {k!r} is not a selected model of plan {exp.plan.name} ({', '.join(exp.entries)})")
    outcomes = run_plan(exp, endpoints=eps, fail_fast=args.fail_fast, dry_run=args.dry_run)
    con = _console()
    for o in outcomes:
        colour = "green" if o.result in ("done", "skipped (done)") else "yellow" if o.result.startswith("would") else "red"
        con.print(f"[{colour}]{o.result}[/]: {o.key}", highlight=False, soft_wrap=True)
    done = sum(o.result in ("done", "skipped (done)") for o in outcomes)
    con.print(f"plan {exp.plan.name}: {done}/{len(exp.cells)} cells done", highlight=False)
    if args.dry_run:
        return 0
    return 0 if done == len(exp.cells) else 3


def _cmd_analyze(args) -> int:
    try:
        from harness.study.analysis import analyze_cli
    except ModuleNotFoundError as e:  # scipy / matplotlib: the [analysis] extra
        raise ValueError(f"harness analyze needs {e.name}: pip install 'vlm-hierarchy-harness[analysis]'") from None
    return analyze_cli(args)


def add_cli(sub) -> None:
    p = sub.add_parser("plan", help="experiment plans: expand, run (resumable, one server per model), status")
    ps = p.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)
    e = ps.add_parser("expand", help="list the cells of a plan and their commands")
    _common(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_expand)
    s = ps.add_parser("status", help="done / partial / missing / blocked cells, with HCA of finished ones")
    _common(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_status)
    r = ps.add_parser("run", help="run every cell not done yet (resumable, one server per model)")
    _common(r)
    r.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="where model NAME (plan name or profile) is served; repeat for several servers")
    r.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell (default: go on)")
    r.add_argument("--dry-run", action="store_true", help="say what would run; start and send nothing")
    r.add_argument("--run-args", metavar="'ARGS'", help="extra arguments for every cell, e.g. '--concurrency 256' "
                   "(transport only: answer-changing flags make a started cell refuse to resume)")
    r.set_defaults(func=_cmd_run)

    a = sub.add_parser("analyze", help="cross-run analyses and figures: text vs visual HCA, leaf-HCA gap, "
                                       "per-level curves, prompt-variant spread, finetuning deltas")
    a.add_argument("runs", nargs="+", metavar="RUN_OR_FOLDER", help="run folders, or folders searched for run folders")
    a.add_argument("--out", required=True, help="folder for tables, figures and report.md")
    a.add_argument("--pair-text", action="append", default=[], metavar="VLM=LLM",
                   help="take the text HCA of model LLM for VLM (e.g. an OG LLM); default: the VLM's own text runs")
    a.add_argument("--compare", action="append", default=[], metavar="BEFORE=AFTER",
                   help="finetuning deltas: runs of model (or under folder) BEFORE vs AFTER")
    a.add_argument("--draws", type=int, default=2000, help="bootstrap draws for correlation intervals")
    a.set_defaults(func=_cmd_analyze)
