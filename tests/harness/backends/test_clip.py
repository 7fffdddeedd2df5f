"""CLIP/SigLIP scoring backend: batched scoring equals the reference per-question loop, the result
lines are the engine's (report, resume, retry), encoders run once per image and once per text."""

from __future__ import annotations

import argparse
import math
import threading
import time
from itertools import islice
from pathlib import Path

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.support.clip import CUB_SIMILAR, cub_images, one_thread

from harness.backends.contrastive import EncoderCounts, load_model, parse_spec, prefetch
from harness.backends.clip import (
    BatchScorer,
    ScoreStats,
    TextVocab,
    check_template,
    fill,
    questions_for,
    reference_scores,
    score_items,
)
from tests.support.tiny_contrastive import build_tiny_hf, build_tiny_open_clip
from harness.data.items import read_items
from harness.prompts.hierarchy import make_qid
from harness.metrics.report import summarize_path

TEMPLATE = "a photo of a {}."
N_ITEMS = 240  # "a few hundred CUB items": 960 questions


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub_images")
    return cub_images(root, N_ITEMS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Model folders: tiny transformers SigLIP and CLIP, tiny open_clip (when installed)."""
    base = tmp_path_factory.mktemp("tiny_clip_models")
    out = {"siglip": build_tiny_hf(base / "siglip", "siglip"), "clip": build_tiny_hf(base / "clip", "clip")}
    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        out["open_clip"] = build_tiny_open_clip(base / "open_clip")
    return out


def _items(root_map: str, n: int):
    return list(islice(read_items(CUB_SIMILAR, root_map=[root_map]), n))


def _check_batched_equals_reference(model, items, batch_size=64):
    stats = ScoreStats()
    work = [(it, questions_for(it, TEMPLATE)) for it in items]
    recs = list(score_items(model, work, TEMPLATE, batch_size=batch_size, workers=2, stats=stats))
    before = EncoderCounts(**model.counts.as_dict())
    ref = [s for it in items for s in reference_scores(model, it, TEMPLATE)]
    n_q = sum(len(it.levels) for it in items)
    assert len(recs) == len(ref) == n_q
    # same predictions, logits within float32 tolerance
    assert [r["letter"] for r in recs] == ["ABCD"[s.best] for s in ref]
    worst = max(abs(a - b) for r, s in zip(recs, ref) for a, b in zip(r["logits"].values(), s.logits))
    assert worst < 1e-3 * max(1.0, model.scale), worst
    for r, s in zip(recs, ref):
        assert list(r["scores"]) == list(r["choices"]) == ["A", "B", "C", "D"]
        assert math.isclose(sum(r["scores"].values()), 1.0, abs_tol=1e-5)
        assert r["prediction"] == r["choices"][r["letter"]]
        assert max(r["logits"], key=r["logits"].get) == r["letter"]
    # encoder work: one image per item in ceil(n / batch) calls; each distinct text once
    distinct = {fill(TEMPLATE, c) for it in items for lv in it.levels for c in lv.choices}
    c = stats.counts
    assert (c.images, c.image_calls) == (len(items), math.ceil(len(items) / batch_size))
    assert c.texts == stats.vocab == len(distinct)
    # the reference loop: an image and all option texts for every level
    after = model.counts
    assert after.image_calls - before.image_calls == after.images - before.images == n_q
    assert after.text_calls - before.text_calls == n_q and after.texts - before.texts == 4 * n_q
    return recs


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_batched_scoring_equals_reference_loop_transformers(kind, tiny, images):
    model = load_model(str(tiny[kind]), "cpu")
    assert (model.padding, model.sigmoid) == (("max_length", True) if kind == "siglip" else (True, False))
    recs = _check_batched_equals_reference(model, _items(images, N_ITEMS))
    # the predictions are not constant (the check above is not vacuous)
    assert len({r["letter"] for r in recs}) == 4


def test_batched_scoring_equals_reference_loop_open_clip(tiny, images):
    if "open_clip" not in tiny:
        pytest.skip("open_clip_torch not installed")
    model = load_model(f"open_clip:local-dir:{tiny['open_clip']}", "cpu")
    assert model.scale == 100.0 and model.bias == 0.0  # the reference's 100 x cosine
    _check_batched_equals_reference(model, _items(images, 120), batch_size=50)


@pytest.mark.slow
def test_open_clip_vit_b32_random_weights_matches_reference(images):
    pytest.importorskip("open_clip")
    model = load_model("open_clip:ViT-B-32/random", "cpu")
    _check_batched_equals_reference(model, _items(images, 2))


# --- the run folder --------------------------------------------------------------------------------


def _clip_cli(*argv: str) -> int:
    import harness.cli.clip

    p = argparse.ArgumentParser()
    harness.cli.clip.add_cli(p.add_subparsers())
    args = p.parse_args(list(argv))
    return args.func(args)


def _lines(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_clip_run_writes_engine_results_resumes_and_retries(tiny, tmp_path, capsys):
    root = tmp_path / "img"
    root_map = cub_images(root, 30, skip={3, 7})
    out = tmp_path / "run"
    argv = ["clip-run", "--model", str(tiny["siglip"]), "--data", str(CUB_SIMILAR), "--out", str(out),
            "--image-root-map", root_map, "--limit", "30", "--batch-size", "8", "--workers", "2", "--device", "cpu"]
    assert _clip_cli(*argv) == 3  # two images missing: their questions are unanswered
    recs = _lines(out / "results.jsonl")
    assert len(recs) == 120
    items = list(islice(read_items(CUB_SIMILAR), 30))
    by_qid = {r["qid"]: r for r in recs}
    for it in items:
        for lv in it.levels:
            r = by_qid[make_qid(it.id, lv.n, "image", TEMPLATE, "clip")]
            assert (r["item"], r["level"], r["truth"]) == (it.id, lv.n, lv.truth)
            assert list(r["choices"].values()) == list(lv.choices)  # file order, as the reference
            assert r["scored"] is True
    failed = [r for r in recs if r["error"]]
    assert {r["item"] for r in failed} == {items[3].id, items[7].id} and len(failed) == 8
    assert all(r["error"].startswith("image: FileNotFoundError") and r["letter"] is None for r in failed)
    s = summarize_path(out)
    assert (s.n_items, s.n_questions, s.n_errors) == (30, 120, 8)
    manifest = orjson.loads((out / "run.json").read_bytes())
    assert manifest["status"] == "incomplete" and manifest["settings"]["template"] == TEMPLATE
    assert manifest["stats"]["encoders"]["images"] == 28
    assert orjson.loads((out / "summary.json").read_bytes())["n_items"] == 30

    # resume: nothing is asked again (failed questions too, as in `harness run`)
    capsys.readouterr()
    assert _clip_cli(*argv) == 3
    err = capsys.readouterr().err
    assert "0 questions of 0 items" in err and "30 items already done" in err
    assert len(_lines(out / "results.jsonl")) == 120

    # the images appear; --retry-errors scores exactly the failed questions
    cub_images(root, 30)
    assert _clip_cli(*argv, "--retry-errors") == 0
    recs = _lines(out / "results.jsonl")
    assert len(recs) == 128 and len({r["qid"] for r in recs}) == 120
    assert all(r["error"] is None for r in recs[-8:])
    s = summarize_path(out)
    assert (s.n_items, s.n_questions, s.n_errors, s.n_unanswered) == (30, 120, 0, 0)
    assert orjson.loads((out / "run.json").read_bytes())["status"] == "done"

    # answer-changing settings must match the folder's run
    with pytest.raises(ValueError, match="template"):
        _clip_cli(*argv, "--template", "A photo of a {cls}")


def test_resume_skips_finished_items_without_encoding(tiny, tmp_path, capsys):
    root_map = cub_images(tmp_path / "img", 12)
    out = tmp_path / "run"
    argv = ["clip-run", "--model", str(tiny["clip"]), "--data", str(CUB_SIMILAR), "--out", str(out),
            "--image-root-map", root_map, "--limit", "12", "--workers", "0", "--device", "cpu"]
    assert _clip_cli(*argv) == 0
    first = (out / "results.jsonl").read_bytes()
    # a crash mid-write leaves a torn line: it is cut off and its question scored again
    lines = first.splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:25])
    capsys.readouterr()
    assert _clip_cli(*argv) == 0
    err = capsys.readouterr().err
    assert "1 questions of 1 items" in err and "11 items already done" in err
    again = _lines(out / "results.jsonl")
    before = [orjson.loads(x) for x in lines]
    assert len(again) == 48 and again[:-1] == before[:-1]
    # the rescored question: same answer; logits equal up to batch-size numerics (1 image vs 12)
    a, b = again[-1], before[-1]
    assert {k: a[k] for k in a if k not in ("scores", "logits")} == {k: b[k] for k in b if k not in ("scores", "logits")}
    assert all(abs(a["logits"][L] - b["logits"][L]) < 1e-4 for L in "ABCD")


def test_clip_run_input_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="items file not found"):
        _clip_cli("clip-run", "--model", str(tiny["clip"]), "--data", str(tmp_path / "nope.jsonl"),
                  "--out", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="must contain"):
        check_template("a photo")
    assert fill("A photo of a {cls}", "wren") == "A photo of a wren" == fill("A photo of a {}", "wren")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.jpg", "label": "y", "level1": "a", "choices_level1": ["b", "c"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'choices_level1'"):
        _clip_cli("clip-run", "--model", str(tiny["clip"]), "--data", str(bad), "--out", str(tmp_path / "o2"),
                  "--strict", "--device", "cpu")


def test_model_specs(tmp_path, tiny):
    assert parse_spec("open_clip:ViT-L-14/laion2b_s32b_b82k") == ("open_clip", "ViT-L-14/laion2b_s32b_b82k")
    assert parse_spec("hf:google/siglip-so400m-patch14-384") == ("hf", "google/siglip-so400m-patch14-384")
    assert parse_spec("google/siglip-so400m-patch14-384") == ("hf", "google/siglip-so400m-patch14-384")
    assert parse_spec(str(tiny["siglip"])) == ("hf", str(tiny["siglip"]))
    if "open_clip" in tiny:
        assert parse_spec(str(tiny["open_clip"])) == ("open_clip", f"local-dir:{tiny['open_clip']}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        parse_spec(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        parse_spec(str(tmp_path / "missing"))


def test_open_clip_spec_needs_a_pretrained_tag():
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match="laion2b_s32b_b82k"):
        load_model("open_clip:ViT-L-14", "cpu")
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        load_model("open_clip:ViT-L-14/no_such_tag", "cpu")


# --- building blocks ------------------------------------------------------------------------------


class _HashModel:
    """A stand-in encoder: deterministic unit vectors from a hash of each text."""

    spec, device = "hash", torch.device("cpu")

    def __init__(self):
        self.counts = EncoderCounts()
        self.scale, self.bias = 10.0, 0.0

    def encode_texts(self, texts):
        self.counts.text_calls += 1
        self.counts.texts += len(texts)
        g = [torch.Generator().manual_seed(hash(t) % 2**31) for t in texts]
        v = torch.stack([torch.randn(8, generator=x) for x in g])
        return v / v.norm(dim=1, keepdim=True)

    def logits(self, sims):
        return sims * self.scale + self.bias


def test_text_vocab_encodes_each_text_once_and_grows():
    m = _HashModel()
    vocab = TextVocab(m, batch_size=500)
    texts = [f"t{i}" for i in range(2500)]
    ids = vocab.ids(texts[:1000] + texts[:10])
    assert ids == list(range(1000)) + list(range(10))
    assert vocab.ids(texts) == list(range(2500))  # capacity grows past 1024 and 2048
    assert (m.counts.texts, m.counts.text_calls) == (2500, 2 + 3)
    assert torch.allclose(vocab.matrix[1234], m.encode_texts(["t1234"])[0])

    scorer = BatchScorer(m, "{}")
    img = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    got = scorer.score(img, [(1, ["a", "b", "c"]), (0, ["b", "d"])])
    direct = m.logits(img[1] @ m.encode_texts(["a", "b", "c"]).T)
    assert torch.allclose(torch.tensor(got[0].logits, dtype=torch.float32), direct, atol=1e-6)
    assert len(got[1].logits) == 2 and got[1].best == int(torch.argmax(m.logits(img[0] @ m.encode_texts(["b", "d"]).T)))


def test_prefetch_keeps_order_delivers_errors_and_stays_bounded():
    pulled = 0
    lock = threading.Lock()

    def source():
        nonlocal pulled
        for i in range(40):
            with lock:
                pulled += 1
            yield i

    def work(i):
        time.sleep(0.001 * (i % 3))
        if i == 5:
            raise OSError("bad image 5")
        return i * i

    got = []
    for k, (x, r) in enumerate(prefetch(source(), work, workers=3, ahead=4)):
        assert pulled <= k + 1 + 4
        got.append((x, r))
    assert [x for x, _ in got] == list(range(40))
    assert isinstance(got[5][1], OSError) and [r for _, r in got[6:8]] == [36, 49]
    first, second = prefetch([1, 2], lambda x: 1 // (x - 1), workers=0)
    assert isinstance(first[1], ZeroDivisionError) and second == (2, 1)


def test_embed_images_keeps_order_and_reports_unreadable_images(tiny, tmp_path):
    from harness.backends.contrastive import embed_images, load_pixels

    root_map = cub_images(tmp_path, 3)
    paths = [it.image for it in _items(root_map, 3)]
    inputs = [paths[0], str(tmp_path / "missing.jpg"), paths[1], paths[0], paths[2]]  # a repeat, a hole
    model = load_model(str(tiny["siglip"]), "cpu")
    got = list(embed_images(model, inputs, batch_size=2, workers=2))
    assert [x for x, _ in got] == inputs
    assert isinstance(got[1][1], FileNotFoundError) and "missing.jpg" in str(got[1][1])
    for x, e in got[:1] + got[2:]:
        assert torch.allclose(e, model.encode_images(load_pixels(x, model)[None])[0], atol=1e-5)
    assert torch.allclose(got[0][1], got[3][1], atol=1e-6)
