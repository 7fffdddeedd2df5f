"""CLIP/SigLIP scoring backend: batched scoring through the engine equals the reference per-question
loop; a CLIP run is a RunSpec run like any other (API, `harness clip-run` and `harness run --backend
clip:` write the same lines; report, resume, retry); encoders run once per image and once per text."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from itertools import islice
from pathlib import Path

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import harness
from harness.backends.clip import BatchScorer, ClipScorer, TextVocab, check_template, fill, reference_scores
from harness.backends.contrastive import EncoderCounts, load_model, parse_spec, prefetch
from harness.backends.http import FatalError, RetryableError, RetryPolicy
from harness.cli import main as cli_main
from harness.data.items import read_items
from harness.engine.core import Engine
from harness.metrics.report import summarize_path
from harness.prompts.hierarchy import make_qid
from harness.runs.execute import execute
from harness.tasks.clip import ClipTask, questions_for
from harness.tasks.hierarchy import units
from tests.support.clip import CUB_SIMILAR, cub_images, one_thread
from tests.support.tiny_contrastive import build_tiny_hf, build_tiny_open_clip

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


def _engine_score(model, items, batch_size=64, concurrency=None):
    """Result lines of `items` through the engine and a ClipScorer on `model`, in question order."""
    recs: list[dict] = []
    task = ClipTask(TEMPLATE)

    async def go():
        async with ClipScorer(model.spec, batch_size=batch_size, model=model) as scorer:
            engine = Engine(scorer, task, recs.append, concurrency=concurrency or 2 * batch_size, retry=RetryPolicy(0))
            await engine.run(units(task.questions(items, set())))
            return scorer

    scorer = asyncio.run(go())
    order = {q.qid: k for k, q in enumerate(q for it in items for q in questions_for(it, TEMPLATE))}
    return sorted(recs, key=lambda r: order[r["qid"]]), scorer


def _check_batched_equals_reference(model, items, batch_size=64):
    c0 = EncoderCounts(**model.counts.as_dict())
    recs, scorer = _engine_score(model, items, batch_size)
    c1 = EncoderCounts(**model.counts.as_dict())
    ref = [s for it in items for s in reference_scores(model, it, TEMPLATE)]
    n_q = sum(len(it.levels) for it in items)
    assert len(recs) == len(ref) == n_q
    # same predictions, logits within float32 tolerance
    assert [r["letter"] for r in recs] == ["ABCD"[s.best] for s in ref]
    worst = max(abs(a - b) for r, s in zip(recs, ref) for a, b in zip(r["logits"].values(), s.logits))
    assert worst < 2e-5 * max(1.0, model.scale), worst
    for r, s in zip(recs, ref):
        assert list(r["scores"]) == list(r["choices"]) == ["A", "B", "C", "D"]
        assert math.isclose(sum(r["scores"].values()), 1.0, abs_tol=1e-5)
        assert r["prediction"] == r["choices"][r["letter"]]
        assert max(r["logits"], key=r["logits"].get) == r["letter"]
        assert r["raw"] == r["letter"] and r["error"] is None
    # encoder work: one image per item, at most batch_size a call (dynamic batching: at least
    # ceil(n / batch) calls, fewer than one a question); each distinct text once
    distinct = {fill(TEMPLATE, c) for it in items for lv in it.levels for c in lv.choices}
    images, calls = c1.images - c0.images, c1.image_calls - c0.image_calls
    assert images == len(items)
    assert math.ceil(len(items) / batch_size) <= calls == scorer.batches <= len(items)
    if len(items) >= 100:
        assert calls <= len(items) // 4  # batches of several images (about 30 a call here)
    assert c1.texts - c0.texts == len(scorer.scorer.vocab) == len(distinct)
    # the reference loop: an image and all option texts for every level
    after = model.counts
    assert after.image_calls - c1.image_calls == after.images - c1.images == n_q
    assert after.text_calls - c1.text_calls == n_q and after.texts - c1.texts == 4 * n_q
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


def test_scorer_batches_concurrent_requests_and_encodes_each_payload_once(tiny, images):
    """Direct use of the backend: an item's levels share one payload (one encode), requests sent
    together are scored in one step, answers equal the reference's."""
    model = load_model(str(tiny["clip"]), "cpu")
    items = _items(images, 6)

    async def go():
        async with ClipScorer(model.spec, batch_size=4, model=model) as scorer:
            assert await scorer.health() == [model.spec]
            payloads = [scorer.prepare_image(it.image, "base64", None) for it in items]
            c0 = EncoderCounts(**model.counts.as_dict())
            sends = [scorer.send("/clip/score", {"image": px, "texts": [fill(TEMPLATE, o) for o in lv.choices]})
                     for it, px in zip(items, payloads) for lv in it.levels]
            replies = await asyncio.gather(*sends)
            with pytest.raises(FatalError, match="/clip/score"):
                await scorer.send("/chat/completions", {})
            return replies, c0, scorer.batches

    replies, c0, batches = asyncio.run(go())
    c = model.counts
    assert (c.images - c0.images, c.image_calls - c0.image_calls, batches) == (6, 2, 2)  # 4 + 2 images
    ref = [s for it in items for s in reference_scores(model, it, TEMPLATE)]
    for rep, s in zip(replies, ref):
        assert max(abs(a - b) for a, b in zip(rep["logits"], s.logits)) < 2e-5 * max(1.0, model.scale)
        assert math.isclose(sum(rep["probs"]), 1.0, abs_tol=1e-9)


