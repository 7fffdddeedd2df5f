"""Classification image lists, class lists and ImageWikiQA, validated line by line.

Image lists are the reference format (`image`, `label`, `split`; ImageNet adds `label_idx`, ...): one
image a line, `label` exactly a name of the class list, read by the shared image-list reader
(:func:`harness.data.imagelists.read_image_rows`). Every error names file, line and field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from harness.data.imagelists import read_image_rows
from harness.data.items import ItemError, iter_jsonl, parse_root_map, remap

_PKG = Path(__file__).resolve().parents[1]
_REPO = _PKG.parent

# Shipped image lists: name -> (image list or None, class list, evaluation split).
DATASETS: dict[str, tuple[str | None, str, str]] = {
    "imagenet": (None, "imagenet_classes.json", "valid"),  # the ImageNet image list is not public
    "flowers": ("flowers.jsonl", "flowers_classes.json", "test"),
    "cars": ("cars.jsonl", "cars_classes.json", "test"),
    "caltech": ("caltech.jsonl", "caltech_classes.json", "test"),
}


def data_dir() -> Path:
    """The shipped classification data: next to the package in a wheel, `data/classification` in a checkout."""
    for d in (_PKG / "_data" / "classification", _REPO / "data" / "classification"):
        if d.is_dir():
            return d
    raise FileNotFoundError("shipped classification data not found (data/classification)")


@dataclass(frozen=True, slots=True)
class ClassItem:
    """One image to classify. `key` is the image path as written in the file (stable across machines)."""

    line: int
    key: str
    image: str  # after --image-root-map
    label: str
    split: str | None


AUTO = "auto"  # the evaluation split present in the file: test, else valid, else val
_EVAL_SPLITS = ("test", "valid", "val")


@dataclass(frozen=True)
class Dataset:
    name: str
    data: Path | None
    classes: Path
    split: str


def resolve(dataset: str | None, data: str | None, classes: str | None, split: str | None) -> Dataset:
    """A shipped dataset name and/or explicit files -> the files and evaluation split to use."""
    d = data_dir() if dataset in DATASETS else None
    if dataset and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; shipped: {', '.join(DATASETS)} (or pass --data and --classes)")
    data_name, classes_name, default_split = DATASETS.get(dataset or "", (None, None, AUTO))
    data_path = Path(data) if data else (d / data_name if d and data_name else None)
    classes_path = Path(classes) if classes else (d / classes_name if d and classes_name else None)
    if data_path is None:
        raise ValueError(f"--data is required{' for ' + dataset if dataset else ''} (an image list: image, label, split)")
    if classes_path is None:
        raise ValueError("--classes is required (a JSON list of class names) unless --dataset names a shipped one")
    for p in (data_path, classes_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    return Dataset(dataset or data_path.stem, data_path, classes_path, split or default_split)


def load_classes(path: str | Path, *, first_synonym: bool = False) -> list[str]:
    """A JSON list of class names in index order (duplicates kept: ImageNet has two)."""
    path = Path(path)
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):  # {"0": "tench", ...} or {"n01440764": "tench", ...}
        data = list(data.values())
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of class names")
    out = []
    for i, c in enumerate(data):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{path}: entry {i}: class name must be a non-empty string, got {c!r}")
        out.append(c.split(",")[0].strip() if first_synonym else c)
    return out


def unique(classes: Iterable[str]) -> list[str]:
    """Distinct class names in first-seen order."""
    return list(dict.fromkeys(classes))


def read_class_items(path: str | Path, classes: Iterable[str], *, split: str | None = None,
                     root_map: Iterable[str] = (), first_synonym: bool = False) -> list[ClassItem]:
    """All records of `split` (None or "all": every record; "auto": test, else valid, else val),
    validated; labels must be in `classes`. Returned in file order (the reference shuffles the split)."""
    path = Path(path)
    if split == AUTO:
        items = read_class_items(path, classes, split="all", root_map=root_map, first_synonym=first_synonym)
        present = {it.split for it in items}
        for sp in _EVAL_SPLITS:
            if sp in present:
                return [it for it in items if it.split == sp]
        raise ValueError(f"{path}: no evaluation split (test, valid or val) among {sorted(map(str, present))}; pass --split")
    rm = parse_root_map(root_map)
    known = set(classes)
    out: list[ClassItem] = []
    splits: dict[str, int] = {}
    for row in read_image_rows(path):
        sp = row.split
        splits[str(sp)] = splits.get(str(sp), 0) + 1
        if split not in (None, "all") and sp != split:
            continue
        label = row.label.split(",")[0].strip() if first_synonym else row.label
        if label not in known:
            raise ItemError(path, row.line, "label", f"{label!r} is not in the class list")
        out.append(ClassItem(row.line, row.image, remap(row.image, rm), label, sp))
    if not out:
        have = ", ".join(f"{k} ({v})" for k, v in splits.items()) or "none"
        raise ValueError(f"{path}: no records with split {split!r} (splits present: {have})")
    return out


# ---------------------------------------------------------------- ImageWikiQA

_OPTION = re.compile(r"^([A-D])\. (.*)$")
WIKIQA_TAIL = "Choose A, B, C, or D."


@dataclass(frozen=True, slots=True)
class WikiItem:
    line: int
    key: str
    image: str
    text: str  # the question as given: question, four "X. option" lines, "Choose A, B, C, or D."
    question: str
    options: dict[str, str]
    label: str
    classname: str
    wiki: str | None


def parse_wiki_text(text: str) -> tuple[str, dict[str, str]]:
    """Split an ImageWikiQA `text` into the question and its A-D options (raises ValueError)."""
    lines = text.split("\n")
    if len(lines) < 6 or lines[-1] != WIKIQA_TAIL:
        raise ValueError(f"expected '<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n{WIKIQA_TAIL}'")
    opts = {}
    for ln in lines[-5:-1]:
        m = _OPTION.match(ln)
        if not m:
            raise ValueError(f"option line {ln[:40]!r} is not 'X. text'")
        opts[m.group(1)] = m.group(2)
    if list(opts) != ["A", "B", "C", "D"]:
        raise ValueError(f"options must be A, B, C, D in order, got {list(opts)}")
    return "\n".join(lines[:-5]), opts


def read_wikiqa(path: str | Path, *, root_map: Iterable[str] = ()) -> Iterator[WikiItem]:
    path = Path(path)
    rm = parse_root_map(root_map)
    for n, rec in iter_jsonl(path):
        for key in ("image", "text", "label", "classname"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise ItemError(path, n, key, "missing field" if key not in rec else "must be a non-empty string")
        try:
            question, options = parse_wiki_text(rec["text"])
        except ValueError as e:
            raise ItemError(path, n, "text", str(e)) from None
        if rec["label"] not in options:
            raise ItemError(path, n, "label", f"must be one of A, B, C, D, got {rec['label']!r}")
        yield WikiItem(n, rec["image"], remap(rec["image"], rm), rec["text"], question, options,
                       rec["label"], rec["classname"], rec.get("wiki"))
