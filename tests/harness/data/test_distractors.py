"""Distractor strategies, per-question RNG, and the sibling-share measure."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from harness.data.build import build_items
from harness.data.distractors import (
    STRATEGIES,
    DistractorStrategy,
    LevelQuery,
    RandomDistractors,
    SiblingDistractors,
    check_distractors,
    depth_pools,
    distractor_stats,
    make_strategy,
    rng_for,
    sample_excluding,
)
from harness.data.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[3]
CUB_RANDOM = REPO / "data/hierarchy/CUB200_with_random_choice.jsonl"
CUB_SIMILAR = REPO / "data/hierarchy/CUB200_with_similar_choice.jsonl"


@pytest.fixture(scope="module")
def cub():
    return load_taxonomy("cub")


def _query(tax, leaf, depth, image="img.jpg"):
    return LevelQuery(image, leaf, tax.paths[leaf], depth)


def test_rng_for_is_stable_and_keyed():
    # Fixed value: changing the hashing scheme would silently change every built file.
    assert rng_for("a.jpg", 3, 0).getrandbits(32) == 980071144
    assert rng_for("a.jpg", 3, 0).random() == rng_for("a.jpg", 3, 0).random()
    vals = {rng_for(*args).random() for args in [("a.jpg", 3, 0), ("a.jpg", 2, 0), ("a.jpg", 3, 1), ("b.jpg", 3, 0)]}
    assert len(vals) == 4


def test_depth_pools_match_protocol_counts(cub):
    assert [len(p) for p in depth_pools(cub)] == [13, 37, 124, 200]
    assert [len(p) for p in depth_pools(load_taxonomy("food"))] == [1, 6, 29, 40, 24]
    assert [len(p) for p in depth_pools(load_taxonomy("imagenet_animal"))] == [1, 2, 10, 37, 81, 123, 81, 65, 41, 64, 34, 2]
    pool = depth_pools(cub)[0]
    assert list(pool) == sorted(pool, key=str.lower)


def test_sample_excluding_is_uniform_and_never_excluded():
    pool = [f"n{i}" for i in range(10)]
    counts: Counter[str] = Counter()
    rng = random.Random(1)
    for _ in range(20000):
        out = sample_excluding(pool, {"n3", "n7"}, 3, rng)
        assert len(out) == 3 and len(set(out)) == 3 and not {"n3", "n7"} & set(out)
        counts.update(out)
    assert set(counts) == set(pool) - {"n3", "n7"}
    expected = 20000 * 3 / 8
    assert all(abs(c - expected) < 0.05 * expected for c in counts.values())
    # fewer candidates than asked: every other one, nothing more
    assert sorted(sample_excluding(["a", "B", "c"], {"b"}, 5, rng)) == ["a", "c"]
    assert sample_excluding([], set(), 3, rng) == []


def test_random_distractors(cub):
    strat = RandomDistractors()
    pools = depth_pools(cub)
    q = _query(cub, "Laysan Albatross", 3)
    out = strat.choose(q, pools[3], 3, rng_for(q.image, 3, 0))
    assert len(out) == 3 and "Laysan Albatross" not in out and set(out) <= set(pools[3])
    assert out == strat.choose(q, pools[3], 3, rng_for(q.image, 3, 0))  # same RNG, same answer
    # few names at a depth: fewer options (ImageNet-animal depth 1 = vertebrate/invertebrate; root alone)
    ia = load_taxonomy("imagenet_animal")
    ip = depth_pools(ia)
    assert strat.choose(_query(ia, "tench", 1), ip[1], 3, random.Random(0)) == ["invertebrate"]
    assert strat.choose(_query(ia, "tench", 0), ip[0], 3, random.Random(0)) == []


def test_sibling_distractors_prefer_the_truths_parent(cub):
    strat = SiblingDistractors(cub)
    pools = depth_pools(cub)
    # Phoebastria holds Black-footed and Laysan Albatross: the one sibling, then 2 random species
    q = _query(cub, "Laysan Albatross", 3)
    out = strat.choose(q, pools[3], 3, rng_for(q.image, 3, 0))
    assert out[0] == "Black-footed Albatross" and len(set(out)) == 3 and "Laysan Albatross" not in out
    # Diomedeidae has the genera Phoebastria and Phoebetria
    assert strat.choose(_query(cub, "Laysan Albatross", 2), pools[2], 3, random.Random(0))[0] == "Phoebetria"
    # depth 0 has no parent: random
    assert len(strat.choose(_query(cub, "Laysan Albatross", 0), pools[0], 3, random.Random(0))) == 3


def test_sibling_distractors_take_all_siblings_up_to_k(cub):
    """Over every CUB leaf and depth: sibling distractors == min(k, number of siblings)."""
    strat = SiblingDistractors(cub)
    pools = depth_pools(cub)
    for leaf, path in cub.paths.items():
        for d in range(1, len(path)):
            q = LevelQuery(f"{leaf}.jpg", leaf, path, d)
            sib = {s.lower() for s in cub.siblings(d, path[d])}
            out = strat.choose(q, pools[d], 3, rng_for(q.image, d, 0))
            check_distractors(q, out, {x.lower() for x in pools[d]}, 3, "siblings")
            assert len(out) == 3
            assert sum(x.lower() in sib for x in out) == min(3, len(sib)), (leaf, d)


def test_sibling_distractors_follow_the_items_own_path_for_two_parent_nodes():
    """ImageNet-artifact 'sports equipment' sits under both 'implement' and 'equipment'."""
    tax = load_taxonomy("imagenet_artifact")
    strat = SiblingDistractors(tax)
    under_implement = set(strat.siblings(_query(tax, "racket", 3)))
    under_equipment = set(strat.siblings(_query(tax, "barbell", 3)))
    assert "sports equipment" in under_implement and "sports equipment" in under_equipment
    assert "writing implement" in under_implement and "writing implement" not in under_equipment
    assert under_implement != under_equipment


def test_check_distractors_rejects_contract_breaks(cub):
    q = _query(cub, "Laysan Albatross", 3)
    low = {x.lower() for x in depth_pools(cub)[3]}
    check_distractors(q, ["Sooty Albatross"], low, 3)
    for bad, why in [(["laysan albatross"], "truth"), (["Sooty Albatross", "sooty albatross"], "duplicates"),
                     (["Phoebastria"], "not at depth"), (["Sooty Albatross"] * 4, "at most")]:
        with pytest.raises(ValueError, match=why):
            check_distractors(q, bad, low, 3, "x")


class ByImage:
    """Image-dependent: 'prepare' sees batches; picks depend on the image name only."""

    name = "by-image"

    def __init__(self, taxonomy, **options):
        self.batches: list[int] = []
        self.seen: set[str] = set()

    def prepare(self, queries):
        self.batches.append(len(queries))
        self.seen.update(q.image for q in queries)

    def choose(self, query, pool, k, rng):
        assert query.image in self.seen  # prepare ran first
        start = sum(map(ord, query.image)) % len(pool)
        rot = list(pool[start:]) + list(pool[:start])
        return [x for x in rot if x.lower() != query.truth.lower()][:k]


def test_registry_and_an_image_dependent_strategy_with_batching(cub, monkeypatch):
    assert {"random", "siblings"} <= set(STRATEGIES)
    assert isinstance(make_strategy("random", cub), DistractorStrategy)
    with pytest.raises(ValueError, match="unknown distractor strategy"):
        make_strategy("nope", cub)

    monkeypatch.setitem(STRATEGIES, "by-image", f"{__name__}:ByImage")
    images = [(f"/d/{i}.jpg", leaf) for i, leaf in enumerate(list(cub.paths)[:10])]
    strat = make_strategy("by-image", cub)
    recs = list(build_items(cub, images, strat, batch_size=4))
    assert strat.batches == [16, 16, 8]  # 4 levels x (4, 4, 2) images
    again = list(build_items(cub, reversed(images), "by-image", batch_size=3))
    assert sorted(recs, key=lambda r: r["image"]) == sorted(again, key=lambda r: r["image"])


def test_distractor_stats_reproduce_the_protocol_numbers():
    """Protocol 1.2: random 0.9% of species distractors share the genus; similar 26.6% (species share
    genus) and 23.2% (genus distractors share family)."""
    rnd = distractor_stats(CUB_RANDOM, "cub")
    sim = distractor_stats(CUB_SIMILAR, "cub")
    assert list(rnd) == [2, 3, 4] and list(sim) == [2, 3, 4]
    for st in [*rnd.values(), *sim.values()]:
        assert (st.questions, st.distractors, st.unknown) == (5794, 17382, 0)
    assert round(rnd[4].percent, 1) == 0.9
    assert round(sim[4].percent, 1) == 26.6
    assert round(sim[3].percent, 1) == 23.2
    # the other cells, measured (family distractors sharing the order; random genus)
    assert round(rnd[3].percent, 1) == 4.3
    assert round(rnd[2].percent, 1) == 38.4
    assert round(sim[2].percent, 1) == 47.4
    assert rnd[4].as_dict()["sibling_pct"] == round(rnd[4].percent, 2)


def _write(path: Path, recs) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def test_distractor_stats_of_built_files_with_and_without_root(tmp_path):
    tax = load_taxonomy("food")
    images = [(f"/f/{i}.jpg", leaf) for i, leaf in enumerate(tax.paths) for _ in range(3)]
    recs = list(build_items(tax, images, "siblings"))
    with_root = distractor_stats(_write(tmp_path / "a.jsonl", recs), tax)
    assert all(st.unknown == 0 for st in with_root.values())
    # the same items with the root level dropped and levels renumbered
    stripped = []
    for r in recs:
        n = sum(k.startswith("level") for k in r)
        s = {"image": r["image"], "label": r["label"]}
        for i in range(2, n + 1):
            s[f"level{i - 1}"], s[f"choices_level{i - 1}"] = r[f"level{i}"], r[f"choices_level{i}"]
        stripped.append(s)
    no_root = distractor_stats(_write(tmp_path / "b.jsonl", stripped), tax)
    assert {n - 1: (s.distractors, s.sibling) for n, s in with_root.items() if n > 2} == \
        {n: (s.distractors, s.sibling) for n, s in no_root.items()}


def test_built_cub_files_sibling_shares(tmp_path):
    """Our random strategy lands where the reference's random file is; siblings is far harder."""
    images = [(r["image"], r["label"]) for r in map(orjson.loads, CUB_RANDOM.read_bytes().splitlines())]
    rnd = distractor_stats(_write(tmp_path / "r.jsonl", build_items("cub", images, "random")), "cub")
    sib = distractor_stats(_write(tmp_path / "s.jsonl", build_items("cub", images, "siblings")), "cub")
    assert rnd[4].percent < 2.0 and 3.0 < rnd[3].percent < 6.0 and 35.0 < rnd[2].percent < 42.0
    assert sib[4].percent > 30.0 and sib[3].percent > 70.0 and sib[2].percent > 70.0
