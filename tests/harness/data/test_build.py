"""Item builder and input adapters (the commands: tests/harness/cli/test_build.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import orjson
import pytest

from harness.data.build import (
    BuildError,
    BuildReport,
    ImageRef,
    build_items,
    detect_format,
    load_imagenet_classes,
    read_cub,
    read_food,
    read_image_list,
    read_imagenet,
    read_inat,
)
from harness.data.imagelists import LabelMatcher
from harness.data.items import ItemError, parse_record
from harness.data.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[3]
CUB_RANDOM = REPO / "data/hierarchy/CUB200_with_random_choice.jsonl"
CUB_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset/CUB_200_2011/images/"


@pytest.fixture(scope="module")
def cub_ref() -> list[dict]:
    return [orjson.loads(x) for x in CUB_RANDOM.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def cub():
    return load_taxonomy("cub")


def _levels(rec: dict) -> list[str]:
    return [rec[f"level{i}"] for i in range(1, 1 + sum(k.startswith("level") for k in rec))]


# --- the builder ----------------------------------------------------------------------------------


def test_build_cub_records_format_and_truths(cub_ref):
    images = [(r["image"], r["label"]) for r in cub_ref[:300]]
    recs = list(build_items("cub", images, "random"))
    assert len(recs) == 300
    for rec, ref in zip(recs, cub_ref):
        assert list(rec) == ["image", "label", "split", "level1", "choices_level1", "level2", "choices_level2",
                             "level3", "choices_level3", "level4", "choices_level4", "taxonomy"]
        assert rec["split"] == "test" and rec["taxonomy"] == "cub"
        assert _levels(rec) == _levels(ref)  # lower-case by default for CUB, like the released files
        for n in range(1, 5):
            ch = rec[f"choices_level{n}"]
            assert len(ch) == 4 and rec[f"level{n}"] in ch and all(c == c.lower() for c in ch)
        item = parse_record(rec, "built", 1)
        assert [lv.root for lv in item.levels] == [False] * 4
    assert recs[0]["label"] == "Black-footed Albatross"


def test_truth_position_is_about_uniform(cub_ref):
    images = [(r["image"], r["label"]) for r in cub_ref]
    pos: Counter[int] = Counter()
    for rec in build_items("cub", images, "random"):
        for n in range(1, 5):
            pos[rec[f"choices_level{n}"].index(rec[f"level{n}"])] += 1
    total = sum(pos.values())
    assert total == 4 * 5794 and set(pos) == {0, 1, 2, 3}
    assert all(0.23 < c / total < 0.27 for c in pos.values())


def test_build_is_deterministic_and_order_independent(cub_ref):
    images = [(r["image"], r["label"]) for r in cub_ref[:200]]
    a = list(build_items("cub", images, "siblings", seed=0))
    b = list(build_items("cub", list(reversed(images)), "siblings", seed=0, batch_size=7))
    assert sorted(a, key=lambda r: r["image"]) == sorted(b, key=lambda r: r["image"])
    c = list(build_items("cub", images, "siblings", seed=1))
    assert a != c and [_levels(x) for x in a] == [_levels(x) for x in c]


def test_build_root_levels_case_and_variable_depth():
    inat = load_taxonomy("inat_animal")
    [rec] = build_items(inat, [("x.jpg", "caenurgina_crassiuscula", "val")])
    assert rec["label"] == "Caenurgina crassiuscula" and rec["split"] == "val"
    assert rec["level1"] == "Animalia" and rec["choices_level1"] == ["Animalia"]  # root: one choice
    assert rec["level7"] == "Caenurgina crassiuscula" and rec["taxonomy"] == "inat_animal"
    item = parse_record(rec, "built", 1)
    assert item.levels[0].root and not any(lv.root for lv in item.levels[1:])
    assert all(len(lv.choices) == 4 for lv in item.levels[1:])
    # ImageNet-animal: level 2 is vertebrate/invertebrate, paths of different lengths
    ia = load_taxonomy("imagenet_animal")
    recs = list(build_items(ia, [("a.jpg", "tench"), ("b.jpg", "trilobite")], "random", lowercase=False))
    assert [len(_levels(r)) for r in recs] == [len(ia.paths["tench"]), 4]
    assert sorted(recs[0]["choices_level2"]) == ["invertebrate", "vertebrate"]
    recs = list(build_items(ia, [("c.jpg", "Dungeness crab")], lowercase=True))
    assert recs[0]["label"] == "Dungeness crab" and recs[0][f"level{len(ia.paths['Dungeness crab'])}"] == "dungeness crab"


def test_n_choices(cub):
    for n in (2, 6):
        [rec] = build_items(cub, [("a.jpg", "Laysan Albatross")], n_choices=n)
        assert all(len(rec[f"choices_level{i}"]) == n for i in range(1, 5))
    with pytest.raises(ValueError, match="n_choices"):
        list(build_items(cub, [("a.jpg", "Laysan Albatross")], n_choices=1))


def test_unmatched_labels_error_or_skip(cub, tmp_path):
    lst = tmp_path / "list.jsonl"
    lst.write_text('{"image": "a.jpg", "label": "Laysan Albatross"}\n\n'
                   '{"image": "b.jpg", "label": "Blue Whale"}\n'
                   '{"image": "c.jpg", "label": "Sooty Albatross"}\n')
    with pytest.raises(BuildError, match=r"list\.jsonl:3: label 'Blue Whale' matches no leaf of taxonomy cub"):
        list(build_items(cub, read_image_list(lst)))
    report = BuildReport()
    recs = list(build_items(cub, read_image_list(lst), on_unmatched="skip", report=report))
    assert [r["image"] for r in recs] == ["a.jpg", "c.jpg"]
    assert report.skipped == {"unmatched label": 1} and "list.jsonl:3" in report.messages[0]
    assert (report.items, report.questions, dict(report.depths)) == (2, 8, {4: 2})
    assert [r["image"] for r in build_items(cub, read_image_list(lst), on_unmatched="skip", limit=1)] == ["a.jpg"]


# --- adapters -------------------------------------------------------------------------------------


def test_generic_lists_jsonl_and_csv(tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("image,label,split\n/x/1.jpg,apple_pie,test\n/x/2.jpg,pizza,train\n/x/3.jpg,sushi,\n")
    refs = list(read_image_list(csv_path, split="test"))
    assert refs == [ImageRef("/x/1.jpg", "apple_pie", "test", f"{csv_path}:2"),
                    ImageRef("/x/3.jpg", "sushi", None, f"{csv_path}:4")]
    assert len(list(read_image_list(csv_path, split="all"))) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx,y\n")
    with pytest.raises(ItemError, match="image,label"):
        list(read_image_list(bad))
    jl = tmp_path / "l.jsonl"
    jl.write_text('{"image": "/x/1.jpg", "label": "pizza"}\n{"image": "/x/2.jpg"}\n')
    with pytest.raises(ItemError, match=r"l\.jsonl:2: field 'label'"):
        list(read_image_list(jl))
    recs = list(build_items("food", read_image_list(csv_path, split="test")))
    assert [(r["label"], r["split"]) for r in recs] == [("apple pie", "test"), ("sushi", "test")]
    assert recs[0]["level1"] == "food" and recs[0]["choices_level1"] == ["food"]


def _fake_cub(root: Path, cub_ref: list[dict], n_train: int = 5) -> Path:
    """CUB_200_2011 metadata for the 5,794 shipped test images plus a few train images (no pixels)."""
    d = root / "CUB_200_2011"
    d.mkdir(parents=True)
    rels = [r["image"][len(CUB_PREFIX):] for r in cub_ref]
    folders = sorted({r.split("/")[0] for r in rels})
    cid = {f: i for i, f in enumerate(folders, 1)}
    train = [f"{f}/train_{i}.jpg" for i, f in enumerate(folders[:n_train])]
    allr = train + rels
    (d / "classes.txt").write_text("".join(f"{i} {f}\n" for f, i in cid.items()))
    (d / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in enumerate(allr, 1)))
    (d / "image_class_labels.txt").write_text("".join(f"{i} {cid[r.split('/')[0]]}\n" for i, r in enumerate(allr, 1)))
    (d / "train_test_split.txt").write_text("".join(f"{i} {int(i <= n_train)}\n" for i in range(1, len(allr) + 1)))
    return d


def test_cub_layout_reproduces_the_shipped_truths(tmp_path, cub_ref, cub):
    d = _fake_cub(tmp_path, cub_ref)
    refs = list(read_cub(tmp_path))  # parent of CUB_200_2011 works too
    assert len(refs) == 5794 and all(r.split == "test" for r in refs)
    assert refs[0].image == str(d / "images" / cub_ref[0]["image"][len(CUB_PREFIX):])
    assert refs[0].label == "Black_footed_Albatross" and refs[0].where == f"{d / 'classes.txt'}:1"
    assert len(list(read_cub(d, split="train"))) == 5 and len(list(read_cub(d, split="all"))) == 5799
    recs = list(build_items(cub, refs, "random"))
    assert len(recs) == 5794
    for rec, ref in zip(recs, cub_ref):
        assert rec["image"].endswith(ref["image"][len(CUB_PREFIX):])
        assert _levels(rec) == _levels(ref)
        assert rec["label"].lower() == ref["label"].lower()


def test_cub_unknown_class_names_classes_txt_line(tmp_path, cub):
    d = tmp_path / "CUB_200_2011"
    d.mkdir()
    (d / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 999.Dodo\n")
    (d / "images.txt").write_text("1 001.Black_footed_Albatross/a.jpg\n2 999.Dodo/b.jpg\n")
    (d / "image_class_labels.txt").write_text("1 1\n2 2\n")
    (d / "train_test_split.txt").write_text("1 0\n2 0\n")
    with pytest.raises(BuildError, match=r"classes\.txt:2: label 'Dodo'"):
        list(build_items(cub, read_cub(d)))


def _inat_json(path: Path) -> Path:
    cats = [
        {"id": 0, "name": "Caenurgina crassiuscula", "kingdom": "Animalia", "phylum": "Arthropoda",
         "class": "Insecta", "order": "Lepidoptera", "family": "Erebidae", "genus": "Caenurgina",
         "specific_epithet": "crassiuscula"},
        {"id": 1, "kingdom": "Plantae", "genus": "Houstonia", "specific_epithet": "purpurea"},  # no name
        {"id": 2, "name": "Branta leucopsis", "kingdom": "Animalia", "genus": "Branta", "specific_epithet": "leucopsis"},
        {"id": 3, "name": "Amanita muscaria", "kingdom": "Fungi"},
    ]
    images = [{"id": i, "file_name": f"val/{i:05d}_x/{i}.jpg"} for i in range(6)]
    anns = [{"id": i, "image_id": i, "category_id": c} for i, c in enumerate([0, 1, 2, 3, 1])]  # image 5: none
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_inat_layout(tmp_path):
    js = _inat_json(tmp_path / "val.json")
    rep = BuildReport()
    refs = list(read_inat(js, "Animalia", report=rep))
    assert [(Path(r.image).relative_to(tmp_path).as_posix(), r.label) for r in refs] == [
        ("val/00000_x/0.jpg", "Caenurgina crassiuscula"), ("val/00002_x/2.jpg", "Branta leucopsis")]
    assert rep.skipped == {"kingdom Plantae": 2, "kingdom Fungi": 1, "no annotation": 1}
    recs = list(build_items("inat_animal", refs))
    assert [r["level6"] for r in recs] == ["Caenurgina", "Branta"] and recs[1]["level3"] == "Aves"
    plants = list(build_items("inat_plant", read_inat(js, "plantae")))
    assert [r["label"] for r in plants] == ["Houstonia purpurea"] * 2
    assert plants[0]["level1"] == "Plantae" and plants[0]["choices_level1"] == ["Plantae"]
    assert len(plants[0]["choices_level2"]) == 4  # 5 phyla: 4 options


def _fake_imagenet(root: Path) -> tuple[Path, list[str]]:
    wnids = ["n01440764", "n01443537", "n01608432", "n03126707", "n09999999"]
    for i, w in enumerate(wnids):
        (root / "val" / w).mkdir(parents=True)
        for j in range(2):
            (root / "val" / w / f"ILSVRC2012_val_{i}{j}.JPEG").write_bytes(b"")
        (root / "val" / w / "notes.txt").write_text("not an image")
    return root, wnids


def test_imagenet_layout_with_class_list(tmp_path):
    root, wnids = _fake_imagenet(tmp_path)
    names = ["tench", "goldfish", "kite (bird of prey)", "construction crane", "volcano"]
    (tmp_path / "classes.json").write_text(json.dumps(names))
    tax = load_taxonomy("imagenet_animal")
    rep = BuildReport()
    refs = list(read_imagenet(root, tmp_path / "classes.json", matcher=LabelMatcher(tax), report=rep))
    assert [r.label for r in refs] == ["tench", "tench", "goldfish", "goldfish", "kite (bird of prey)",
                                       "kite (bird of prey)"]
    assert refs[0].image.endswith("val/n01440764/ILSVRC2012_val_00.JPEG")
    assert rep.skipped == {"not in taxonomy": 4}  # crane (artifact) and volcano, 2 images each
    recs = list(build_items(tax, refs))
    assert recs[0]["level1"] == "animal" and recs[0]["level2"] == "vertebrate"
    art = load_taxonomy("imagenet_artifact")
    refs = list(read_imagenet(root / "val", tmp_path / "classes.json", matcher=LabelMatcher(art)))
    assert [r.label for r in refs] == ["construction crane"] * 2
    # an explicit wnid list; a class list that does not fit the folders needs one
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    assert len(list(read_imagenet(root, tmp_path / "classes.json", tmp_path / "wnids.txt"))) == 10
    (tmp_path / "short.json").write_text(json.dumps(names[:3]))
    with pytest.raises(BuildError, match="sorted wnid list"):
        list(read_imagenet(root, tmp_path / "short.json"))


def test_imagenet_class_index_formats(tmp_path):
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                   "n02012849 crane\nn03126707 crane\n")
    m = load_imagenet_classes(loc)
    assert m["n01440764"] == ["tench", "Tinca tinca"] and m["n03126707"] == ["crane"]
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    assert load_imagenet_classes(keras) == {"n01440764": ["tench"], "n01443537": ["goldfish"]}
    obj = tmp_path / "wnid_to_name.json"
    obj.write_text(json.dumps({"n01440764": "tench"}))
    assert load_imagenet_classes(obj) == {"n01440764": ["tench"]}
    # LOC-style file end to end: synonyms are candidates; classes absent from the file are counted
    root, _ = _fake_imagenet(tmp_path / "in")
    rep = BuildReport()
    refs = list(read_imagenet(root, loc, matcher=LabelMatcher(load_taxonomy("imagenet_animal")), report=rep))
    assert [r.label for r in refs] == ["tench", "tench", "goldfish", "goldfish"]
    assert rep.skipped == {"wnid not in class index": 4, "not in taxonomy": 2}


def test_food_layout(tmp_path):
    root = tmp_path / "food-101"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "test.txt").write_text("apple_pie/1005649\nbreakfast_burrito/1\ncup_cakes/77\n")
    (root / "meta" / "train.txt").write_text("pizza/5\n")
    tax = load_taxonomy("food")
    rep = BuildReport()
    refs = list(read_food(tmp_path, matcher=LabelMatcher(tax), report=rep))
    assert [(Path(r.image).relative_to(root).as_posix(), r.label, r.split) for r in refs] == [
        ("images/apple_pie/1005649.jpg", "apple pie", "test"), ("images/cup_cakes/77.jpg", "cup cakes", "test")]
    assert rep.skipped == {"not in taxonomy": 1}
    recs = list(build_items(tax, refs))
    assert [r["label"] for r in recs] == ["apple pie", "cup cakes"]
    assert recs[0]["level2"] == "desserts" and recs[0]["level1"] == "food"
    assert [r.label for r in read_food(root, split="train")] == ["pizza"]


def test_detect_format(tmp_path, cub_ref):
    assert detect_format(CUB_RANDOM) == "jsonl"
    _fake_cub(tmp_path / "c", cub_ref[:3])
    assert detect_format(tmp_path / "c") == "cub"
    (tmp_path / "f" / "meta").mkdir(parents=True)
    assert detect_format(tmp_path / "f") == "food"
    _fake_imagenet(tmp_path / "i")
    assert detect_format(tmp_path / "i") == "imagenet"
    assert detect_format(_inat_json(tmp_path / "val.json")) == "inat"
