"""What the cross-run analyses are made of: a run and the values computed across runs.

Both harness.study.analysis (which computes them) and harness.study.figures (which draws them) use
these; neither imports the other's direction, so the figures stay a leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from harness.data.taxonomy import TAXONOMIES
from harness.metrics.hierarchy import Summary

__all__ = ["Correlation", "Delta", "Point", "RunInfo", "Spread", "asked_levels", "level_name"]


@dataclass(frozen=True)
class RunInfo:
    """One finished (or partial) run and what it measured."""

    label: str
    path: Path
    model: str
    """Plan model name when the run is a plan cell, else the served model name, else the label."""
    names: frozenset[str]
    """Every name the model goes by (plan name, served name, profile): what --pair-text/--compare match."""
    taxonomy: str | None
    mode: str | None
    variant: str | None
    profile_variant: str | None
    answer: str | None
    protocol: str | None
    data: str | None
    """File name of the items file (same name = same benchmark and choice type)."""
    summary: Summary = field(compare=False, repr=False)

    @property
    def hca(self) -> float:
        return self.summary.hca

    @property
    def leaf(self) -> float:
        return self.summary.leaf_acc

    @property
    def is_profile_variant(self) -> bool:
        return self.profile_variant is not None and self.variant == self.profile_variant


@dataclass(frozen=True)
class Point:
    """One model on one benchmark: visual HCA of the VLM, text HCA of its LLM (part)."""

    model: str
    text_model: str
    taxonomy: str | None
    data: str | None
    visual_hca: float
    text_hca: float
    visual_leaf: float
    n_visual_runs: int
    n_text_runs: int


@dataclass(frozen=True)
class Correlation:
    scope: str
    n: int
    n_models: int
    pearson: float
    pearson_p: float
    pearson_ci: tuple[float, float]
    spearman: float
    spearman_p: float
    spearman_ci: tuple[float, float]
    slope: float
    intercept: float


@dataclass(frozen=True)
class Spread:
    model: str
    taxonomy: str | None
    mode: str | None
    data: str | None
    variants: tuple[str, ...]
    hca: tuple[float, ...]
    mean: float
    std: float
    """Population standard deviation (ddof=0) over the variants run."""
    min: float
    max: float
    leaf_mean: float
    leaf_std: float


@dataclass(frozen=True)
class Delta:
    taxonomy: str | None
    mode: str | None
    data: str | None
    variant: str | None
    before: str
    after: str
    hca_before: float
    hca_after: float
    leaf_before: float
    leaf_after: float

    @property
    def hca_delta(self) -> float:
        return self.hca_after - self.hca_before

    @property
    def leaf_delta(self) -> float:
        return self.leaf_after - self.leaf_before


def level_name(taxonomy: str | None, level: str) -> str:
    info = TAXONOMIES.get(taxonomy or "")
    return info.level_name(int(level) - 1) if info else f"L{level}"


def asked_levels(r: RunInfo) -> list[tuple[str, float]]:
    """(level, accuracy) coarse to fine; a text run's leaf is filled in, not asked, so it is left out."""
    lv = sorted(r.summary.per_level.items(), key=lambda kv: int(kv[0]))
    return lv[:-1] if r.mode == "text" else lv


def read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when it is missing, torn (a killed writer) or not an object."""
    try:
        d = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}
