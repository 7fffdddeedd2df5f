"""Metrics against a second implementation written here from the protocol's section 5 table."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.metrics.hierarchy import Summary, bootstrap_ci, score_item, summarize

# ------------------------------------------------------------------ oracle (protocol section 5)


def _low(x):
    return None if x is None else x.lower()


def oracle_item(truth: list[str], pred: list[str | None]) -> dict[str, float]:
    """Per-sample values, straight from the table. All comparisons lower-case both sides; a None
    prediction (unanswered) equals nothing."""
    t = [_low(x) for x in truth]
    p = [_low(x) for x in pred]

    def eq(i: int) -> bool:
        return i < len(p) and p[i] is not None and p[i] == t[i]

    # HCA: the whole predicted path equals the truth path (same length, every level right)
    hca = 1.0 if len(p) == len(t) and all(eq(i) for i in range(len(t))) else 0.0
    # leaf accuracy: last predicted element == last truth element
    leaf = 1.0 if p and p[-1] is not None and p[-1] == t[-1] else 0.0
    # POR: positions i (zip, shorter list) with pred[i] == true[i], / len(true)
    matches = sum(1 for i in range(min(len(p), len(t))) if eq(i))
    por = matches / len(t)
    # strict POR: longest correct prefix / len(true)
    k = 0
    while k < min(len(p), len(t)) and eq(k):
        k += 1
    strict = k / len(t)
    # TOR: j < len(true)-1 with both j and j+1 right, / (len(true)-1); 0 if len(true) == 1
    tor = 0.0 if len(t) == 1 else sum(1 for j in range(len(t) - 1) if eq(j) and eq(j + 1)) / (len(t) - 1)
    # POR-F1: precision matches/len(pred), recall matches/len(true)
    prec = matches / len(p) if p else 0.0
    rec = matches / len(t)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"hca": hca, "leaf": leaf, "por": por, "strict_por": strict, "tor": tor, "por_f1": f1}


def oracle_summary(pairs: list[tuple[list[str], list[str | None]]]) -> dict:
    kept = [(t, p) for t, p in pairs if t]  # empty truth lists are excluded from N
    n = len(kept)
    out = {"n_items": n}
    names = {"hca": "hca", "leaf_acc": "leaf", "por": "por", "strict_por": "strict_por", "tor": "tor",
             "por_f1": "por_f1"}
    items = [oracle_item(t, p) for t, p in kept]
    for k, v in names.items():
        out[k] = sum(it[v] for it in items) / n * 100 if n else 0.0
    # per-level accuracy by depth position: items having a truth there; a missing prediction is wrong
    depth = max((len(t) for t, _ in kept), default=0)
    per = {}
    for j in range(depth):
        have = [(t, p) for t, p in kept if j < len(t)]
        right = sum(1 for t, p in have if j < len(p) and p[j] is not None and p[j].lower() == t[j].lower())
        per[str(j + 1)] = right / len(have) * 100
    out["per_level"] = per
    return out


# ------------------------------------------------------------------ strategies

NAMES = ["passeriformes", "Corvidae", "corvus", "Corvus Corax", "laridae", "larus", "anas", "x"]


def _recase(draw, s: str) -> str:
    mode = draw(st.sampled_from(["same", "upper", "lower", "title"]))
    return {"same": s, "upper": s.upper(), "lower": s.lower(), "title": s.title()}[mode]


@st.composite
def truth_and_pred(draw):
    depth = draw(st.integers(1, 12))
    truth = [draw(st.sampled_from(NAMES)) for _ in range(depth)]
    pred = []
    for t in truth:
        kind = draw(st.sampled_from(["right", "right", "right", "wrong", "none", "unknown", "error"]))
        if kind == "right":
            pred.append(_recase(draw, t))
        elif kind == "wrong":
            pred.append(draw(st.sampled_from([n for n in NAMES if n.lower() != t.lower()])))
        else:
            pred.append({"none": None, "unknown": "Unknown", "error": "Error"}[kind])
    # reference files: the prediction list may be shorter or longer than the truth list
    shape = draw(st.sampled_from(["same", "same", "same", "shorter", "longer"]))
    if shape == "shorter":
        pred = pred[: draw(st.integers(0, len(pred)))]
    elif shape == "longer":
        pred = pred + [draw(st.sampled_from(NAMES + ["Unknown"])) for _ in range(draw(st.integers(1, 3)))]
    return truth, pred


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ------------------------------------------------------------------ property tests

@settings(max_examples=400, deadline=None)
@given(truth_and_pred())
def test_score_item_matches_protocol(tp):
    truth, pred = tp
    sc = score_item(truth, pred)
    want = oracle_item(truth, pred)
    assert _close(sc.hca, want["hca"])
    assert _close(sc.leaf, want["leaf"])
    assert _close(sc.por, want["por"])
    assert _close(sc.strict_por, want["strict_por"])
    assert _close(sc.tor, want["tor"])
    assert _close(sc.por_f1, want["por_f1"])


@settings(max_examples=200, deadline=None)
@given(st.lists(truth_and_pred(), min_size=0, max_size=25), st.integers(0, 3))
def test_summarize_matches_protocol(pairs, n_empty):
    pairs = pairs + [([], ["whatever"])] * n_empty  # empty truth: excluded from N
    s = summarize((range(1, len(t) + 1), t, p) for t, p in pairs)
    want = oracle_summary(pairs)
    assert s.n_items == want["n_items"]
    for k in ("hca", "leaf_acc", "por", "strict_por", "tor", "por_f1"):
        assert _close(getattr(s, k), want[k]), k
    assert s.per_level.keys() == want["per_level"].keys()
    for k, v in want["per_level"].items():
        assert _close(s.per_level[k], v), k
    assert sum(s.per_level_n.values()) == sum(len(t) for t, _ in pairs)


@given(st.lists(truth_and_pred(), min_size=1, max_size=10))
def test_por_f1_equals_por_when_lengths_match(pairs):
    for t, p in pairs:
        if len(t) == len(p):
            sc = score_item(t, p)
            assert _close(sc.por_f1, sc.por)
            assert sc.strict_por <= sc.por + 1e-12
            assert sc.hca <= sc.strict_por + 1e-12


# ------------------------------------------------------------------ hand-computed cases

@pytest.mark.parametrize(
    "truth, pred, hca, leaf, por, strict, tor, f1",
    [
        (["a", "b", "c", "d"], ["a", "b", "c", "d"], 1, 1, 1, 1, 1, 1),
        (["a", "b", "c", "d"], ["a", "b", "x", "d"], 0, 1, 0.75, 0.5, 1 / 3, 0.75),
        (["a", "b", "c", "d"], ["x", "b", "c", "d"], 0, 1, 0.75, 0, 2 / 3, 0.75),
        (["a", "b", "c", "d"], ["a", None, "c", "Unknown"], 0, 0, 0.5, 0.25, 0, 0.5),
        (["a"], ["a"], 1, 1, 1, 1, 0, 1),  # TOR with len 1 is 0
        (["a"], ["B"], 0, 0, 0, 0, 0, 0),
        (["Passeriformes", "Corvidae"], ["passeriformes", "CORVIDAE"], 1, 1, 1, 1, 1, 1),
        (["a", "b", "c"], ["a", "b"], 0, 0, 2 / 3, 2 / 3, 0.5, 0.8),  # shorter prediction list
        (["a", "b"], ["a", "b", "c"], 0, 0, 1, 1, 1, 0.8),  # longer prediction list
        (["a", "b"], [], 0, 0, 0, 0, 0, 0),
        (["error", "b"], ["Error", "b"], 1, 1, 1, 1, 1, 1),  # plain strings: compared like any other
    ],
)
def test_score_item_hand_computed(truth, pred, hca, leaf, por, strict, tor, f1):
    sc = score_item(truth, pred)
    assert (sc.hca, sc.leaf) == (hca, leaf)
    assert _close(sc.por, por) and _close(sc.strict_por, strict)
    assert _close(sc.tor, tor) and _close(sc.por_f1, f1)


def test_summary_small_case_in_percent():
    s = summarize([
        ([1, 2, 3, 4], ["a", "b", "c", "d"], ["a", "b", "c", "d"]),
        ([1, 2, 3, 4], ["a", "b", "c", "d"], ["a", "b", "x", "d"]),
        ([1, 2, 3, 4], ["a", "b", "c", "e"], ["a", None, "c", "d"]),
        ([], [], []),  # excluded
    ])
    assert s.n_items == 3
    assert _close(s.hca, 100 / 3)
    assert _close(s.leaf_acc, 200 / 3)
    assert _close(s.por, (1 + 0.75 + 0.5) / 3 * 100)
    assert _close(s.strict_por, (1 + 0.5 + 0.25) / 3 * 100)
    assert _close(s.tor, (1 + 1 / 3 + 0) / 3 * 100)
    assert s.per_level == pytest.approx({"1": 100.0, "2": 200 / 3, "3": 200 / 3, "4": 200 / 3})
    assert s.per_level_n == {"1": 3, "2": 3, "3": 3, "4": 3}
    j = s.to_json()
    # machine-readable output carries full precision (no rounding to 4 decimals)
    assert j["hca"] == 1 / 3 * 100 and j["per_level"]["2"] == 2 / 3 * 100 and j["n_items"] == 3
    lo, hi = j["hca_ci"]
    assert 0 <= lo <= 100 / 3 <= hi <= 100


def test_per_level_uses_level_numbers_and_counts_missing_predictions():
    # levels 2..4 scored (root dropped); the third item has no prediction for level 4
    s = summarize([([2, 3, 4], ["a", "b", "c"], ["a", "b", "c"]),
                   ([2, 3, 4], ["a", "b", "c"], ["a", "x", "c"]),
                   ([2, 3, 4], ["a", "b", "c"], ["a", "b"])])
    assert list(s.per_level) == ["2", "3", "4"]
    assert s.per_level["2"] == 100.0
    assert _close(s.per_level["3"], 200 / 3)
    assert _close(s.per_level["4"], 200 / 3)  # 2 of 3: the missing prediction counts wrong
    assert s.per_level_n["4"] == 3


def test_empty_summary():
    s = summarize([])
    assert s.n_items == 0 and s.hca == 0.0 and s.per_level == {}
    j = s.to_json()
    assert j["hca_ci"] == [None, None]


def test_consistency_breakdown():
    s = summarize([
        ([1, 2, 3], ["a", "b", "c"], ["a", "b", "c"]),  # all right: neither
        ([1, 2, 3], ["a", "b", "c"], ["x", "b", "c"]),  # leaf right, an ancestor wrong
        ([1, 2, 3], ["a", "b", "c"], ["a", "x", "c"]),  # leaf right, an ancestor wrong
        ([1, 2, 3], ["a", "b", "c"], ["a", "b", "x"]),  # ancestors right, leaf wrong
        ([1, 2, 3], ["a", "b", "c"], ["x", "y", "z"]),  # all wrong: neither
    ])
    assert _close(s.leaf_right_ancestor_wrong, 40.0)
    assert _close(s.ancestors_right_leaf_wrong, 20.0)
    assert _close(s.leaf_acc, 60.0) and _close(s.hca, 20.0)
    # identity: leaf = HCA + leaf-right-ancestor-wrong
    assert _close(s.leaf_acc, s.hca + s.leaf_right_ancestor_wrong)


def test_hierarchical_set_f1():
    sc = score_item(["a", "b", "c", "d"], ["b", "a", "x", None])
    # sets {a, b, x} vs {a, b, c, d}: precision 2/3, recall 1/2
    assert _close(sc.hf1, 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert sc.por == 0


# ------------------------------------------------------------------ bootstrap CI

@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (3, 10), (50, 100), (213, 1000), (5794 // 3, 5794)])
def test_bootstrap_ci_contains_point_estimate(k, n):
    lo, hi = bootstrap_ci(k, n)
    assert lo <= k / n * 100 <= hi
    assert 0 <= lo <= hi <= 100
    assert bootstrap_ci(k, n) == (lo, hi)  # seeded: reproducible


def test_bootstrap_ci_narrows_with_n():
    cis = [bootstrap_ci(n * 3 // 10, n) for n in (100, 1000, 10000, 100000)]
    widths = [hi - lo for lo, hi in cis]
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 10
    # about the normal-approximation width 2 * 1.96 * sqrt(p(1-p)/n)
    assert widths[1] == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 1000) * 100, rel=0.1)


def test_bootstrap_ci_empty():
    lo, hi = bootstrap_ci(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


def test_summary_to_json_keys():
    j = Summary().to_json()
    for k in ("n_items", "hca", "leaf_acc", "por", "strict_por", "tor", "per_level"):
        assert k in j
