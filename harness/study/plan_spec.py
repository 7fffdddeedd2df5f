"""Experiment plans: a study's grid (models x benchmarks x modes x prompt variants x answer modes x
choice types) as one small TOML file; this module is the file's schema, its loading and its variables.

Paths may use `${NAME}` variables (`--set NAME=VALUE` > environment > the plan's `[vars]` >
built-ins `SHIPPED` / `SHIPPED_CLS`, the shipped hierarchy / classification files, and `PLAN`), so plans
can name data that is not public. The cells of a plan are in harness.study.cells, running them in
harness.study.executor, the `harness plan` command in harness.cli.plan.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from harness.data.taxonomy import TAXONOMIES
from harness.paths import data_dir
from harness.serving.profiles import ProfileError, load_profile

__all__ = [
    "Axis",
    "Benchmark",
    "ModelEntry",
    "Plan",
    "PlanError",
    "PlanSpec",
    "SlurmSection",
    "Vars",
    "load_plan",
    "parse_assignments",
    "plans_dir",
]

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
BenchName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
Mode = Literal["image", "text", "binary"]
Variant = int | str
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


def _minutes(v: Any) -> Any:
    """SLURM time: minutes (int), or "MM", "HH:MM:SS", "D-HH:MM:SS", "D-HH"."""
    if not isinstance(v, str):
        return v
    s = v.strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
        parts = [int(x) for x in s.split(":")] + [0, 0]
        h, m, sec = parts[:3]
    else:
        parts = [int(x) for x in s.split(":")]
        if len(parts) == 1:
            return parts[0]
        h, m, sec = ([0] + parts)[-3:] if len(parts) == 2 else parts[:3]
        if len(parts) == 2:  # MM:SS
            h, m, sec = 0, parts[0], parts[1]
    return days * 1440 + h * 60 + m + (1 if sec else 0)


class SlurmSection(BaseModel):
    """`[slurm]`: how `harness plan run --executor slurm` submits (every field has a flag that overrides it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = None
    """`--partition`."""
    account: str | None = None
    """`--account`."""
    time: Annotated[int, Field(ge=1)] = 24 * 60
    """Time limit of one job in minutes (or "HH:MM:SS", "D-HH:MM:SS"); a job that reaches it is
    requeued and resumes (submitit's checkpoint signal, 90 s before the limit)."""
    gpus_per_node: Annotated[int, Field(ge=0)] | None = None
    """GPUs of a node: with `whole_node` a job asks for them all; otherwise the cap on a model's TP x DP."""
    whole_node: bool = False
    """One node per job (`--exclusive`, all its GPUs): the server runs as many data-parallel replicas as fit."""
    cpus_per_task: Annotated[int, Field(ge=1)] | None = None
    mem_gb: Annotated[float, Field(gt=0)] | None = None
    cells_per_job: Annotated[int, Field(ge=1)] | None = None
    """At most this many cells per job (default: all of a model's cells in one job, one server start)."""
    max_requeues: Annotated[int, Field(ge=0)] = 10
    """Time-outs after which a job is not requeued again (preemptions do not count)."""
    sbatch: dict[str, str | int | bool] = Field(default_factory=dict)
    """Further sbatch options without the dashes, e.g. {qos = "high", constraint = "h100"}."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before the job's Python (e.g. "module load cuda", "source /env/bin/activate")."""
    hf_offline: bool = True
    """Jobs run with HF_HUB_OFFLINE=1 (weights come from HF_HOME: `harness plan prefetch` on a login node)."""

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        try:
            return _minutes(v)
        except ValueError:
            raise ValueError(f"time {v!r}: minutes, or HH:MM:SS, or D-HH:MM:SS") from None


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
    slurm: SlurmSection = Field(default_factory=SlurmSection)
    """`[slurm]`: partition, time, GPUs, account, sbatch options of `--executor slurm` (harness.study.slurm)."""

    @field_validator("modes", "variants", "answers", "choices", "protocol", "image_root_map", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> PlanSpec:
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
            presets = (info.context or {}).get("presets")
            for i, m in enumerate(self.models):
                if m.preset is not None and presets is not None and m.preset not in presets:
                    raise ValueError(f"models[{i}] ({m.name}).preset: unknown preset {m.preset!r}; "
                                     f"known: {', '.join(presets)}")
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


def load_plan(name_or_path: str | os.PathLike[str], *, presets: Collection[str] | None = None) -> Plan:
    """A plan by path, or by name from the shipped `plans/` folder. `presets`: the names a model's
    `preset` may take (the caller knows them; None leaves them to the cell's command to check).
    Every profile a model names must load: an unknown or broken one is a PlanError naming the plan."""
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
        spec = PlanSpec.model_validate(raw, context={"presets": presets})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = "unknown key (not a plan field)" if err["type"] == "extra_forbidden" else err["msg"]
            msg = msg.removeprefix("Value error, ")
            lines.append(f"  {_loc(err['loc'], raw)}: {msg}")
        raise PlanError(f"{p}: invalid plan:\n" + "\n".join(lines)) from None
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

