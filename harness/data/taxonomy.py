"""Taxonomies: leaf -> path files plus the metadata prompts and reports need, with validation."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from harness.paths import data_dir


@dataclass(frozen=True)
class TaxonomyInfo:
    """What the harness knows about one taxonomy of the study."""

    id: str
    file: str
    display_name: str
    # Rank words used in prompts ("{rank}"), by level index; the last applies to deeper levels.
    # None: the taxonomy's levels are unnamed depths (ImageNet WordNet, Food courses).
    ranks: tuple[str, ...] | None
    subject: str  # noun in prompts: "bird", "animal", "plant", "object", "food item"
    root: str | None  # the single level-1 value (not scored), or None when level 1 is a real rank

    def level_name(self, index: int) -> str:
        """Human-readable name of the level at 0-based position `index`."""
        if self.ranks is not None:
            return self.ranks[min(index, len(self.ranks) - 1)]
        return "root" if index == 0 and self.root else f"depth {index + 1}"


_INAT_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

TAXONOMIES: dict[str, TaxonomyInfo] = {
    t.id: t
    for t in (
        TaxonomyInfo("cub", "hierarchy_CUB200.json", "CUB-200", ("order", "family", "genus", "species"),
                     "bird", None),
        TaxonomyInfo("inat_animal", "hierarchy_Inat_animal.json", "iNat21-Animal", _INAT_RANKS, "animal",
                     "Animalia"),
        TaxonomyInfo("inat_plant", "hierarchy_Inat_plantae.json", "iNat21-Plant", _INAT_RANKS, "plant",
                     "Plantae"),
        TaxonomyInfo("imagenet_animal", "hierarchy_imagenet_animal.json", "ImageNet-Animal", None, "animal",
                     "animal"),
        TaxonomyInfo("imagenet_artifact", "hierarchy_imagenet_artifact.json", "ImageNet-Artifact", None,
                     "object", "artifact"),
        TaxonomyInfo("food", "hierarchy_Food.json", "Food-101", None, "food item", "food"),
    )
}

#: Lower-cased root names: a level-1 truth equal to one of these is the taxonomy root (never scored).
ROOT_NAMES = frozenset(t.root.lower() for t in TAXONOMIES.values() if t.root)


def get_info(taxonomy_id: str) -> TaxonomyInfo:
    try:
        return TAXONOMIES[taxonomy_id]
    except KeyError:
        raise KeyError(f"unknown taxonomy {taxonomy_id!r}; known: {', '.join(TAXONOMIES)}") from None


@dataclass
class Taxonomy:
    """A loaded taxonomy: leaf -> path (root first), with what validation found."""

    info: TaxonomyInfo | None
    source: Path
    paths: dict[str, tuple[str, ...]]
    warnings: list[str] = field(default_factory=list)

    def names_by_depth(self) -> list[list[str]]:
        """Distinct node names at each depth (0-based), in first-seen order."""
        out: list[dict[str, None]] = []
        for path in self.paths.values():
            for d, name in enumerate(path):
                while len(out) <= d:
                    out.append({})
                out[d][name] = None
        return [list(d) for d in out]

    def parents(self) -> dict[str, set[str]]:
        """Node -> set of parents seen across all paths (a consistent tree has one each)."""
        par: dict[str, set[str]] = defaultdict(set)
        for path in self.paths.values():
            for a, b in pairwise(path):
                if a != b:  # CUB genus == species ("Geococcyx"): same name, not a second parent
                    par[b].add(a)
        return par

    def siblings(self, depth: int, name: str) -> list[str]:
        """Names at `depth` sharing a parent with `name` (excluding it)."""
        if depth == 0:
            return [n for n in self.names_by_depth()[0] if n != name]
        parents = {p[depth - 1] for p in self.paths.values() if len(p) > depth and p[depth] == name}
        return sorted({p[depth] for p in self.paths.values()
                       if len(p) > depth and p[depth - 1] in parents and p[depth] != name})


class TaxonomyError(ValueError):
    pass


def taxonomy_path(id_or_path: str | Path) -> tuple[TaxonomyInfo | None, Path]:
    p = Path(id_or_path)
    if str(id_or_path) in TAXONOMIES:
        info = TAXONOMIES[str(id_or_path)]
        return info, data_dir("taxonomies") / info.file
    if p.is_file():
        info = next((t for t in TAXONOMIES.values() if t.file == p.name), None)
        return info, p
    raise TaxonomyError(f"no taxonomy {str(id_or_path)!r}: not a known id ({', '.join(TAXONOMIES)}) nor a file")


def load_taxonomy(id_or_path: str | Path) -> Taxonomy:
    """Load and validate a taxonomy. Hard errors raise; soft findings go to `.warnings`."""
    info, path = taxonomy_path(id_or_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaxonomyError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise TaxonomyError(f"{path}: expected a JSON object leaf -> path, got {type(raw).__name__}")
    paths: dict[str, tuple[str, ...]] = {}
    warnings: list[str] = []
    for leaf, p in raw.items():
        if not isinstance(p, list) or not p or not all(isinstance(x, str) and x for x in p):
            raise TaxonomyError(f"{path}: leaf {leaf!r}: path must be a non-empty list of non-empty strings")
        if p[-1] != leaf:
            how = "differs only in case" if p[-1].lower() == leaf.lower() else "differs"
            warnings.append(f"leaf {leaf!r}: last path element {p[-1]!r} {how} from the key")
        paths[leaf] = tuple(p)
    tax = Taxonomy(info, path, paths, warnings)
    for leaf, p in paths.items():
        for a, b in pairwise(p):
            if a == b:
                warnings.append(f"leaf {leaf!r}: {a!r} repeats at two consecutive levels")
    for node, ps in sorted(tax.parents().items()):
        if len(ps) > 1:
            warnings.append(f"node {node!r} has {len(ps)} parents: {', '.join(sorted(ps))}")
    return tax


def infer_taxonomy(labels: list[str], level1_truths: list[str]) -> str | None:
    """Guess which known taxonomy a set of items belongs to, from leaf labels (case-insensitive)."""
    wanted = {x.lower() for x in labels}
    best, best_hits = None, 0
    for t in TAXONOMIES.values():
        tax = load_taxonomy(t.id)
        keys = {k.lower() for k in tax.paths} | {p[-1].lower() for p in tax.paths.values()}
        hits = len(wanted & keys)
        if hits > best_hits:
            best, best_hits = t.id, hits
    if best is None or best_hits < max(1, len(wanted) // 2):
        return None
    return best
