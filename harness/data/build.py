"""Benchmark items from a taxonomy and an image list (the library of `harness build`).

An item is one image with one level per element of its leaf's taxonomy path (root first; CUB has no
root, so its level 1 is the order), each level with the truth and distractors from a strategy in
:mod:`harness.data.distractors`, in the reference annotation format::

    {"image", "label", "split", "level1", "choices_level1", "level2", "choices_level2", ..., "taxonomy"}

Input adapters turn dataset layouts into :class:`ImageRef` streams (image path, leaf label, split):
a generic JSONL/CSV list, CUB-200-2011, iNaturalist 2021 (val json), ImageNet-1K val folders, and
Food-101. Leaf labels are matched to taxonomy keys case-insensitively with `-`/`_` read as spaces
(:class:`harness.data.imagelists.LabelMatcher`). The command line is :mod:`harness.cli.build`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import orjson

from harness.data.distractors import (
    DistractorStrategy,
    LevelQuery,
    check_distractors,
    depth_pools,
    make_strategy,
    rng_for,
)
from harness.data.imagelists import NUM_PREFIX, LabelMatcher, read_image_rows
from harness.data.items import MAX_CHOICES, ItemError, parse_record
from harness.data.taxonomy import Taxonomy, load_taxonomy

FORMATS = ("jsonl", "csv", "cub", "inat", "imagenet", "food")

class BuildError(ValueError):
    """A build input problem; the message starts with the file (and line) it comes from."""


class ImageRef(NamedTuple):
    """One input image: path, leaf label as the dataset spells it, split, and where it came from."""

    image: str
    label: str
    split: str | None = None
    where: str | None = None  # "file:line" (or "file (what)") for messages


@dataclass
class BuildReport:
    """Counts of what adapters and the builder produced and skipped (with the first few reasons)."""

    items: int = 0
    questions: int = 0
    depths: Counter = field(default_factory=Counter)  # levels per item -> items
    skipped: Counter = field(default_factory=Counter)  # reason -> images skipped
    messages: list[str] = field(default_factory=list)
    max_messages: int = 20

    def skip(self, reason: str, n: int = 1, message: str | None = None) -> None:
        self.skipped[reason] += n
        if message and len(self.messages) < self.max_messages:
            self.messages.append(message)

    def summary(self) -> str:
        depths = ", ".join(f"{d}: {n:,}" for d, n in sorted(self.depths.items())) or "-"
        skipped = sum(self.skipped.values())
        why = f" ({', '.join(f'{r}: {n:,}' for r, n in self.skipped.most_common())})" if skipped else ""
        return (f"{self.items:,} items, {self.questions:,} questions; levels per item {{{depths}}}; "
                f"skipped {skipped:,} images{why}")


# --- input adapters -------------------------------------------------------------------------------


def _want_split(split: str | None) -> str | None:
    return None if split in (None, "", "all") else split


def read_image_list(path: str | Path, split: str | None = None,
                    report: BuildReport | None = None) -> Iterator[ImageRef]:
    """A JSONL (`image`, `label`[, `split`] per line; reference annotation files work as is) or CSV
    (header with `image,label`[,`split`]) list, read by :func:`harness.data.imagelists.read_image_rows`;
    image and label are stripped. `split` keeps only rows of that split (rows without a split are
    kept); None or "all" keeps every row."""
    want = _want_split(split)
    for row in read_image_rows(path):
        s = row.split or None
        if want and s and s != want:
            if report:
                report.skip(f"split {s}")
            continue
        yield ImageRef(row.image.strip(), row.label.strip(), s, f"{path}:{row.line}")


def _cub_root(root: Path) -> Path:
    if (root / "images.txt").is_file():
        return root
    if (root / "CUB_200_2011" / "images.txt").is_file():
        return root / "CUB_200_2011"
    raise FileNotFoundError(f"{root}: not a CUB-200-2011 folder (no images.txt)")


def _id_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, id, rest) of a CUB metadata file "<id> <value>"."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ItemError(path, lineno, None, "expected '<id> <value>'")
            yield lineno, parts[0], parts[1].strip()


def read_cub(root: str | Path, split: str | None = "test",
             report: BuildReport | None = None) -> Iterator[ImageRef]:
    """CUB-200-2011: images.txt, image_class_labels.txt, classes.txt, train_test_split.txt under
    `root` (or `root/CUB_200_2011`). split: "test" (is_training_image 0, the default), "train", or
    None/"all". Labels are the class folder names without the number ("Black_footed_Albatross");
    messages about a label point at its classes.txt line."""
    root = _cub_root(Path(root)).absolute()
    want = _want_split(split)
    if want not in (None, "test", "train"):
        raise ValueError(f"CUB split must be test, train or all, not {split!r}")
    classes = {cid: (NUM_PREFIX.sub("", name), f"{root / 'classes.txt'}:{ln}")
               for ln, cid, name in _id_lines(root / "classes.txt")}
    labels = {iid: cid for _, iid, cid in _id_lines(root / "image_class_labels.txt")}
    is_train: dict[str, str] = {}
    if want or (root / "train_test_split.txt").is_file():
        is_train = {iid: v for _, iid, v in _id_lines(root / "train_test_split.txt")}
    images_txt = root / "images.txt"
    for ln, iid, rel in _id_lines(images_txt):
        if iid not in labels:
            raise ItemError(images_txt, ln, None, f"image id {iid} has no line in image_class_labels.txt")
        cid = labels[iid]
        if cid not in classes:
            raise ItemError(images_txt, ln, None, f"image id {iid}: class {cid} not in classes.txt")
        s = None
        if iid in is_train:
            s = "train" if is_train[iid].strip() == "1" else "test"
        elif want:
            raise ItemError(images_txt, ln, None, f"image id {iid} has no line in train_test_split.txt")
        if want and s != want:
            continue
        name, where = classes[cid]
        yield ImageRef(str(root / "images" / rel), name, s, where)


def read_inat(json_path: str | Path, kingdom: str | None = None, split: str | None = "test",
              report: BuildReport | None = None) -> Iterator[ImageRef]:
    """iNaturalist 2021 val (or train) json: COCO-like `images`, `annotations`, `categories` (with
    kingdom ... genus, specific_epithet, name). The leaf label is "Genus epithet" (`name`, else
    genus + specific_epithet); images resolve against the json's folder (file_name "val/..."). Only
    categories of `kingdom` (case-insensitive; None: all) are kept; the others are counted."""
    json_path = Path(json_path)
    base = json_path.parent.absolute()
    data = orjson.loads(json_path.read_bytes())
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise BuildError(f"{json_path}: not an iNat json (need images, annotations, categories)")
    cats: dict[object, tuple[str, str]] = {}
    for c in data["categories"]:
        name = c.get("name") or f"{c.get('genus', '')} {c.get('specific_epithet', '')}".strip()
        if not name:
            raise BuildError(f"{json_path}: category {c.get('id')!r} has neither name nor genus/specific_epithet")
        cats[c["id"]] = (name, str(c.get("kingdom", "")))
    by_image = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    want_k = kingdom.lower() if kingdom else None
    label_split = _want_split(split) or "test"
    for img in data["images"]:
        cid = by_image.get(img["id"])
        if cid is None:
            if report:
                report.skip("no annotation")
            continue
        if cid not in cats:
            raise BuildError(f"{json_path}: image {img['id']!r}: category {cid!r} not in categories")
        name, k = cats[cid]
        if want_k and k.lower() != want_k:
            if report:
                report.skip(f"kingdom {k or '?'}")
            continue
        yield ImageRef(str(base / img["file_name"]), name, label_split, f"{json_path} (category {cid})")


_WNID = re.compile(r"^n\d{8}$")
_IMAGE_EXT = {".jpeg", ".jpg", ".png"}


def _read_list_file(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_imagenet_classes(classes: str | Path, wnids: str | Path | Sequence[str] | None = None,
                          folder_wnids: Sequence[str] = ()) -> dict[str, list[str]]:
    """wnid -> candidate class names (first that matches the taxonomy wins). Accepted `classes`:
    - a `LOC_synset_mapping.txt`-style file, "n01440764 tench, Tinca tinca" (every synonym a candidate);
    - a JSON object wnid -> name, or Keras-style {"0": ["n01440764", "tench"], ...};
    - a JSON list of [wnid, name] pairs;
    - class names in index order (a JSON list, or a text file one a line) together with the sorted
      wnid list: `wnids` (a file one a line or a JSON list, or a sequence), else `folder_wnids` when
      it has as many entries (the ImageNet class index is the sorted wnid order)."""
    path = Path(classes)
    if path.suffix.lower() != ".json":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if lines and _WNID.match(lines[0].split(maxsplit=1)[0]):
            out = {}
            for i, ln in enumerate(lines, 1):
                parts = ln.split(maxsplit=1)
                if len(parts) != 2 or not _WNID.match(parts[0]):
                    raise BuildError(f"{path}:{i}: expected 'nXXXXXXXX name, synonym, ...'")
                out[parts[0]] = [s.strip() for s in parts[1].split(",") if s.strip()]
            return out
        names: list = lines
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            out = {}
            for k, v in data.items():
                if _WNID.match(k):
                    out[k] = [v] if isinstance(v, str) else list(v)
                elif isinstance(v, list) and len(v) == 2 and _WNID.match(str(v[0])):
                    out[v[0]] = [v[1]]
                else:
                    raise BuildError(f"{path}: entry {k!r}: expected wnid -> name or index -> [wnid, name]")
            return out
        if not isinstance(data, list):
            raise BuildError(f"{path}: expected a JSON list or object")
        if data and all(isinstance(x, list) and len(x) == 2 for x in data):
            return {w: [n] for w, n in data}
        names = data
    if not all(isinstance(n, str) for n in names):
        raise BuildError(f"{path}: class names must be strings")
    if wnids is None:
        if len(folder_wnids) != len(names):
            raise BuildError(f"{path}: {len(names)} class names in index order need the sorted wnid list "
                             f"(--imagenet-wnids); the image folder has {len(folder_wnids)} wnid folders")
        wnid_list = sorted(folder_wnids)
    elif isinstance(wnids, (str, Path)):
        wnid_list = [str(w) for w in _read_list_file(Path(wnids))]
    else:
        wnid_list = list(wnids)
    if len(wnid_list) != len(names):
        raise BuildError(f"{path}: {len(names)} class names but {len(wnid_list)} wnids")
    return {w: [n] for w, n in zip(wnid_list, names)}


def read_imagenet(root: str | Path, classes: str | Path, wnids: str | Path | Sequence[str] | None = None,
                  matcher: LabelMatcher | None = None, split: str | None = "test",
                  report: BuildReport | None = None) -> Iterator[ImageRef]:
    """ImageNet-1K val in WordNet-id folders (`root/n01440764/*.JPEG`, or `root/val/...`). With a
    `matcher`, each class takes its first candidate name (:func:`load_imagenet_classes`) that is a
    taxonomy leaf, and classes outside the taxonomy are skipped and counted ("not in taxonomy")."""
    root = Path(root).absolute()
    if (root / "val").is_dir():
        root = root / "val"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and _WNID.match(p.name))
    if not folders:
        raise FileNotFoundError(f"{root}: no WordNet-id folders (n01440764/...)")
    mapping = load_imagenet_classes(classes, wnids, folders)
    label_split = _want_split(split) or "test"
    for wnid in folders:
        files = sorted(p for p in (root / wnid).iterdir() if p.suffix.lower() in _IMAGE_EXT and p.is_file())
        cands = mapping.get(wnid)
        if not cands:
            if report:
                report.skip("wnid not in class index", len(files), f"{root / wnid}: {wnid} not in {classes}")
            continue
        label = cands[0]
        if matcher is not None:
            label = next((c for c in cands if matcher.match(c) is not None), None)
            if label is None:
                if report:
                    report.skip("not in taxonomy", len(files))
                continue
        where = f"{classes} ({wnid})"
        for p in files:
            yield ImageRef(str(p), label, label_split, where)


def read_food(root: str | Path, split: str | None = "test", matcher: LabelMatcher | None = None,
              report: BuildReport | None = None) -> Iterator[ImageRef]:
    """Food-101: `meta/<split>.txt` lines "apple_pie/1005649" -> `images/apple_pie/1005649.jpg`,
    label "apple pie". Root is the folder holding meta/ and images/ (or its parent food-101/). With a
    `matcher`, classes outside the taxonomy are skipped and counted ("not in taxonomy")."""
    root = Path(root).absolute()
    if not (root / "meta").is_dir() and (root / "food-101" / "meta").is_dir():
        root = root / "food-101"
    want = _want_split(split) or "test"
    meta = root / "meta" / f"{want}.txt"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: no Food-101 split file")
    with meta.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if "/" not in line:
                raise ItemError(meta, lineno, None, f"expected 'class/image_id', got {line!r}")
            cls, stem = line.split("/", 1)
            label = cls.replace("_", " ")
            if matcher is not None and matcher.match(label) is None:
                if report:
                    report.skip("not in taxonomy")
                continue
            yield ImageRef(str(root / "images" / cls / f"{stem}.jpg"), label, want, f"{meta}:{lineno}")


def detect_format(path: str | Path) -> str:
    """Guess the input format from a file name or a folder layout."""
    p = Path(path)
    if p.is_file():
        suf = p.suffix.lower()
        if suf == ".csv":
            return "csv"
        if suf == ".json":
            return "inat"
        return "jsonl"
    if p.is_dir():
        if (p / "images.txt").is_file() or (p / "CUB_200_2011" / "images.txt").is_file():
            return "cub"
        if (p / "meta").is_dir() or (p / "food-101" / "meta").is_dir():
            return "food"
        if (p / "val").is_dir() or any(_WNID.match(c.name) for c in p.iterdir() if c.is_dir()):
            return "imagenet"
    raise BuildError(f"{path}: cannot tell the input format; pass --format ({'|'.join(FORMATS)})")


# --- the builder ----------------------------------------------------------------------------------


def _as_ref(x: ImageRef | Sequence[str]) -> ImageRef:
    if isinstance(x, ImageRef):
        return x
    if len(x) not in (2, 3):
        raise ValueError(f"image entries are (image, label[, split]), got {x!r}")
    return ImageRef(*x)


def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def build_items(
    taxonomy: str | Path | Taxonomy,
    images: Iterable[ImageRef | Sequence[str]],
    strategy: str | DistractorStrategy = "random",
    n_choices: int = 4,
    seed: int = 0,
    *,
    lowercase: bool | None = None,
    on_unmatched: str = "error",
    limit: int | None = None,
    split: str = "test",
    report: BuildReport | None = None,
    matcher: LabelMatcher | None = None,
    batch_size: int = 256,
    validate: bool = True,
) -> Iterator[dict]:
    """Yield one annotation record per image (reference key order, `taxonomy` id last).

    images: (image, leaf label[, split]) tuples or :class:`ImageRef`; labels are matched to taxonomy
      keys by :class:`LabelMatcher`; the record's `label` is the taxonomy key (original case).
    strategy: a :data:`harness.data.distractors.STRATEGIES` name or a strategy object. Its optional
      `prepare(queries)` is called once per batch of `batch_size` images before `choose`.
    n_choices: options per level, truth included (fewer where a depth has fewer distinct names).
    seed: with the image path and depth, seeds each question's RNG (distractors and the truth's
      position), so records do not depend on input order or batching.
    lowercase: lower-case levels and choices (default: on for CUB, as the released files are).
    on_unmatched: "error" (raise BuildError naming file and line) or "skip" (count in `report`).
    split: the `split` value of images that carry none.
    validate: check every record with :func:`harness.data.items.parse_record`.
    """
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy)
    if not 2 <= n_choices <= MAX_CHOICES:
        raise ValueError(f"n_choices must be between 2 and {MAX_CHOICES}, got {n_choices}")
    if on_unmatched not in ("error", "skip"):
        raise ValueError(f"on_unmatched must be 'error' or 'skip', got {on_unmatched!r}")
    tax_id = tax.info.id if tax.info else tax.source.stem
    strat = make_strategy(strategy, tax) if isinstance(strategy, str) else strategy
    strat_name = getattr(strat, "name", type(strat).__name__)
    prepare = getattr(strat, "prepare", None)
    if lowercase is None:
        lowercase = tax_id == "cub"
    matcher = matcher or LabelMatcher(tax)
    pools = depth_pools(tax)
    pools_lower = [frozenset(x.lower() for x in p) for p in pools]
    k = n_choices - 1
    report = report if report is not None else BuildReport()

    def matched() -> Iterator[tuple[ImageRef, str]]:
        n = 0
        for x in images:
            if limit is not None and n >= limit:
                return
            ref = _as_ref(x)
            key = matcher.match(ref.label)
            if key is None:
                msg = (f"{ref.where or ref.image}: label {ref.label!r} matches no leaf of taxonomy {tax_id} "
                       f"(case-insensitive, '-'/'_' as spaces)")
                if on_unmatched == "error":
                    raise BuildError(msg)
                report.skip("unmatched label", 1, msg)
                continue
            n += 1
            yield ref, key

    for batch in _batched(matched(), batch_size):
        queries = [[LevelQuery(ref.image, key, tax.paths[key], d) for d in range(len(tax.paths[key]))]
                   for ref, key in batch]
        if prepare is not None:
            prepare([q for qs in queries for q in qs])
        for (ref, key), qs in zip(batch, queries):
            rec: dict = {"image": ref.image, "label": key, "split": ref.split or split}
            for q in qs:
                rng = rng_for(ref.image, q.depth, seed)
                wrong = list(strat.choose(q, pools[q.depth], k, rng))
                check_distractors(q, wrong, pools_lower[q.depth], k, strat_name)
                wrong.insert(rng.randrange(len(wrong) + 1), q.truth)
                truth = q.truth
                if lowercase:
                    truth, wrong = truth.lower(), [x.lower() for x in wrong]
                rec[f"level{q.depth + 1}"] = truth
                rec[f"choices_level{q.depth + 1}"] = wrong
            rec["taxonomy"] = tax_id
            if validate:
                parse_record(rec, ref.where or ref.image, 0)
            report.items += 1
            report.questions += len(qs)
            report.depths[len(qs)] += 1
            yield rec


def write_jsonl_atomic(records: Iterable[dict], out: str | Path) -> int:
    """Write records as JSONL to a temporary file next to `out`, then rename; returns the count.
    On any error the temporary file is removed and `out` is left untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with tmp.open("wb") as f:
            for rec in records:
                f.write(orjson.dumps(rec) + b"\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def image_refs(fmt: str, path: str | Path, taxonomy: Taxonomy, *, split: str | None = "test",
               imagenet_classes: str | Path | None = None, imagenet_wnids: str | Path | None = None,
               matcher: LabelMatcher | None = None, report: BuildReport | None = None) -> Iterator[ImageRef]:
    """The adapter for `fmt` (one of FORMATS) applied to `path`."""
    if fmt in ("jsonl", "csv"):
        return read_image_list(path, split, report)
    if fmt == "cub":
        return read_cub(path, split, report)
    if fmt == "inat":
        kingdom = taxonomy.info.root if taxonomy.info and taxonomy.info.root else None
        if kingdom is None and len(roots := taxonomy.names_by_depth()[0]) == 1:
            kingdom = roots[0]
        return read_inat(path, kingdom, split, report)
    matcher = matcher or LabelMatcher(taxonomy)
    if fmt == "imagenet":
        if imagenet_classes is None:
            raise BuildError("--format imagenet needs --imagenet-classes FILE (wnid -> class name mapping)")
        return read_imagenet(path, imagenet_classes, imagenet_wnids, matcher, split, report)
    if fmt == "food":
        return read_food(path, split, matcher, report)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
