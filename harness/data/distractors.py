"""Distractor strategies: which wrong options a question offers next to the truth.

A strategy gets one :class:`LevelQuery` (image, leaf, the leaf's full path and the depth asked), the
pool of every distinct name at that depth, how many distractors to return and a per-question RNG,
and returns distinct wrong names from the pool. Strategies never see processing order: the builder
derives the RNG from a stable hash of (image, depth, seed) (:func:`rng_for`), so the same inputs give
the same records however they are batched or ordered.

Image-dependent strategies (similar-choice mining by CLIP/SigLIP image-text similarity) plug in
through the optional ``prepare(queries)`` hook: the builder calls it with a batch of queries (all
levels of a few hundred images) before asking ``choose`` for any of them, so a strategy can embed the
batch's images once and cache its rankings. :data:`STRATEGIES` names every strategy (random,
siblings, similar) and where its factory lives, ``factory(taxonomy, **options) -> DistractorStrategy``;
:func:`make_strategy` imports it when asked. A caller may also pass a strategy object to the builder.

:func:`distractor_stats` measures how hard a file's distractors are: per level, the share of
distractors that share the truth's parent (the sibling share).
"""

from __future__ import annotations

import hashlib
import importlib
import random
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from harness.data.items import read_items
from harness.data.taxonomy import Taxonomy, load_taxonomy


@dataclass(frozen=True, slots=True)
class LevelQuery:
    """One question to fill: the image, its leaf (taxonomy key), the leaf's path and the depth asked."""

    image: str
    leaf: str
    path: tuple[str, ...]  # root first, original case
    depth: int  # 0-based index into path

    @property
    def truth(self) -> str:
        return self.path[self.depth]

    @property
    def parent(self) -> str | None:
        """The truth's parent on this leaf's own path (None at depth 0)."""
        return self.path[self.depth - 1] if self.depth > 0 else None


@runtime_checkable
class DistractorStrategy(Protocol):
    """Chooses the wrong options of one question.

    ``choose`` returns at most ``k`` distinct names from ``pool`` (compared case-insensitively), none
    equal to ``query.truth``; fewer when the pool has fewer other names. ``pool`` holds every distinct
    name at ``query.depth`` (case-insensitively deduplicated, sorted) and so may contain the truth.
    Use ``rng`` for every random decision (it is seeded per image, depth and seed).

    Optional hook, called by the builder before ``choose`` for a batch of queries:
    ``prepare(self, queries: Sequence[LevelQuery]) -> None``.
    """

    name: str

    def choose(self, query: LevelQuery, pool: Sequence[str], k: int, rng: random.Random) -> list[str]: ...


def rng_for(image: str, depth: int, seed: int) -> random.Random:
    """A per-question RNG from a stable hash of (image, depth, seed) (blake2b, not Python's hash())."""
    h = hashlib.blake2b(f"{seed}\x1f{depth}\x1f{image}".encode(), digest_size=8)
    return random.Random(int.from_bytes(h.digest(), "big"))


def depth_pools(taxonomy: Taxonomy) -> list[tuple[str, ...]]:
    """Distinct names per depth (0-based), deduplicated case-insensitively (first spelling kept),
    sorted case-insensitively so the result does not depend on the order of the taxonomy file."""
    out = []
    for names in taxonomy.names_by_depth():
        seen: dict[str, str] = {}
        for n in names:
            seen.setdefault(n.lower(), n)
        out.append(tuple(sorted(seen.values(), key=lambda s: (s.lower(), s))))
    return out


def sample_excluding(pool: Sequence[str], exclude: Collection[str], k: int, rng: random.Random) -> list[str]:
    """Uniform random sample (in random order) of up to k names of `pool` whose lower-case form is
    not in `exclude` (lower-case names). O(k + len(exclude)), not O(len(pool))."""
    if k <= 0 or not pool:
        return []
    m = min(len(pool), k + len(exclude))
    picked = (pool[i] for i in rng.sample(range(len(pool)), m))
    return [x for x in picked if x.lower() not in exclude][:k]


class RandomDistractors:
    """Uniform draw of other names at the same depth (the reference's "random" choices)."""

    name = "random"

    def __init__(self, taxonomy: Taxonomy | None = None, **_: object):
        pass

    def choose(self, query: LevelQuery, pool: Sequence[str], k: int, rng: random.Random) -> list[str]:
        return sample_excluding(pool, {query.truth.lower()}, k, rng)


class SiblingDistractors:
    """"Hard random": names sharing the truth's parent first (random among them), then random names
    of the same depth to fill up. At depth 0 (no parent) this is the random strategy."""

    name = "siblings"

    def __init__(self, taxonomy: Taxonomy, **_: object):
        # (depth, parent lower) -> children at depth, deduplicated case-insensitively, sorted
        kids: dict[tuple[int, str], dict[str, str]] = defaultdict(dict)
        for path in taxonomy.paths.values():
            for d in range(1, len(path)):
                kids[(d, path[d - 1].lower())].setdefault(path[d].lower(), path[d])
        self._children = {key: tuple(sorted(v.values(), key=lambda s: (s.lower(), s))) for key, v in kids.items()}

    def siblings(self, query: LevelQuery) -> tuple[str, ...]:
        """Names at the query's depth under the truth's parent (on this leaf's path); may include the truth."""
        if query.parent is None:
            return ()
        return self._children.get((query.depth, query.parent.lower()), ())

    def choose(self, query: LevelQuery, pool: Sequence[str], k: int, rng: random.Random) -> list[str]:
        truth = query.truth.lower()
        out = sample_excluding(self.siblings(query), {truth}, k, rng)
        if len(out) < k:
            out += sample_excluding(pool, {truth, *(x.lower() for x in out)}, k - len(out), rng)
        return out


