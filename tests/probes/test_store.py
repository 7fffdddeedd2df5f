"""Feature store: shards + index written as it goes, resume after an interruption gives identical
shards, settings checks, unreadable inputs, float16 range."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from probes.data import ProbeItem
from probes.extract import run_extraction
from probes.recipes import load_recipe
from probes.store import FeatureStore, StoreWriter, shard_name

RECIPE = load_recipe("hierarchy-vision").model_copy(update={"sites": ("vision", "projector", "llm.-1")})
SETTINGS = {"model": "tiny", "recipe": "test"}


def _items(images, n=11):
    return [ProbeItem(f"img{i}", f"img{i}", "train" if i % 3 else "test", ("a", f"b{i % 2}"), image=str(images[i % len(images)]))
            for i in range(n)]


class Interrupt(Exception):
    pass


def _interrupting(items, after):
    for i, it in enumerate(items):
        if i == after:
            raise Interrupt
        yield it


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_after_interruption_gives_identical_shards(llava_ext, images, tmp_path):
    items = _items(images)
    kw = dict(settings=SETTINGS, batch_size=2, shard_size=4)
    full = run_extraction(llava_ext, items, tmp_path / "a", RECIPE, **kw)
    assert (full.n_rows, full.complete) == (11, True)

    with pytest.raises(Interrupt):
        run_extraction(llava_ext, _interrupting(items, 9), tmp_path / "b", RECIPE, **kw)
    part = FeatureStore(tmp_path / "b")
    assert len(part.shards) == 2 and part.manifest["complete"] is False  # rows 0-7; 8 was in the lost buffer
    (tmp_path / "b" / "shards" / "shard-00002.tmp").write_bytes(b"torn")  # a shard being written at the crash
    rep = run_extraction(llava_ext, items, tmp_path / "b", RECIPE, **kw)
    assert (rep.resumed_at, rep.n_new, rep.n_rows, rep.complete) == (8, 3, 11, True)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name  # shards, index, manifest: byte for byte

    st = FeatureStore(tmp_path / "a")
    rows = list(st.rows())
    assert [r["id"] for r in rows] == [f"img{i}" for i in range(11)]
    assert rows[4] == {"id": "img4", "group": "img4", "split": "train", "labels": ["a", "b0"]}
    index = [orjson.loads(x) for x in (tmp_path / "a" / "index.jsonl").read_bytes().splitlines()]
    assert [(r["shard"], r["offset"]) for r in index][3:6] == [(0, 3), (1, 0), (1, 1)]
    x = st.load("projector.mean")
    assert x.dtype == np.float32 and x.shape == (11, 64)
    # the stored values are the features cast to float16
    feats = llava_ext.features(llava_ext.encode([llava_ext.prompt(RECIPE, text=None, image=True)],
                                                [llava_ext.size_rule(RECIPE).apply(__import__("PIL.Image").Image.open(images[4]))]),
                               [("projector", "mean")], n_images=1)
    np.testing.assert_array_equal(x[4], feats["projector.mean"][0].astype(np.float16).astype(np.float32))
    # running again on a complete store does nothing
    again = run_extraction(llava_ext, items, tmp_path / "a", RECIPE, **kw)
    assert (again.n_new, again.resumed_at) == (0, 11)


def test_other_settings_are_refused(llava_ext, images, tmp_path):
    run_extraction(llava_ext, _items(images, 2), tmp_path, RECIPE, settings=SETTINGS, batch_size=1, shard_size=4)
    with pytest.raises(ValueError, match=r"other settings.*recipe: 'test' -> 'other'"):
        run_extraction(llava_ext, _items(images, 2), tmp_path, RECIPE, settings={**SETTINGS, "recipe": "other"})
    with pytest.raises(ValueError, match="multiple of --batch-size"):
        run_extraction(llava_ext, [], tmp_path / "x", RECIPE, settings=SETTINGS, batch_size=3, shard_size=4)


def test_unreadable_images_are_recorded(llava_ext, images, tmp_path):
    items = _items(images, 5)
    items[2] = ProbeItem("gone", "gone", "train", ("a", "b"), image=str(tmp_path / "missing.png"))
    rep = run_extraction(llava_ext, items, tmp_path / "s", RECIPE, settings=SETTINGS, batch_size=2, shard_size=2)
    assert (rep.n_rows, rep.n_errors) == (4, 1)
    errs = [orjson.loads(x) for x in (tmp_path / "s" / "errors.jsonl").read_bytes().splitlines()]
    assert errs[0]["id"] == "gone" and errs[0]["position"] == 2 and "missing.png" in errs[0]["error"]
    assert [r["id"] for r in FeatureStore(tmp_path / "s").rows()] == ["img0", "img1", "img3", "img4"]
    with pytest.raises(FileNotFoundError, match="image-root-map"):
        bad = [ProbeItem("x", "x", "train", ("a",), image=str(tmp_path / "nope.png"))]
        run_extraction(llava_ext, bad, tmp_path / "t", RECIPE, settings=SETTINGS)


def test_writer_checks(tmp_path):
    w = StoreWriter(tmp_path, {"a": 1}, shard_size=2)
    assert w.start() == 0
    w.add([{"id": "1"}], {"f": np.ones((1, 3), np.float32)}, 1)
    with pytest.raises(ValueError, match="dimension 4, earlier 3"):
        w.add([{"id": "2"}], {"f": np.ones((1, 4), np.float32)}, 2)
    with pytest.raises(OverflowError, match="float16 range.*float32"):
        w.add([{"id": "2"}], {"f": np.full((1, 3), 1e6, np.float32)}, 2)
    w.add([{"id": "2"}], {"f": np.full((1, 3), 2.0, np.float32)}, 2)  # fills shard 0
    assert (tmp_path / "shards" / shard_name(0)).is_file()
    # a shard after a gap is not trusted: removed on resume
    (tmp_path / "shards" / shard_name(2)).write_bytes(b"x")
    assert StoreWriter(tmp_path, {"a": 1}, shard_size=2).start() == 2
    assert not (tmp_path / "shards" / shard_name(2)).exists()
    st = FeatureStore(tmp_path)
    np.testing.assert_array_equal(st.load("f"), [[1, 1, 1], [2, 2, 2]])
    with pytest.raises(KeyError, match="no feature 'g'"):
        st.load("g")
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore(tmp_path / "shards")
