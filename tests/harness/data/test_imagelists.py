"""The one image-list reader and label normaliser (harness/data/imagelists.py), and that the readers
built on it (build, classification, probes) read the shipped files exactly as before."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from harness.data.imagelists import ImageRow, LabelMatcher, normalize_label, read_image_rows
from harness.data.items import ItemError
from harness.data.taxonomy import TAXONOMIES, load_taxonomy

REPO = Path(__file__).resolve().parents[3]
CLASSIFICATION_LISTS = sorted((REPO / "data/classification").glob("*.jsonl"))
CUB_FILES = [REPO / "data/hierarchy/CUB200_with_random_choice.jsonl",
             REPO / "data/hierarchy/CUB200_with_similar_choice.jsonl", REPO / "data/probing/CUB200_all.jsonl"]


@pytest.fixture(scope="module")
def cub():
    return load_taxonomy("cub")


def _raw(path: Path) -> list[tuple[int, dict]]:
    return [(n, orjson.loads(line)) for n, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]


def _old_probe_normalize(label: str) -> str:
    """probes/data.py's normaliser before it used the harness's one."""
    return label.lower().replace("-", " ").replace("_", " ")


# --- label matching -------------------------------------------------------------------------------


def test_normalize_label():
    assert normalize_label("  Black_footed-Albatross ") == "black footed albatross"
    assert normalize_label("Black  footed\tAlbatross") == "black footed albatross"


def test_matcher_accepts_dataset_spellings(cub):
    m = LabelMatcher(cub)
    for s in ["Black-footed Albatross", "Black footed Albatross", "001.Black_footed_Albatross",
              "BLACK-FOOTED albatross", "black_footed_albatross"]:
        assert m.match(s) == "Black-footed Albatross", s
    assert m.match("126.Nelson_Sharp_tailed_Sparrow") == "Nelson's Sharp-tailed Sparrow"
    assert m.match("Forsters Tern") == "Forster's Tern"
    assert m.match("Brewer Sparrow") == "Brewer's Sparrow"
    assert m.match("141.Artic_Tern") == "Arctic Tern"  # CUB's misspelt folder
    assert m.match("Blue Whale") is None
    food = LabelMatcher(load_taxonomy("food"))
    assert food.match("apple_pie") == "apple pie" and food.match("cup_cakes") == "cup cakes"
    assert food.match("breakfast_burrito") is None


def test_matcher_covers_all_200_cub_class_folders(cub):
    """Every CUB folder name (taken from the shipped annotation paths) maps to the record's label."""
    m = LabelMatcher(cub)
    folders = {r["image"].split("/")[-2]: r["label"] for _, r in _raw(CUB_FILES[0])}
    assert len(folders) == 200
    for folder, label in folders.items():
        key = m.match(folder)
        assert key is not None and key.lower() == label.lower(), folder


@pytest.mark.parametrize("tax_id", sorted(TAXONOMIES))
def test_the_shared_normaliser_keys_every_taxonomy_name_as_the_probes_did(tax_id):
    """Collapsing whitespace changes no taxonomy name, so the probes' leaf index is unchanged."""
    tax = load_taxonomy(tax_id)
    names = {n for path in tax.paths.values() for n in path} | set(tax.paths)
    assert {n: normalize_label(n) for n in names} == {n: _old_probe_normalize(n) for n in names}


# --- the reader -----------------------------------------------------------------------------------


def test_rows_from_jsonl_and_csv(tmp_path):
    jl = tmp_path / "l.jsonl"
    jl.write_text('{"image": "a.jpg", "label": "tench", "split": "test", "id": 7}\n\n{"image": "b.jpg", "label": "carp"}\n')
    assert list(read_image_rows(jl)) == [
        ImageRow(1, "a.jpg", "tench", "test", {"image": "a.jpg", "label": "tench", "split": "test", "id": 7}),
        ImageRow(3, "b.jpg", "carp", None, {"image": "b.jpg", "label": "carp"})]
    cs = tmp_path / "l.csv"
    cs.write_text("image,label,split\n/x/1.jpg,apple_pie,test\n/x/3.jpg,sushi,\n")
    assert [r[:4] for r in read_image_rows(cs)] == [(2, "/x/1.jpg", "apple_pie", "test"), (3, "/x/3.jpg", "sushi", None)]