def test_clip_task_answer_is_the_first_highest_logit():
    from harness.engine.core import Group

    item = next(iter(read_items(CUB_SIMILAR)))
    q = questions_for(item, TEMPLATE)[0]
    task = ClipTask(TEMPLATE)
    path, body = task.request(Group(q.qid, 1, q), 0, "PAYLOAD")
    assert path == "/clip/score" and body == {"image": "PAYLOAD", "texts": [fill(TEMPLATE, o) for o in q.options]}
    ans = task.interpret(Group(q.qid, 1, q), 0, {"logits": [1.0, 3.0, 3.0, 2.0], "probs": [0.1, 0.4, 0.4, 0.1]})
    assert ans["letter"] == "B"
    rec = task.record(Group(q.qid, 1, q), [ans | {"latency": 0.1}])
    assert (rec["letter"], rec["raw"], rec["prediction"], rec["logits"]["C"]) == ("B", "B", q.options[1], 3.0)
    assert "latency" not in rec  # the lines of a CLIP run are the scorer's, as before
    with pytest.raises(RetryableError):
        task.interpret(Group(q.qid, 1, q), 0, {"logits": [1.0], "probs": [1.0]})
    with pytest.raises(ValueError, match="must contain"):
        ClipTask("a photo")


# --- the run folder --------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def _by_qid(path: Path) -> dict[str, dict]:
    return {r["qid"]: {k: v for k, v in r.items() if k != "latency"} for r in _lines(path / "results.jsonl")}


def _spec(model: str, out: Path, root_map: str, limit: int, **kw) -> harness.RunSpec:
    backend = {"kind": "clip", "device": "cpu", "batch_size": kw.pop("batch_size", 8), "workers": 2}
    return harness.RunSpec(out=str(out), data=str(CUB_SIMILAR), model=model, backend=backend,
                           task={"template": kw.pop("template", TEMPLATE)}, limit=limit,
                           image_root_map=[root_map], **kw)


