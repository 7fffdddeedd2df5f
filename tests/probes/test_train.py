"""Probe training: separable -> > 95%, shuffled labels -> chance, probe HCA on a constructed case,
epoch selection, skipped levels, outputs readable by `harness report`."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import orjson
import pytest

from harness.metrics.report import summarize_path
from probes.store import FeatureStore, StoreWriter
from probes.train import ProbeConfig, level_tasks, train_probes, validation_groups

FAST = dict(lr=1e-2, batch_size=64, epochs=40)


def make_store(root, rows: list[dict], x: np.ndarray, names=("order", "family", "genus")) -> FeatureStore:
    w = StoreWriter(root, {"model": "synthetic"}, shard_size=256, store_dtype="float32",
                    extra={"level_names": list(names)})
    w.start()
    for i in range(0, len(rows), 64):
        w.add(rows[i:i + 64], {"f": x[i:i + 64]}, i + 64)
    w.finish()
    return FeatureStore(root)


def hierarchical(n: int, seed: int, d: int = 48, noise: float = 0.5, shuffle: bool = False):
    """Rows with a 2/4/8-class hierarchy; features = one random direction per level's class + noise."""
    rng = np.random.default_rng(seed)
    emb = [np.random.default_rng(100 + k).normal(size=(c, d)) * 2.0 for k, c in enumerate((2, 4, 8))]
    leaf = rng.integers(0, 8, n)
    path = np.stack([leaf // 4, leaf // 2, leaf], 1)
    x = sum(emb[k][path[:, k]] for k in range(3)) + rng.normal(size=(n, d)) * noise
    if shuffle:
        path = path[rng.permutation(n)]
    split = np.where(np.arange(n) < n * 2 // 3, "train", "test")
    rows = [{"id": f"i{i}", "group": f"i{i}", "split": str(split[i]),
             "labels": [f"o{path[i, 0]}", f"f{path[i, 1]}", f"g{path[i, 2]}"]} for i in range(n)]
    return rows, x.astype(np.float32)


def test_separable_problem_is_learned(tmp_path):
    rows, x = hierarchical(600, seed=0)
    store = make_store(tmp_path / "s", rows, x)
    run = train_probes(store, "f", tmp_path / "r", ProbeConfig(**FAST), plots=False)
    accs = {r.level: r.test_acc for r in run.levels}
    assert all(a > 95 for a in accs.values()), accs
    assert run.summary.n_items == 200 and run.summary.hca > 90
    # the per-level accuracies of probe.json are those of the metrics code (harness report)
    assert run.summary.per_level == pytest.approx({str(k): v for k, v in accs.items()})
    assert summarize_path(tmp_path / "r").hca == pytest.approx(run.summary.hca)


def test_shuffled_labels_give_chance(tmp_path):
    rows, x = hierarchical(900, seed=1, shuffle=True)
    store = make_store(tmp_path / "s", rows, x)
    run = train_probes(store, "f", tmp_path / "r", ProbeConfig(**FAST, select="last"), plots=False)
    for r in run.levels:
        chance = 100 / r.n_classes
        assert abs(r.test_acc - chance) < 8, (r.level, r.test_acc, chance)
        assert r.train_acc > r.test_acc  # it does fit the training noise a little
    assert run.summary.hca < 100 / 8 + 6


def test_probe_hca_on_a_constructed_case(tmp_path):
    """Text-probing layout (one row per group and level). Test groups 0-9 get a level-1 feature of the
    wrong class, groups 5-14 a level-2 feature of the wrong class: level-1 accuracy 30/40, level-2 30/40,
    and HCA counts a group only when both are right: 25/40 (not 30/40, not 0.75 * 0.75)."""
    d = 8
    rows, feats = [], []
    rng = np.random.default_rng(0)

    def add(group, split, l1, l2, f1, f2):
        labels = [f"a{l1}", f"b{l2}"]
        for level, cls, width in ((1, f1, 2), (2, f2, 4)):
            v = np.zeros(d, np.float32)
            v[(0 if level == 1 else 2) + cls] = 5.0
            feats.append(v + rng.normal(size=d).astype(np.float32) * 0.1)
            rows.append({"id": f"{group}|{level}", "group": group, "split": split, "labels": labels, "level": level})

    for g in range(80):
        l2 = g % 4
        add(f"train{g}", "train", l2 // 2, l2, l2 // 2, l2)
    for g in range(40):
        l2 = g % 4
        f1 = 1 - l2 // 2 if g < 10 else l2 // 2
        f2 = (l2 + 1) % 4 if 5 <= g < 15 else l2
        add(f"test{g}", "test", l2 // 2, l2, f1, f2)
    store = make_store(tmp_path / "s", rows, np.stack(feats), names=("genus", "species"))
    run = train_probes(store, "f", tmp_path / "r", ProbeConfig(**FAST), plots=False)
    assert [r.test_acc for r in run.levels] == [75.0, 75.0]
    assert run.summary.n_items == 40
    assert run.summary.hca == pytest.approx(62.5)
    lines = [orjson.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_bytes().splitlines()]
    wrong = {(x["item"], x["level"]) for x in lines if x["prediction"] != x["truth"]}
    assert wrong == {(f"test{g}", 1) for g in range(10)} | {(f"test{g}", 2) for g in range(5, 15)}


def test_epoch_selection_modes(tmp_path):
    rows, x = hierarchical(600, seed=2, noise=2.0)
    store = make_store(tmp_path / "s", rows, x)
    cfg = dict(lr=3e-3, batch_size=64, epochs=12)
    ref = train_probes(store, "f", tmp_path / "ref", ProbeConfig(**cfg, select="reference"), plots=False)
    val = train_probes(store, "f", tmp_path / "val", ProbeConfig(**cfg, select="val"), plots=False)
    last = train_probes(store, "f", tmp_path / "last", ProbeConfig(**cfg, select="last"), plots=False)
    for r in ref.levels:
        t = r.curves["test_acc"]
        assert r.epoch == t.index(max(t)) and r.test_acc == max(t) and r.n_val == 0
    for r in val.levels:
        v = r.curves["val_acc"]
        assert r.epoch == v.index(max(v)) and r.test_acc == r.curves["test_acc"][r.epoch] and r.n_val > 0
        assert r.n_train + r.n_val == 400
    assert all(r.epoch == 11 for r in last.levels)
    assert ref.summary.hca >= last.summary.hca  # selection on test is optimistic
    doc = orjson.loads((tmp_path / "ref" / "probe.json").read_bytes())
    assert doc["selection"].startswith("[QUIRK]") and doc["config"]["select"] == "reference"


def test_validation_split_is_by_group_and_stable():
    groups = [f"sp{i}" for i in range(200)]
    a = validation_groups(groups, 0.1, 42)
    assert a == validation_groups(list(reversed(groups)) * 2, 0.1, 42)  # order and repeats do not matter
    assert 8 <= len(a) <= 35 and a != validation_groups(groups, 0.1, 43)
    assert validation_groups(["one"], 0.5, 0) == set() and len(validation_groups(["a", "b"], 0.01, 0)) == 1


def test_unprobeable_levels_are_skipped_with_a_reason(tmp_path):
    """Species-disjoint text probing: the species level has no test class in training; the root level has
    one class. Both are reported and left out of HCA."""
    rows = []
    for split, sp in (("train", range(12)), ("test", range(12, 16))):
        for s in sp:
            labels = ["Plantae", f"c{s % 2}", f"species{s}"]
            for lv in (1, 2, 3):
                rows.append({"id": f"{s}|{lv}", "group": f"species{s}", "split": split, "labels": labels, "level": lv})
    cfg = ProbeConfig(select="last")
    tasks = level_tasks(rows, ["kingdom", "class", "species"], cfg)
    assert [t.skipped is not None for t in tasks] == [True, False, True]
    assert "fewer than 2 classes" in tasks[0].skipped and "no test class occurs in training" in tasks[2].skipped
    assert tasks[1].name == "class" and len(tasks[1].train) == 12 and tasks[2].test_unseen == 4
    with pytest.raises(ValueError, match="level 3 .species. cannot be probed"):
        level_tasks(rows, ["kingdom", "class", "species"], ProbeConfig(select="last", levels=(2, 3)))
    with pytest.raises(ValueError, match="out of range"):
        level_tasks(rows, [], ProbeConfig(select="last", levels=(4,)))
    x = np.random.default_rng(0).normal(size=(len(rows), 4)).astype(np.float32)
    store = make_store(tmp_path / "s", rows, x, names=("kingdom", "class", "species"))
    run = train_probes(store, "f", tmp_path / "r", ProbeConfig(epochs=3), plots=False)
    doc = orjson.loads((tmp_path / "r" / "probe.json").read_bytes())
    assert doc["scored_levels"] == [2] and doc["levels"]["3"]["skipped"]
    assert list(run.summary.per_level) == ["2"] and run.summary.n_items == 4


def test_outputs(tmp_path):
    rows, x = hierarchical(300, seed=3)
    store = make_store(tmp_path / "s", rows, x)
    run = train_probes(store, "f", tmp_path / "r", ProbeConfig(lr=1e-2, epochs=5, batch_size=64), plots=True)
    out = tmp_path / "r"
    doc = orjson.loads((out / "probe.json").read_bytes())
    assert doc["feature"] == "f" and doc["model"] == "synthetic" and doc["config"]["probe"] == "linear"
    assert doc["summary"]["hca"] == pytest.approx(run.summary.hca, abs=1e-3)
    assert doc["levels"]["2"]["name"] == "family" and doc["levels"]["2"]["n_classes"] == 4
    with (out / "levels.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["level"] for r in table] == ["1", "2", "3", "hca"]
    with (out / "curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 3 * 5 and set(curves[0]) == {"level", "epoch", "train_loss", "train_acc", "val_acc", "test_acc"}
    if importlib.util.find_spec("matplotlib"):
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    again = train_probes(store, "f", tmp_path / "r2", ProbeConfig(lr=1e-2, epochs=5, batch_size=64), plots=False)
    assert (tmp_path / "r2" / "results.jsonl").read_bytes() == (out / "results.jsonl").read_bytes()  # seeded
    assert again.summary.hca == run.summary.hca


def test_config_validation():
    with pytest.raises(ValueError):
        ProbeConfig(epochs=0)
    with pytest.raises(ValueError):
        ProbeConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="validation split"):
        level_tasks([{"group": "g", "split": "train", "labels": ["a"]}], [], ProbeConfig())