StrategyFactory = Callable[..., DistractorStrategy]

#: Every distractor strategy by name, as "module:factory" with factory(taxonomy, **options). This table
#: is the one plugin point: a strategy is added by adding its line here. Entries are imported only
#: when asked for, so a strategy may live above the data layer (the CLIP/SigLIP "similar" mining
#: needs torch and a model) without the data package importing it.
STRATEGIES: dict[str, str] = {
    "random": "harness.data.distractors:RandomDistractors",
    "siblings": "harness.data.distractors:SiblingDistractors",
    "similar": "harness.backends.clip_mining:SimilarDistractors",
}


def strategy_factory(name: str) -> StrategyFactory:
    """The factory registered as `name` in :data:`STRATEGIES` (imported on first use)."""
    try:
        target = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown distractor strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_strategy(name: str, taxonomy: Taxonomy, **options: object) -> DistractorStrategy:
    """A strategy by name (see :data:`STRATEGIES`) for `taxonomy`; options go to its factory."""
    return strategy_factory(name)(taxonomy, **options)


def check_distractors(query: LevelQuery, chosen: Sequence[str], pool_lower: Collection[str], k: int,
                      strategy: str = "?") -> None:
    """Raise ValueError when a strategy broke its contract (truth among the distractors, duplicates,
    names outside the same-depth pool, too many)."""
    low = [x.lower() for x in chosen]
    problem = None
    if len(chosen) > k:
        problem = f"returned {len(chosen)} distractors, at most {k} asked"
    elif query.truth.lower() in low:
        problem = f"returned the truth {query.truth!r}"
    elif len(set(low)) != len(low):
        problem = f"returned duplicates {list(chosen)}"
    elif bad := [x for x in chosen if x.lower() not in pool_lower]:
        problem = f"returned names not at depth {query.depth}: {bad}"
    if problem:
        raise ValueError(f"distractor strategy {strategy!r} {problem} (image {query.image!r}, depth {query.depth})")


# --- measures -------------------------------------------------------------------------------------


@dataclass
class LevelDistractorStats:
    """Sibling share of one level: distractors whose parent is the truth's parent."""

    level: int  # the N of levelN
    questions: int = 0
    distractors: int = 0  # distractors whose parent could be looked up
    sibling: int = 0  # ... of which share the truth's parent
    unknown: int = 0  # distractors not found at this depth of the taxonomy (not in `distractors`)

    @property
    def share(self) -> float:
        """Sibling share as a fraction (0..1); 0.0 when there are no distractors."""
        return self.sibling / self.distractors if self.distractors else 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.share

    def as_dict(self) -> dict:
        return {"level": self.level, "questions": self.questions, "distractors": self.distractors,
                "sibling": self.sibling, "unknown": self.unknown, "sibling_pct": round(self.percent, 2)}


def _parents_by_depth(taxonomy: Taxonomy) -> tuple[list[dict[str, set[str]]], list[set[str]]]:
    par: list[dict[str, set[str]]] = []
    names: list[set[str]] = []
    for path in taxonomy.paths.values():
        for d, name in enumerate(path):
            while len(par) <= d:
                par.append(defaultdict(set))
                names.append(set())
            names[d].add(name.lower())
            if d:
                par[d][name.lower()].add(path[d - 1].lower())
    return par, names


def distractor_stats(items_path: str | Path, taxonomy: str | Path | Taxonomy,
                     strict: bool = True) -> dict[int, LevelDistractorStats]:
    """Per level N (from 2 on: level 1 has no parent), the share of distractors that share the truth's
    parent. The truth's parent is the item's own level N-1 truth; a distractor's parents are looked up
    in the taxonomy at the same depth, case-insensitively (annotations may be lower-case). Levels are
    aligned to taxonomy depths per item: level 1 is depth 0 when its truth is a depth-0 name (CUB, or
    files that carry the root), else depth 1 (files that leave the root out)."""
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy)
    par, names = _parents_by_depth(tax)
    out: dict[int, LevelDistractorStats] = {}
    for item in read_items(items_path, strict=strict):
        first = item.levels[0].truth
        offset = 0 if first is None or first.lower() in names[0] or len(names) < 2 else 1
        for prev, lv in zip(item.levels, item.levels[1:]):
            depth = lv.n - 1 + offset
            if lv.truth is None or prev.truth is None or depth >= len(par):
                continue
            st = out.setdefault(lv.n, LevelDistractorStats(lv.n))
            st.questions += 1
            truth_parent = prev.truth.lower()
            for c in lv.choices:
                if c.lower() == lv.truth.lower():
                    continue
                ps = par[depth].get(c.lower())
                if ps is None:
                    st.unknown += 1
                    continue
                st.distractors += 1
                st.sibling += truth_parent in ps
    return dict(sorted(out.items()))


def format_stats(stats: dict[int, LevelDistractorStats]) -> str:
    lines = [f"{'level':>5}  {'questions':>9}  {'distractors':>11}  {'sibling share':>13}  unknown"]
    for st in stats.values():
        lines.append(f"{st.level:>5}  {st.questions:>9,}  {st.distractors:>11,}  {st.percent:>12.1f}%  {st.unknown:>7,}")
    return "\n".join(lines)

