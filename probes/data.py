"""Probing inputs: images with a split and labels per level, and text-probing sentences.

Image records are JSONL lines with `image`, `label`, `split` (the reference's CUB200_all.jsonl) and
optionally `id` and `levelN` fields (the annotation format). Without `levelN` the labels come from a
taxonomy: the label is matched to a leaf by the harness's label normaliser
(:func:`harness.data.imagelists.normalize_label`: lower case, "-" / "_" as spaces, as the reference
did), so "Black footed Albatross" finds "Black-footed Albatross".
Everything streams: memory does not grow with the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from harness.data.imagelists import normalize_label, read_image_rows
from harness.data.items import ItemError, parse_root_map, remap
from harness.data.taxonomy import Taxonomy, load_taxonomy
from harness.paths import data_dir

_LEVEL_KEY = re.compile(r"^level(\d+)$")


@dataclass(frozen=True, slots=True)
class ProbeItem:
    """One probing input. `group` is the unit of probe HCA (an image; in text probing the species).
    `level`: the only level this row is a feature for (text probing), or None (every level)."""

    id: str
    group: str
    split: str
    labels: tuple[str | None, ...]
    image: str | None = None
    text: str | None = None
    level: int | None = None
    line: int = 0

    def row(self) -> dict:
        """The index entry of this item in a feature store."""
        r = {"id": self.id, "group": self.group, "split": self.split, "labels": list(self.labels)}
        if self.level is not None:
            r["level"] = self.level
        if self.line:
            r["line"] = self.line
        return r


def leaf_index(tax: Taxonomy) -> dict[str, tuple[str, ...]]:
    """normalised leaf name -> path (keys and last path elements both match)."""
    idx: dict[str, tuple[str, ...]] = {}
    for key, path in tax.paths.items():
        idx.setdefault(normalize_label(key), path)
        idx.setdefault(normalize_label(path[-1]), path)
    return idx


def level_names(tax: Taxonomy | None, depth: int) -> list[str]:
    """Rank names of levels 1..depth (from the taxonomy's metadata), else "level N"."""
    if tax is not None and tax.info is not None:
        names = [tax.info.level_name(i) for i in range(depth)]
        if tax.info.ranks is not None:
            return names
    return [f"level {i + 1}" for i in range(depth)]


def read_image_items(
    path: str | Path,
    *,
    taxonomy: Taxonomy | None = None,
    root_map: list[str] | tuple[str, ...] = (),
    skip_unmatched: bool = False,
) -> Iterator[ProbeItem]:
    """Stream image items from a JSONL file; every bad line raises ItemError (file, line, field)."""
    path = Path(path)
    rm = parse_root_map(root_map)
    idx = leaf_index(taxonomy) if taxonomy is not None else None
    dups = duplicate_ids(path)
    seen: dict[str, int] = {}  # only the (few) duplicated ids
    for lineno, image, label, split, rec in read_image_rows(path, require_split=True):
        levels = sorted((int(m.group(1)), v) for k, v in rec.items() if (m := _LEVEL_KEY.match(k)))
        if levels:
            if [n for n, _ in levels] != list(range(1, len(levels) + 1)):
                raise ItemError(path, lineno, "level1", "levelN fields must be contiguous from 1")
            for n, v in levels:
                if v is not None and not isinstance(v, str):
                    raise ItemError(path, lineno, f"level{n}", "must be a string or null")
            labels = tuple(v for _, v in levels)
        elif idx is not None:
            found = idx.get(normalize_label(label))
            if found is None:
                if skip_unmatched:
                    continue
                raise ItemError(path, lineno, "label",
                                f"{label!r} is not a leaf of taxonomy {taxonomy.source.name} "
                                f"(compared as {normalize_label(label)!r})")
            labels = found
        else:
            raise ItemError(path, lineno, "level1", "no levelN fields: pass a taxonomy to label the levels")
        item_id = rec.get("id", image)
        if not isinstance(item_id, (str, int)):
            raise ItemError(path, lineno, "id", "must be a string or integer")
        item_id = str(item_id)
        if item_id in dups:
            k = seen.get(item_id, 0)
            seen[item_id] = k + 1
            if k:
                item_id = f"{item_id}#{k + 1}"
        yield ProbeItem(item_id, item_id, split, tuple(labels), image=remap(image, rm), line=lineno)


def _record_id(raw: bytes) -> str | None:
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    v = rec.get("id", rec.get("image"))
    return str(v) if isinstance(v, (str, int)) else None


def duplicate_ids(path: str | Path) -> set[str]:
    """Ids occurring more than once (they get a `#k` suffix from the second on, as harness items do).

    Two streaming passes with 8 bytes per record in between (a sorted array of id hashes), so memory
    stays flat at a million records instead of holding every id string."""
    from array import array

    import numpy as np

    def h(s: str) -> int:
        return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")

    hashes = array("Q")
    with Path(path).open("rb") as f:
        for raw in f:
            if raw.strip() and (i := _record_id(raw)) is not None:
                hashes.append(h(i))
    a = np.sort(np.frombuffer(hashes, dtype=np.uint64)) if hashes else np.empty(0, np.uint64)
    del hashes
    dup_hashes = set(a[1:][a[1:] == a[:-1]].tolist())
    if not dup_hashes:
        return set()
    out: set[str] = set()
    with Path(path).open("rb") as f:
        for raw in f:
            if raw.strip() and (i := _record_id(raw)) is not None and h(i) in dup_hashes:
                out.add(i)
    return out


def load_split_taxonomy(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A species -> path JSON file (the text-probing train/test taxonomies), validated."""
    return dict(load_taxonomy(Path(path)).paths)


def text_items(
    splits: dict[str, str | Path],
    sentence: str,
    names: list[str] | None = None,
    *,
    leaf: bool = True,
) -> Iterator[ProbeItem]:
    """One sentence per species and level, for each split's taxonomy file in the given order.

    `names`: rank names of levels 1..depth (a path longer than `names` uses "level N" for the rest).
    `leaf`: also produce the species level (the reference stopped before it)."""
    for split, file in splits.items():
        paths = load_split_taxonomy(file)
        for species, path in paths.items():
            depth = len(path) if leaf else len(path) - 1
            for i in range(depth):
                rank = names[i] if names and i < len(names) else f"level {i + 1}"
                text = sentence.format(species=species, rank=rank, label=path[i])
                yield ProbeItem(f"{species}|{i + 1}", species, split, tuple(path), text=text, level=i + 1)


def shipped_probing_file(name: str) -> Path:
    """A file of the shipped probing data (data/probing: CUB200_all.jsonl, *_taxonomy.json)."""
    try:
        base = data_dir("probing")
    except FileNotFoundError:
        base = Path(__file__).resolve().parents[1] / "data" / "probing"
    p = base / name
    if not p.is_file():
        raise FileNotFoundError(f"shipped probing file {name!r} not found in {base}")
    return p


def resolve_taxonomy(value: str | None) -> Taxonomy | None:
    """A taxonomy id or file, or None."""
    return load_taxonomy(value) if value else None
