"""Similar-choice mining: the most similar same-level names on a constructed case, equal to a brute-force
ranking with a real (tiny) SigLIP, through the strategy registry, the builder and `harness clip-mine`;
and the measures that compare a mined file with the released ones."""

from __future__ import annotations

import argparse
import json
import random
from itertools import islice

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from harness.backends.clip_mining import SimilarDistractors
from harness.backends.contrastive import EncoderCounts, load_model, load_pixels
from harness.data.build import ImageRef, build_items
from harness.data.distractors import LevelQuery, depth_pools, make_strategy
from harness.data.items import read_items
from harness.data.similar import overlap_stats
from harness.data.taxonomy import load_taxonomy
from tests.support.clip import CUB_RANDOM, CUB_SIMILAR, cub_images, one_thread
from tests.support.tiny_contrastive import build_tiny_hf


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


# --- a constructed case: the similarities are known -----------------------------------------------

FAMILIES = ["Corvidae", "Laridae", "Paridae"]
SPECIES = {"Blue Jay": "Corvidae", "Crow": "Corvidae", "Raven": "Corvidae", "Herring Gull": "Laridae",
           "Tern": "Laridae", "Kittiwake": "Laridae", "Great Tit": "Paridae", "Chickadee": "Paridae"}
NAMES = FAMILIES + sorted(SPECIES)  # one embedding axis per name


class AxisModel:
    """Text "a photo of a NAME." -> the unit vector of NAME's axis; an image is a 1-pixel-high
    grayscale strip whose pixel i is the image's similarity weight for name i."""

    spec, device = "axis", torch.device("cpu")
    scale, bias = 100.0, 0.0

    def __init__(self):
        self.counts = EncoderCounts()

    def preprocess(self, image):
        return torch.tensor(list(image.convert("L").tobytes()), dtype=torch.float32)

    def encode_images(self, pixels):
        self.counts.image_calls += 1
        self.counts.images += len(pixels)
        return torch.nn.functional.normalize(pixels + 1e-3, dim=1)

    def encode_texts(self, texts):
        self.counts.text_calls += 1
        self.counts.texts += len(texts)
        out = torch.zeros(len(texts), len(NAMES))
        for i, t in enumerate(texts):
            out[i, NAMES.index(t.removeprefix("a photo of a ").removesuffix("."))] = 1.0
        return out

    def logits(self, sims):
        return sims * self.scale


@pytest.fixture
def axis_case(tmp_path):
    from PIL import Image

    tax_file = tmp_path / "birds.json"
    tax_file.write_text(json.dumps({s: [f, s] for s, f in SPECIES.items()}))
    tax = load_taxonomy(tax_file)

    def image(name: str, weights: dict[str, int]):
        im = Image.new("RGB", (len(NAMES), 1))
        im.putdata([(weights.get(n, 0),) * 3 for n in NAMES])
        p = tmp_path / f"{name}.png"
        im.save(p)
        return str(p)

    return tax, image


def test_constructed_case_returns_the_truly_most_similar_names(axis_case):
    tax, image = axis_case
    # The image looks most like the truth (Crow), then Tern, Raven, Great Tit, ...; families: Laridae first.
    img = image("crow", {"Crow": 250, "Tern": 240, "Raven": 230, "Great Tit": 120, "Kittiwake": 60,
                         "Laridae": 200, "Corvidae": 150, "Paridae": 10})
    model = AxisModel()
    s = SimilarDistractors(tax, model, workers="2", batch_size="4")
    pools = depth_pools(tax)
    qs = [LevelQuery(img, "Crow", tax.paths["Crow"], d) for d in (0, 1)]
    s.prepare(qs)
    rng = random.Random(0)
    assert s.choose(qs[1], pools[1], 3, rng) == ["Tern", "Raven", "Great Tit"]  # never the truth
    assert s.choose(qs[1], pools[1], 1, rng) == ["Tern"]
    assert s.choose(qs[0], pools[0], 2, rng) == ["Laridae", "Paridae"]  # Corvidae is the truth
    assert s.ranking(qs[1])[:4] == ("Crow", "Tern", "Raven", "Great Tit")
    # all asked from one prepare: the image once, each pool name once
    assert (model.counts.images, model.counts.image_calls) == (1, 1)
    assert model.counts.texts == len(FAMILIES) + len(SPECIES)
    # more distractors than the pool has: every other name, most similar first
    assert s.choose(qs[1], pools[1], 20, rng)[:4] == ["Tern", "Raven", "Great Tit", "Kittiwake"]
    assert len(s.choose(qs[1], pools[1], 20, rng)) == len(SPECIES) - 1
    # a caller's own pool is ranked directly
    assert s.choose(qs[1], ("Chickadee", "Crow", "Raven"), 5, rng) == ["Raven", "Chickadee"]


