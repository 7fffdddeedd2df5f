"""Hook points of a model, from the per-architecture table in `architectures.toml`.

Sites are named, not coded: ``vision`` (the vision encoder's last block as fed to the projector),
``projector`` (projector / merger output) and ``llm.K`` (LLM hidden state K = 0..L, numbered as
``output_hidden_states``: 0 = input embeddings with the image features merged in, L = last layer after
the final norm). Adding an architecture means adding a table, not a branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import tomllib

_TABLE = Path(__file__).with_name("architectures.toml")
Split = Literal["batch", "grid", "grid_merged", "single"]
VISION_SITES = ("vision", "projector")
_LLM_SITE = re.compile(r"^llm\.(-?\d+)$")


@dataclass(frozen=True)
class ArchSpec:
    """One row of the table (see the comments in architectures.toml)."""

    model_type: str
    llm_layers: str
    llm_norm: str
    vision: str | None = None
    projector: str | None = None
    split: dict[str, Split] = field(default_factory=dict)
    resize: Literal["qwen", "none"] = "none"


@lru_cache(maxsize=1)
def table() -> dict[str, ArchSpec]:
    with _TABLE.open("rb") as f:
        raw = tomllib.load(f)
    out = {}
    for name, row in raw.items():
        out[name] = ArchSpec(model_type=name, **row)
    return out


def spec_for(config) -> ArchSpec:
    """The table row of a transformers config (by `model_type`)."""
    mt = getattr(config, "model_type", None)
    try:
        return table()[mt]
    except KeyError:
        raise ValueError(
            f"model type {mt!r} has no hook table in {_TABLE.name}; known: {', '.join(sorted(table()))} "
            "(add a table: module paths of the vision output, projector, decoder layers and final norm)"
        ) from None


@dataclass(frozen=True)
class HookPoint:
    """A module and what to read from it: its first input, its output, or one field of its output."""

    site: str
    path: str
    module: object  # torch.nn.Module
    what: str  # "input" | "output" | "output.FIELD"


def get_module(model, path: str):
    """`a.b.3.c` -> the submodule, or None when any part is missing."""
    m = model
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            try:
                m = m[int(part)]
            except (IndexError, TypeError, KeyError):
                return None
        else:
            m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _resolve(model, spec_value: str, site: str) -> tuple[str, object, str]:
    for alt in spec_value.split("|"):
        path, _, what = alt.partition(":")
        m = get_module(model, path)
        if m is not None:
            return path, m, what or "output"
    raise ValueError(f"site {site!r}: none of the module paths {spec_value!r} exists in {type(model).__name__}")


def llm_layers(model, spec: ArchSpec):
    path, layers, _ = _resolve(model, spec.llm_layers, "llm")
    return path, layers


def n_llm_layers(model, spec: ArchSpec) -> int:
    """L: the number of decoder layers (hidden states are numbered 0..L)."""
    return len(llm_layers(model, spec)[1])


def expand_sites(sites: list[str] | tuple[str, ...], n_layers: int) -> list[str]:
    """Normalise site names: `llm.-1` -> `llm.L`, `llm.all` -> llm.0 .. llm.L; keeps order, no duplicates."""
    out: list[str] = []
    for s in sites:
        s = s.strip()
        if s in VISION_SITES:
            names = [s]
        elif s == "llm.all":
            names = [f"llm.{k}" for k in range(n_layers + 1)]
        elif m := _LLM_SITE.match(s):
            k = int(m.group(1))
            if k < 0:
                k += n_layers + 1
            if not 0 <= k <= n_layers:
                raise ValueError(f"site {s!r}: the model has hidden states 0..{n_layers} (or -1..-{n_layers + 1})")
            names = [f"llm.{k}"]
        else:
            raise ValueError(f"unknown site {s!r}: use vision, projector, llm.K (K = 0..L or negative) or llm.all")
        for n in names:
            if n not in out:
                out.append(n)
    return out


def site_order(site: str) -> int:
    """Execution order of sites in a forward pass (to stop after the deepest one that is needed)."""
    if site == "vision":
        return 0
    if site == "projector":
        return 1
    return 2 + int(site.split(".")[1])


def hook_point(model, spec: ArchSpec, site: str) -> HookPoint:
    """Where to read `site` (already normalised by expand_sites)."""
    if site in VISION_SITES:
        value = getattr(spec, site)
        if value is None:
            raise ValueError(f"site {site!r}: {spec.model_type} has no vision tower in the hook table")
        path, m, what = _resolve(model, value, site)
        return HookPoint(site, path, m, what)
    k = int(site.split(".")[1])
    lpath, layers = llm_layers(model, spec)
    n = len(layers)
    if k == 0:
        return HookPoint(site, f"{lpath}.0", layers[0], "input")
    if k < n:
        return HookPoint(site, f"{lpath}.{k - 1}", layers[k - 1], "output")
    path, m, _ = _resolve(model, spec.llm_norm, site)
    return HookPoint(site, path, m, "output")