@pytest.mark.parametrize("text, require_split, line, field, message", [
    ('{"image": "a.jpg"}', False, 1, "label", "missing field"),
    ('{"image": "a.jpg", "label": null}', False, 1, "label", "missing field"),
    ('{"image": "a.jpg", "label": "x"}\n{"image": " ", "label": "x"}', False, 2, "image", "must be a non-empty string"),
    ('{"image": "a.jpg", "label": 3}', False, 1, "label", "must be a non-empty string"),
    ('{"image": "a.jpg", "label": "x", "split": 1}', False, 1, "split", "must be a string"),
    ('{"image": "a.jpg", "label": "x"}', True, 1, "split", "missing field"),
    ('{"image": "a.jpg", "label": "x", "split": ""}', True, 1, "split", "must be a non-empty string"),
    ('[1, 2]', False, 1, None, "expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, text, require_split, line, field, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(text + "\n")
    with pytest.raises(ItemError, match=message) as e:
        list(read_image_rows(p, require_split=require_split))
    assert (e.value.file, e.value.line, e.value.field) == (str(p), line, field)


def test_a_csv_without_image_and_label_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("path,label\nx,y\n")
    with pytest.raises(ItemError, match=r"bad\.csv:1: field 'image': CSV header must name image,label"):
        list(read_image_rows(p))


# --- the shipped files read as before ---------------------------------------------------------------


@pytest.mark.parametrize("path", CLASSIFICATION_LISTS + CUB_FILES, ids=lambda p: p.name)
def test_shipped_lists_read_as_their_raw_records(path):
    rows = list(read_image_rows(path))
    raw = _raw(path)
    assert len(rows) == len(raw) > 0
    assert rows == [ImageRow(n, r["image"], r["label"], r.get("split"), r) for n, r in raw]


@pytest.mark.parametrize("name", ["flowers", "cars", "caltech"])
def test_classification_lists_read_identically(name):
    """read_class_items on the shared reader gives what the former inline reader gave: every record of
    the split, in file order, key = the image as written, label as written."""
    from harness.classification.datasets import load_classes, read_class_items, resolve

    ds = resolve(name, None, None, None)
    classes = load_classes(ds.classes)
    for split in ("all", ds.split):
        got = [(it.line, it.key, it.image, it.label, it.split) for it in read_class_items(ds.data, classes, split=split)]
        want = [(n, r["image"], r["image"], r["label"], r.get("split")) for n, r in _raw(ds.data)
                if split == "all" or r.get("split") == split]
        assert got == want


def test_cub_lists_read_identically_by_build_and_probes(cub):
    from harness.data.build import ImageRef, read_image_list
    from probes.data import leaf_index, read_image_items

    for path in CUB_FILES[:2]:
        assert list(read_image_list(path)) == [
            ImageRef(r["image"].strip(), r["label"].strip(), r.get("split") or None, f"{path}:{n}")
            for n, r in _raw(path)]
    probing = CUB_FILES[2]
    old_index = {}
    for key, p in cub.paths.items():
        old_index.setdefault(_old_probe_normalize(key), p)
        old_index.setdefault(_old_probe_normalize(p[-1]), p)
    assert leaf_index(cub) == old_index
    items = list(read_image_items(probing, taxonomy=cub))
    raw = _raw(probing)
    assert len(items) == len(raw) == 11788
    assert [(i.line, i.split, i.labels) for i in items] == [
        (n, r["split"], old_index[_old_probe_normalize(r["label"])]) for n, r in raw]