def test_ties_are_broken_by_the_sorted_pool_and_runs_are_deterministic(axis_case):
    tax, image = axis_case
    img = image("tie", {"Tern": 200, "Blue Jay": 200, "Chickadee": 200})
    q = LevelQuery(img, "Raven", tax.paths["Raven"], 1)
    pool = depth_pools(tax)[1]
    a = SimilarDistractors(tax, AxisModel(), workers=0)
    b = SimilarDistractors(tax, AxisModel(), workers=3, keep=2)  # keep < k: recomputed, same answer
    assert a.choose(q, pool, 2, random.Random(1)) == ["Blue Jay", "Chickadee"] == b.choose(q, pool, 2, random.Random(9))
    assert a.choose(q, pool, 3, random.Random(0)) == ["Blue Jay", "Chickadee", "Tern"]


def test_builder_with_the_similar_strategy(axis_case):
    tax, image = axis_case
    refs = [ImageRef(image("a", {"Crow": 250, "Raven": 200, "Tern": 150, "Laridae": 90}), "Crow"),
            ImageRef(image("b", {"Kittiwake": 255, "Herring Gull": 240, "Chickadee": 10, "Paridae": 40}), "Tern")]
    recs = list(build_items(tax, refs, SimilarDistractors(tax, AxisModel()), n_choices=3, seed=0))
    assert sorted(recs[0]["choices_level2"]) == ["Crow", "Raven", "Tern"]
    assert sorted(recs[0]["choices_level1"]) == ["Corvidae", "Laridae", "Paridae"]
    assert sorted(recs[1]["choices_level2"]) == ["Herring Gull", "Kittiwake", "Tern"]
    assert recs[1]["level2"] == "Tern" and sorted(recs[1]["choices_level1"]) == ["Corvidae", "Laridae", "Paridae"]


def test_bad_options_and_unreadable_images(axis_case, tmp_path):
    tax, _ = axis_case
    with pytest.raises(ValueError, match="unknown option"):
        SimilarDistractors(tax, AxisModel(), k=3)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        SimilarDistractors(tax, AxisModel(), batch_size="many")
    s = SimilarDistractors(tax, AxisModel())
    with pytest.raises(ValueError, match="cannot read image 'nope.png'"):
        s.prepare([LevelQuery("nope.png", "Crow", tax.paths["Crow"], 1)])


# --- a real tiny SigLIP: mining equals a brute-force ranking ------------------------------------------


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    return build_tiny_hf(tmp_path_factory.mktemp("tiny_siglip") / "m", "siglip")


def _brute_force(model, image_path: str, names, template="a photo of a {}."):
    """Encode the image and every name separately, rank by cosine (ties: pool order)."""
    img = model.encode_images(load_pixels(image_path, model)[None])[0]
    sims = [float(img @ model.encode_texts([template.format(n)])[0]) for n in names]
    return [names[i] for i in sorted(range(len(names)), key=lambda i: -sims[i])]


def test_registry_strategy_with_siglip_matches_brute_force(siglip, tmp_path):
    cub = load_taxonomy("cub")
    root_map = cub_images(tmp_path, 4)
    items = list(islice(read_items(CUB_SIMILAR, root_map=[root_map]), 4))
    s = make_strategy("similar", cub, model=str(siglip), device="cpu", batch_size="3", workers="1")
    assert isinstance(s, SimilarDistractors) and s.model.sigmoid
    pools = depth_pools(cub)
    leaf = {k.lower(): k for k in cub.paths}
    queries = [LevelQuery(it.image, leaf[it.label.lower()], cub.paths[leaf[it.label.lower()]], d)
               for it in items for d in range(4)]
    s.prepare(queries)
    model = s.model
    for q in queries[:8] + queries[-2:]:
        ranked = _brute_force(model, q.image, pools[q.depth])
        want = [n for n in ranked if n.lower() != q.truth.lower()][:3]
        assert s.choose(q, pools[q.depth], 3, random.Random(0)) == want


