"""Hierarchical metrics (reference `metric.py` semantics, section 5 of the protocol) and extras.

Inputs are per-item paths over the *scored* levels (root dropped, None truths skipped), truth and
prediction aligned by level; a prediction of None (unanswered, error) never matches. All comparisons
are case-insensitive. Every metric is a per-item value averaged over items, x100.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


def _eq(p: str | None, t: str) -> bool:
    return p is not None and p.lower() == t.lower()


@dataclass(frozen=True, slots=True)
class ItemScore:
    hca: float
    leaf: float
    por: float
    strict_por: float
    tor: float
    por_f1: float
    hf1: float
    leaf_right_ancestor_wrong: bool
    ancestors_right_leaf_wrong: bool


def score_item(truth: Sequence[str], pred: Sequence[str | None]) -> ItemScore:
    """Metrics of one item. `truth` non-empty; `pred` usually the same length (reference files may
    differ: HCA then fails and POR zips the shorter list, as the reference does)."""
    n = len(truth)
    # Lower-case each element once (perf: this runs for every item of a million-question report).
    tl = [t.lower() for t in truth]
    pl = [p.lower() if p is not None else None for p in pred]
    hits = [p == t for p, t in zip(pl, tl)]
    m = sum(hits)
    hca = float(len(pl) == n and m == n)
    leaf = float(bool(pl) and pl[-1] == tl[-1])
    prefix = 0
    for h in hits:
        if not h:
            break
        prefix += 1
    tor = 0.0
    if n > 1:
        tor = sum(1 for j in range(len(hits) - 1) if hits[j] and hits[j + 1]) / (n - 1)
    precision = m / len(pl) if pl else 0.0
    recall = m / n
    por_f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # Set-based hierarchical F1: predicted vs true node sets (levels predicted independently).
    ps = {p for p in pl if p is not None}
    ts = set(tl)
    inter = len(ps & ts)
    hp = inter / len(ps) if ps else 0.0
    hr = inter / len(ts)
    hf1 = 2 * hp * hr / (hp + hr) if hp + hr else 0.0
    anc_ok = all(hits[:-1]) and len(hits) == n
    return ItemScore(hca, leaf, m / n, prefix / n, tor, por_f1, hf1,
                     leaf_right_ancestor_wrong=bool(leaf) and not anc_ok,
                     ancestors_right_leaf_wrong=anc_ok and not leaf)


def bootstrap_ci(successes: int, n: int, *, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (over items) of the mean of a 0/1 per-item value, in percent.

    Resampling n items with replacement from a 0/1 sample gives Binomial(n, p_hat) successes, so
    the bootstrap distribution is drawn exactly, at no cost for a million items."""
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.binomial(n, successes / n, size=draws) / n * 100
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


@dataclass
class Summary:
    """Aggregated metrics of one run, all rates in percent."""

    n_items: int = 0
    hca: float = 0.0
    leaf_acc: float = 0.0
    por: float = 0.0
    strict_por: float = 0.0
    tor: float = 0.0
    por_f1: float = 0.0
    hf1: float = 0.0
    per_level: dict[str, float] = field(default_factory=dict)
    per_level_n: dict[str, int] = field(default_factory=dict)
    hca_ci: tuple[float, float] = (float("nan"), float("nan"))
    leaf_acc_ci: tuple[float, float] = (float("nan"), float("nan"))
    leaf_right_ancestor_wrong: float = 0.0
    ancestors_right_leaf_wrong: float = 0.0
    n_questions: int = 0
    n_unanswered: int = 0
    n_errors: int = 0

    def to_json(self) -> dict:
        """Machine-readable form at full precision (`report --json`, summary.json, `harness.report`):
        displays round, this never does (38.416666... stays 38.416666..., as the reference prints it)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("hca_ci", "leaf_acc_ci"):
            d[k] = [None if math.isnan(x) else x for x in d[k]]  # NaN (no items) -> null
        d["per_level"] = dict(d["per_level"])
        d["per_level_n"] = dict(d["per_level_n"])
        return d


def summarize(paths: Iterable[tuple[Sequence[int], Sequence[str], Sequence[str | None]]]) -> Summary:
    """Aggregate (levels, truth path, prediction path) triples, one per item (already restricted to
    scored levels). Items with an empty truth path are excluded from N, as in the reference."""
    s = Summary()
    sums = defaultdict(float)
    lvl_hit: dict[int, int] = defaultdict(int)
    lvl_n: dict[int, int] = defaultdict(int)
    hca_k = leaf_k = 0
    for levels, truth, pred in paths:
        if not truth:
            continue
        sc = score_item(truth, pred)
        s.n_items += 1
        hca_k += int(sc.hca)
        leaf_k += int(sc.leaf)
        for k in ("por", "strict_por", "tor", "por_f1", "hf1"):
            sums[k] += getattr(sc, k)
        sums["lraw"] += sc.leaf_right_ancestor_wrong
        sums["arlw"] += sc.ancestors_right_leaf_wrong
        # every truth position counts: a level with no prediction (reference files) is wrong, as the
        # reference counts it, not left out of the denominator
        for k, (lv, t) in enumerate(zip(levels, truth)):
            lvl_n[lv] += 1
            lvl_hit[lv] += k < len(pred) and _eq(pred[k], t)
    n = s.n_items
    if n:
        s.hca, s.leaf_acc = hca_k / n * 100, leaf_k / n * 100
        for k in ("por", "strict_por", "tor", "por_f1", "hf1"):
            setattr(s, k, sums[k] / n * 100)
        s.leaf_right_ancestor_wrong = sums["lraw"] / n * 100
        s.ancestors_right_leaf_wrong = sums["arlw"] / n * 100
        s.hca_ci = bootstrap_ci(hca_k, n)
        s.leaf_acc_ci = bootstrap_ci(leaf_k, n, seed=1)
    s.per_level = {str(lv): lvl_hit[lv] / lvl_n[lv] * 100 for lv in sorted(lvl_n)}
    s.per_level_n = {str(lv): lvl_n[lv] for lv in sorted(lvl_n)}
    return s