def test_api_clip_run_and_run_backend_clip_write_the_same_lines_and_report_reads_them(tiny, tmp_path, capsys):
    root_map = cub_images(tmp_path / "img", 20)
    model = str(tiny["siglip"])
    api = tmp_path / "api"
    # batch size 1: the encoders see the same inputs in every run. (With larger batches the dynamic
    # batcher's batch composition varies with timing, which may move a logit's 5th decimal.)
    result = harness.run(_spec(model, api, root_map, 20, batch_size=1))
    assert (result.status, int(result.exit_code)) == ("done", 0)
    common = ["--data", str(CUB_SIMILAR), "--image-root-map", root_map, "--limit", "20", "--batch-size", "1",
              "--workers", "2", "--device", "cpu", "--quiet"]
    assert cli_main(["clip-run", "--model", model, "--out", str(tmp_path / "clip_run"), *common]) == 0
    assert cli_main(["run", "--backend", f"clip:{model}", "--out", str(tmp_path / "run"), *common]) == 0
    lines = _by_qid(api)
    assert len(lines) == 80 and all(r["error"] is None and r["letter"] for r in lines.values())
    assert _by_qid(tmp_path / "clip_run") == lines == _by_qid(tmp_path / "run")
    # every folder records a spec that reproduces the run
    manifest = orjson.loads((tmp_path / "clip_run" / "run.json").read_bytes())
    assert manifest["kind"] == "hierarchy" and manifest["status"] == "done"
    assert manifest["spec"]["backend"]["kind"] == "clip" and manifest["settings"]["template"] == TEMPLATE
    again = harness.RunSpec.model_validate(manifest["spec"] | {"out": str(tmp_path / "again")})
    assert harness.run(again).status == "done" and _by_qid(tmp_path / "again") == lines

    # harness report DIR --json: the metrics of the CLIP run folder
    capsys.readouterr()
    assert cli_main(["report", str(api), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    rep = rep[0] if isinstance(rep, list) else rep
    s = summarize_path(api)
    assert rep["n_items"] == s.n_items == 20
    assert math.isclose(rep["hca"], s.hca) and math.isclose(rep["leaf_acc"], s.leaf_acc)
    assert rep["hca"] == result.summary["hca"] and rep["leaf_acc"] == result.summary["leaf_acc"]


def _run_counting(spec: harness.RunSpec):
    """execute(spec), with the scorer's encoder counts of this invocation."""
    seen = {}

    def hook(engine):
        seen["scorer"] = engine.backend

    r = execute(spec, on_engine=hook)
    return r, seen["scorer"]


def test_clip_run_resumes_and_retries_errors_through_the_run_folder(tiny, tmp_path):
    root = tmp_path / "img"
    root_map = cub_images(root, 30, skip={3, 7})
    out = tmp_path / "run"
    argv = ["clip-run", "--model", str(tiny["siglip"]), "--data", str(CUB_SIMILAR), "--out", str(out),
            "--image-root-map", root_map, "--limit", "30", "--batch-size", "8", "--workers", "2", "--device", "cpu",
            "--quiet"]
    assert cli_main(argv) == 3  # two images missing: their questions are unanswered
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
    assert manifest["stats"]["answered"] == 112 and manifest["stats"]["failed"] == 8
    assert orjson.loads((out / "summary.json").read_bytes())["n_items"] == 30

    # resume: nothing is asked again (failed questions too, as in `harness run`), nothing encoded
    spec = _spec(str(tiny["siglip"]), out, root_map, 30)
    r, scorer = _run_counting(spec)
    assert int(r.exit_code) == 3 and (r.stats["groups"], r.stats["requests"], r.stats["items"]) == (0, 0, 0)
    assert scorer.counts.images == scorer.counts.texts == 0
    assert len(_lines(out / "results.jsonl")) == 120

    # the images appear; --retry-errors scores exactly the failed questions (2 images encoded)
    cub_images(root, 30)
    r, scorer = _run_counting(spec.model_copy(update={"retry_errors": True}))
    assert int(r.exit_code) == 0 and r.stats["groups"] == 8 and scorer.counts.images == 2
    recs = _lines(out / "results.jsonl")
    assert len(recs) == 128 and len({r["qid"] for r in recs}) == 120
    assert all(r["error"] is None for r in recs[-8:])
    s = summarize_path(out)
    assert (s.n_items, s.n_questions, s.n_errors, s.n_unanswered) == (30, 120, 0, 0)
    assert orjson.loads((out / "run.json").read_bytes())["status"] == "done"

    # answer-changing settings must match the folder's run
    with pytest.raises(ValueError, match="template"):
        execute(_spec(str(tiny["siglip"]), out, root_map, 30, template="A photo of a {cls}"))
    assert cli_main([*argv, "--template", "A photo of a {cls}"]) == 2


def test_run_encodes_each_image_once_and_each_distinct_text_once(tiny, tmp_path):
    root_map = cub_images(tmp_path / "img", 40)
    items = list(islice(read_items(CUB_SIMILAR), 40))
    r, scorer = _run_counting(_spec(str(tiny["clip"]), tmp_path / "run", root_map, 40, batch_size=16))
    assert r.status == "done" and r.stats["answered"] == 160
    c = scorer.counts
    distinct = {fill(TEMPLATE, o) for it in items for lv in it.levels for o in lv.choices}
    assert c.images == 40 and math.ceil(40 / 16) <= c.image_calls <= 40
    assert c.texts == len(distinct) == scorer.stats()["vocab"]


def test_resume_after_a_torn_line_scores_just_that_question(tiny, tmp_path):
    root_map = cub_images(tmp_path / "img", 12)
    out = tmp_path / "run"
    spec = _spec(str(tiny["clip"]), out, root_map, 12)
    assert harness.run(spec).status == "done"
    first = (out / "results.jsonl").read_bytes()
    # a crash mid-write leaves a torn line: it is cut off and its question scored again
    lines = first.splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:25])
    r, scorer = _run_counting(spec)
    assert r.status == "done" and (r.stats["items"], r.stats["groups"]) == (1, 1) and scorer.counts.images == 1
    again = _lines(out / "results.jsonl")
    before = [orjson.loads(x) for x in lines]
    assert len(again) == 48 and again[:-1] == before[:-1]
    # the rescored question: same answer; logits equal up to batch-size numerics (1 image vs 12)
    a, b = again[-1], before[-1]
    assert {k: a[k] for k in a if k not in ("scores", "logits")} == {k: b[k] for k in b if k not in ("scores", "logits")}
    assert all(abs(a["logits"][L] - b["logits"][L]) < 1e-4 for L in "ABCD")