def _mine_cli(*argv: str) -> int:
    import harness.cli.clip

    p = argparse.ArgumentParser()
    harness.cli.clip.add_cli(p.add_subparsers())
    args = p.parse_args(list(argv))
    return args.func(args)


def test_clip_mine_remines_an_items_file_and_compares(siglip, tmp_path, capsys):
    root_map = cub_images(tmp_path / "img", 12, items_file=CUB_RANDOM)
    out = tmp_path / "mined.jsonl"
    assert _mine_cli("clip-mine", "--model", str(siglip), "--data", str(CUB_RANDOM), "--out", str(out),
                     "--image-root-map", root_map, "--limit", "12", "--device", "cpu", "--workers", "2",
                     "--compare", str(CUB_SIMILAR)) == 0
    printed = capsys.readouterr().out
    assert "12 items, 48 questions re-mined" in printed and "sibling share" in printed
    assert f"also offered by {CUB_SIMILAR}" in printed
    mined = list(read_items(out))
    orig = list(islice(read_items(CUB_RANDOM), 12))
    assert [(m.image, m.label, [lv.truth for lv in m.levels]) for m in mined] == \
           [(o.image, o.label, [lv.truth for lv in o.levels]) for o in orig]
    first = orjson.loads(out.read_bytes().splitlines()[0])
    assert list(first)[:4] == ["image", "label", "split", "level1"]
    # the mined distractors are the brute-force top 3 (lower-cased, as the CUB files)
    model = load_model(str(siglip), "cpu")
    cub = load_taxonomy("cub")
    pools = depth_pools(cub)
    image = orig[0].image.replace(root_map.split("=")[0], root_map.split("=")[1])
    for lv in mined[0].levels:
        ranked = [n.lower() for n in _brute_force(model, image, pools[lv.n - 1])]
        assert sorted(c for c in lv.choices if c != lv.truth) == sorted([n for n in ranked if n != lv.truth][:3])
    # deterministic: the same command gives the same file
    out2 = tmp_path / "mined2.jsonl"
    assert _mine_cli("clip-mine", "--model", str(siglip), "--data", str(CUB_RANDOM), "--out", str(out2),
                     "--image-root-map", root_map, "--limit", "12", "--device", "cpu", "--workers", "0") == 0
    assert out2.read_bytes() == out.read_bytes()


def test_released_similar_and_random_files_share_few_distractors():
    """The measures quoted in the README: the two released files offer mostly different distractors."""
    st = overlap_stats(CUB_SIMILAR, CUB_RANDOM)
    assert [(s.level, s.questions, s.distractors) for s in st.values()] == [(n, 5794, 17382) for n in (1, 2, 3, 4)]
    assert [round(s.percent, 1) for s in st.values()] == [25.4, 8.6, 2.6, 1.4]
    assert [s.shared for s in overlap_stats(CUB_SIMILAR, CUB_SIMILAR).values()] == [17382] * 4


def test_harness_build_choices_similar_resolves_the_strategy_by_name(siglip, tmp_path, monkeypatch, capsys):
    """`harness build --choices similar` finds the strategy through the table alone (no module registers
    it), and writes what the builder writes with the strategy object."""
    import harness.cli

    monkeypatch.setattr(harness.cli, "COMMANDS", ["harness.cli.build"])
    root_map = cub_images(tmp_path / "img", 6, items_file=CUB_RANDOM)
    old, new = root_map.split("=")
    lst = tmp_path / "list.jsonl"
    lst.write_text("".join(json.dumps({"image": it.image.replace(old, new), "label": it.label}) + "\n"
                           for it in islice(read_items(CUB_RANDOM), 6)))
    out = tmp_path / "items.jsonl"
    assert harness.cli.main(["build", "--taxonomy", "cub", "--images", str(lst), "--out", str(out), "--choices",
                             "similar", "--choices-option", f"model={siglip}", "--choices-option", "device=cpu",
                             "--choices-option", "workers=1"]) == 0
    assert "6 items, 24 questions" in capsys.readouterr().out
    cub = load_taxonomy("cub")
    strategy = SimilarDistractors(cub, str(siglip), device="cpu", workers=1)
    refs = [ImageRef(r["image"], r["label"]) for r in map(json.loads, lst.read_text().splitlines())]
    assert [orjson.loads(x) for x in out.read_bytes().splitlines()] == list(build_items(cub, refs, strategy))
