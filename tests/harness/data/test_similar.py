"""Re-mining an items file with any strategy (harness/data/similar.py), and the strategy table:
every entry resolves, and the data layer loads no model code until "similar" is asked for."""

from __future__ import annotations

import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from harness.data.build import write_jsonl_atomic
from harness.data.distractors import STRATEGIES, LevelQuery, distractor_stats, make_strategy, strategy_factory
from harness.data.items import read_items
from harness.data.similar import MineReport, mine_items
from harness.data.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[3]
CUB_RANDOM = REPO / "data/hierarchy/CUB200_with_random_choice.jsonl"


def test_the_table_names_every_strategy_and_each_resolves():
    assert list(STRATEGIES) == ["random", "siblings", "similar"]
    cub = load_taxonomy("cub")
    for name in ("random", "siblings"):
        assert make_strategy(name, cub).name == name
    with pytest.raises(ValueError, match="unknown distractor strategy 'nope'; known: random, siblings, similar"):
        strategy_factory("nope")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    factory = strategy_factory("similar")
    assert (factory.__module__, factory.__name__, factory.name) == (
        "harness.backends.clip_mining", "SimilarDistractors", "similar")


def test_the_data_layer_imports_no_backend_and_no_torch():
    code = ("import sys, harness.data.build, harness.data.distractors, harness.data.similar, harness.cli.build\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('harness.backends', 'harness.cli.clip'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_remining_with_siblings_keeps_truths_and_maximises_the_sibling_share(tmp_path):
    cub = load_taxonomy("cub")
    strat = make_strategy("siblings", cub)
    report = MineReport()
    out = tmp_path / "mined.jsonl"
    assert write_jsonl_atomic(mine_items(CUB_RANDOM, cub, strat, limit=300, report=report), out) == 300
    assert (report.items, report.questions) == (300, 1200)
    mined, orig = list(read_items(out)), list(islice(read_items(CUB_RANDOM), 300))
    assert [(m.image, m.label, [lv.truth for lv in m.levels]) for m in mined] == \
           [(o.image, o.label, [lv.truth for lv in o.levels]) for o in orig]
    assert all(c == c.lower() for m in mined for lv in m.levels for c in lv.choices)  # CUB: lower case
    # every question offers as many siblings as its parent has (up to 3): the most a strategy can
    want: dict[int, int] = {}
    leaf = {k.lower(): k for k in cub.paths}
    for m in mined:
        key = leaf[m.label.lower()]
        for lv in m.levels[1:]:
            q = LevelQuery(m.image, key, cub.paths[key], lv.n - 1)
            others = [s for s in strat.siblings(q) if s.lower() != lv.truth.lower()]
            want[lv.n] = want.get(lv.n, 0) + min(3, len(others))
    got = {n: st.sibling for n, st in distractor_stats(out, cub).items()}
    assert got == want and got == {2: 568, 3: 694, 4: 215}