def test_clip_run_input_errors(tiny, tmp_path, capsys):
    assert cli_main(["clip-run", "--model", str(tiny["clip"]), "--data", str(tmp_path / "nope.jsonl"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="must contain"):
        check_template("a photo")
    assert cli_main(["clip-run", "--model", str(tiny["clip"]), "--data", str(CUB_SIMILAR), "--template", "a photo",
                     "--out", str(tmp_path / "o1")]) == 2
    assert "must contain" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert fill("A photo of a {cls}", "wren") == "A photo of a wren" == fill("A photo of a {}", "wren")
    bad = tmp_path / "bad.jsonl"
    good = CUB_SIMILAR.read_text().splitlines()[:3]
    broken = orjson.loads(good[1])
    broken["choices_level1"] = ["b", "c"]  # the truth is not offered
    bad.write_text("\n".join([good[0], orjson.dumps(broken).decode(), good[2]]) + "\n")
    assert cli_main(["clip-run", "--model", str(tiny["clip"]), "--data", str(bad), "--out", str(tmp_path / "o2"),
                     "--strict", "--device", "cpu", "--quiet"]) == 2
    assert "bad.jsonl:2: field 'choices_level1'" in " ".join(capsys.readouterr().err.split())
    from tests.support.engine_helpers import image_items

    (tmp_path / "imgs").mkdir()
    with_images = image_items(tmp_path / "imgs", 2)  # inputs good: the model is what fails
    assert cli_main(["clip-run", "--model", str(tmp_path / "no-model"), "--data", str(with_images),
                     "--out", str(tmp_path / "o3"), "--device", "cpu"]) == 2
    assert "not a model folder" in capsys.readouterr().err and not (tmp_path / "o3").exists()


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
