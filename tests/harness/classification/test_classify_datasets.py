"""Shipped classification data (data/classification) and the validating readers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from harness.classification.datasets import (
    data_dir,
    load_classes,
    parse_wiki_text,
    read_class_items,
    read_wikiqa,
    resolve,
)
from harness.data.items import ItemError


@pytest.mark.parametrize("name, n_test, n_classes", [("flowers", 6149, 102), ("cars", 8041, 196), ("caltech", 4331, 100)])
def test_shipped_image_lists(name, n_test, n_classes):
    ds = resolve(name, None, None, None)
    classes = load_classes(ds.classes)
    assert len(classes) == len(set(classes)) == n_classes
    items = read_class_items(ds.data, classes, split=ds.split)
    assert ds.split == "test" and len(items) == n_test
    assert {it.label for it in items} <= set(classes)


def test_imagenet_needs_an_image_list():
    with pytest.raises(ValueError, match="--data is required for imagenet"):
        resolve("imagenet", None, None, None)
    with pytest.raises(ValueError, match="unknown dataset"):
        resolve("mnist", None, None, None)


def test_reader_errors_name_file_line_field(tmp_path):
    classes = ["tench", "goldfish"]
    p = tmp_path / "x.jsonl"
    p.write_text('{"image": "a.jpg", "label": "tench", "split": "test"}\n{"image": "b.jpg", "label": "carp", "split": "test"}\n')
    with pytest.raises(ItemError, match=r"x\.jsonl:2: field 'label': 'carp' is not in the class list"):
        read_class_items(p, classes, split="test")
    p.write_text('{"image": "a.jpg", "split": "test"}\n')
    with pytest.raises(ItemError, match=r"x\.jsonl:1: field 'label': missing field"):
        read_class_items(p, classes)
    p.write_text('{"image": "a.jpg", "label": "tench", "split": "train"}\n')
    with pytest.raises(ValueError, match=r"no records with split 'test' \(splits present: train \(1\)\)"):
        read_class_items(p, classes, split="test")
    with pytest.raises(ValueError, match="no evaluation split"):
        read_class_items(p, classes, split="auto")
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(["ok", ""]))
    with pytest.raises(ValueError, match=r"c\.json: entry 1: class name must be a non-empty string"):
        load_classes(bad)


def test_auto_split_and_root_map(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps({"image": f"./data/im{i}.jpg", "label": "tench", "split": s}) + "\n"
                         for i, s in enumerate(["train", "valid", "valid"])))
    items = read_class_items(p, ["tench"], split="auto", root_map=["./data=/mnt/imagenet"])
    assert [(it.line, it.key, it.image) for it in items] == [(2, "./data/im1.jpg", "/mnt/imagenet/im1.jpg"),
                                                             (3, "./data/im2.jpg", "/mnt/imagenet/im2.jpg")]


def test_imagewikiqa_matches_the_protocol_counts():
    items = list(read_wikiqa(data_dir() / "imagewikiqa.jsonl", root_map=["images=/data/val"]))
    assert len(items) == 2000
    assert len({it.text for it in items}) == 771  # question + options; 752 distinct question stems
    assert len({it.question for it in items}) == 752
    assert len({it.classname for it in items}) == 527
    assert len({it.key for it in items}) == 1961
    assert Counter(it.label for it in items) == {"A": 526, "B": 522, "C": 445, "D": 507}
    assert items[0].image.startswith("/data/val/ILSVRC2012_val_")
    assert list(items[0].options) == ["A", "B", "C", "D"]


def test_wiki_text_parse_errors():
    q, opts = parse_wiki_text("Q?\nA. a\nB. b\nC. c\nD. d\nChoose A, B, C, or D.")
    assert q == "Q?" and opts == {"A": "a", "B": "b", "C": "c", "D": "d"}
    with pytest.raises(ValueError, match="option line"):
        parse_wiki_text("Q?\nA. a\nB. b\nC: c\nD. d\nChoose A, B, C, or D.")
    with pytest.raises(ValueError, match="expected"):
        parse_wiki_text("Q?\nA. a")
