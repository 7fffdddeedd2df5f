"""Image lists (one image a line with its leaf label and split) and the one label normaliser.

Three consumers read the same shape of file: `harness build` (JSONL or CSV lists of new images), the
classification studies (`data/classification/*.jsonl`) and the probes (`data/probing/CUB200_all.jsonl`).
They all go through :func:`read_image_rows`, so a bad line gets the same message everywhere
(``file:line: field 'label': missing field``), and every comparison of a dataset's label with a
taxonomy name goes through :func:`normalize_label` (directly, or through :class:`LabelMatcher`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from harness.data.items import ItemError, iter_jsonl
from harness.data.taxonomy import Taxonomy

#: Known misspellings in dataset class names: taxonomy id -> normalized label -> taxonomy key.
LABEL_ALIASES: dict[str, dict[str, str]] = {
    "cub": {"artic tern": "Arctic Tern"},  # CUB folder 141.Artic_Tern
}

_WS = re.compile(r"\s+")
NUM_PREFIX = re.compile(r"^\d+\.")  # CUB class folders: "001.Black_footed_Albatross"
_APOS = re.compile(r"['\u2019`]")


def normalize_label(s: str) -> str:
    """Lower-case, `-`/`_` read as spaces, whitespace collapsed and stripped: "Black_footed-Albatross"
    and "black footed albatross" compare equal."""
    return _WS.sub(" ", s.lower().replace("-", " ").replace("_", " ")).strip()


class ImageRow(NamedTuple):
    """One line of an image list: `image` and `label` as written (non-empty), `split` or None, and the
    whole record for the fields a reader adds (`id`, `levelN`, `label_idx`, ...)."""

    line: int
    image: str
    label: str
    split: str | None
    record: dict


def _field(path: Path, line: int, rec: dict, key: str, required: bool) -> str | None:
    v = rec.get(key)
    if v is None:
        if required:
            raise ItemError(path, line, key, "missing field")
        return None
    if not isinstance(v, str) or (required and not v.strip()):
        raise ItemError(path, line, key, "must be a non-empty string" if required else "must be a string")
    return v


def read_image_rows(path: str | Path, *, require_split: bool = False) -> Iterator[ImageRow]:
    """Stream the rows of a JSONL list (one object a line; annotation files work as is) or, for a
    `.csv` file, a CSV list with a header naming `image,label`[,`split`]. Blank lines are skipped;
    every bad line raises :class:`ItemError` naming file, line and field. An empty CSV split cell
    reads as None."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"image", "label"} - set(reader.fieldnames or ())
            if missing:
                raise ItemError(path, 1, min(missing), f"CSV header must name image,label; got {reader.fieldnames}")
            for rec in reader:
                if rec.get("split") == "":
                    rec["split"] = None
                yield _row(path, reader.line_num, rec, require_split)
        return
    for line, rec in iter_jsonl(path):
        yield _row(path, line, rec, require_split)  # type: ignore[arg-type]


def _row(path: Path, line: int, rec: dict, require_split: bool) -> ImageRow:
    image = _field(path, line, rec, "image", True)
    label = _field(path, line, rec, "label", True)
    split = _field(path, line, rec, "split", require_split)
    return ImageRow(line, image, label, split, rec)  # type: ignore[arg-type]


# --- matching labels to taxonomy keys ---------------------------------------------------------------


def _loose_variants(norm: str) -> set[str]:
    """Apostrophe-tolerant forms: CUB folders drop "'s" ("Brewer_Sparrow" for "Brewer's Sparrow") or
    just the apostrophe ("Forsters_Tern" for "Forster's Tern")."""
    return {_APOS.sub("", norm), _APOS.sub("", re.sub(r"['\u2019`]s\b", "", norm))}


class LabelMatcher:
    """Maps a dataset's leaf label to a taxonomy key: exact, then normalized (:func:`normalize_label`),
    then with a numeric class prefix removed, then apostrophe-tolerant, then known aliases. Ambiguous
    normalized forms match nothing."""

    def __init__(self, taxonomy: Taxonomy, aliases: dict[str, str] | None = None):
        self.taxonomy = taxonomy
        if aliases is None:
            aliases = LABEL_ALIASES.get(taxonomy.info.id, {}) if taxonomy.info else {}
        self._exact = {k: k for k in taxonomy.paths}
        self._norm: dict[str, str | None] = {}
        self._loose: dict[str, str | None] = {}
        for key, path in taxonomy.paths.items():
            for spelling in {key, path[-1]}:
                n = normalize_label(spelling)
                self._add(self._norm, n, key)
                for v in _loose_variants(n):
                    self._add(self._loose, v, key)
        self._aliases = {normalize_label(a): k for a, k in aliases.items() if k in taxonomy.paths}
        self._cache: dict[str, str | None] = {}

    @staticmethod
    def _add(table: dict[str, str | None], form: str, key: str) -> None:
        if table.get(form, key) != key:
            table[form] = None  # two keys share the form: ambiguous
        else:
            table[form] = key

    def match(self, label: str) -> str | None:
        if label in self._cache:
            return self._cache[label]
        key = self._exact.get(label)
        if key is None:
            n = normalize_label(label)
            for form in (n, normalize_label(NUM_PREFIX.sub("", label.strip()))):
                key = self._norm.get(form) or self._aliases.get(form)
                if key is None:
                    hits = {self._loose.get(v) for v in _loose_variants(form)} - {None}
                    key = hits.pop() if len(hits) == 1 else None
                if key is not None:
                    break
        self._cache[label] = key
        return key
