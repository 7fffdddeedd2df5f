"""Benchmark items (one image, all its levels) and the annotation JSONL reader.

The reader accepts the reference annotation format as is (`image`, `label`, `levelN`,
`choices_levelN`, optional `split`, `id`, `taxonomy`) and validates every line, naming file, line
and field in each error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from harness.data.taxonomy import ROOT_NAMES

MAX_CHOICES = 26  # letters A..Z
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(slots=True)  # not frozen: built four times an item on the hot path (frozen costs ~6x)
class Level:
    """One level of an item: its number N (from `levelN`), truth and options in file order."""

    n: int
    truth: str | None
    choices: tuple[str, ...]
    root: bool = False  # the taxonomy root (one value for the whole taxonomy): asked, never scored


@dataclass(slots=True)
class Item:
    """One image with its leaf label and every level's truth and choices."""

    id: str
    image: str  # path after --image-root-map
    label: str
    levels: tuple[Level, ...]
    line: int = 0  # 1-based line in the source file (for messages)
    taxonomy: str | None = None
    split: str | None = None

    @property
    def leaf(self) -> Level:
        return self.levels[-1]


class ItemError(ValueError):
    """A bad input line: carries file, line and field so the message points at the problem."""

    def __init__(self, file: str | Path, line: int, field: str | None, message: str):
        self.file, self.line, self.field = str(file), line, field
        where = f"{file}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


BOM = b"\xef\xbb\xbf"


@dataclass
class ReadReport:
    """What a non-strict read skipped, and why."""

    errors: list[ItemError] = field(default_factory=list)
    n_read: int = 0
    duplicates: int = 0  # items whose id (image) appeared before: asked again as `id#k`
    first_duplicate: str | None = None  # "file:line: id" of the first one

    def __bool__(self) -> bool:
        return bool(self.errors)


def parse_root_map(specs: Iterable[str]) -> list[tuple[str, str]]:
    """`OLD=NEW` strings -> prefix pairs, longest prefix first."""
    out = []
    for s in specs:
        if "=" not in s:
            raise ValueError(f"--image-root-map expects OLD=NEW, got {s!r}")
        old, new = s.split("=", 1)
        out.append((old, new))
    return sorted(out, key=lambda p: -len(p[0]))


def remap(path: str, root_map: list[tuple[str, str]]) -> str:
    for old, new in root_map:
        if path.startswith(old):
            return new + path[len(old):]
    return path


def _is_root(n: int, truth: str | None, choices: tuple[str, ...]) -> bool:
    return n == 1 and truth is not None and (len(choices) == 1 or truth.lower() in ROOT_NAMES)


def parse_record(rec: object, file: str | Path, line: int, root_map: list[tuple[str, str]] = ()) -> Item:
    """Validate one decoded JSON record and build an Item (raises ItemError)."""
    if not isinstance(rec, dict):
        raise ItemError(file, line, None, f"expected a JSON object, got {type(rec).__name__}")
    for key in ("image", "label"):
        if key not in rec:
            raise ItemError(file, line, key, "missing field")
        if not isinstance(rec[key], str) or not rec[key]:
            raise ItemError(file, line, key, "must be a non-empty string")
    truths: dict[int, object] = {}
    choices: dict[int, object] = {}
    for k, v in rec.items():  # levelN / choices_levelN (string tests: a regex a key cost a third of the read)
        if k.startswith("level"):
            if (d := k[5:]).isdigit():
                truths[int(d)] = v
        elif k.startswith("choices_level") and (d := k[13:]).isdigit():
            choices[int(d)] = v
    if not truths and not choices:
        raise ItemError(file, line, "level1", "no levelN / choices_levelN fields")
    if truths.keys() != choices.keys():
        for n in sorted(set(truths) | set(choices)):
            if n not in truths:
                raise ItemError(file, line, f"level{n}", f"missing field (choices_level{n} is present)")
            if n not in choices:
                raise ItemError(file, line, f"choices_level{n}", f"missing field (level{n} is present)")
    numbers = sorted(truths)  # numeric order (the reference sometimes sorts lexicographically)
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        raise ItemError(file, line, f"level{missing[0]}", f"levels must be contiguous from 1; have {numbers}")
    levels = []
    for n in numbers:
        t, c = truths[n], choices[n]
        fname = "choices_level" + str(n)
        if t is not None and not isinstance(t, str):
            raise ItemError(file, line, f"level{n}", f"must be a string or null, got {type(t).__name__}")
        if type(c) is not list:
            raise ItemError(file, line, fname, "must be a list of strings")
        try:  # decoded JSON: only strings have .lower()
            lowered = {x.lower() for x in c}
        except (AttributeError, TypeError):
            raise ItemError(file, line, fname, "must be a list of strings") from None
        cs = tuple(c)
        if len(lowered) != len(cs):
            dup = next(x for x in cs if sum(y.lower() == x.lower() for y in cs) > 1)
            raise ItemError(file, line, fname, f"duplicate choice {dup!r}")
        if len(cs) > MAX_CHOICES:
            raise ItemError(file, line, fname, f"{len(cs)} choices; at most {MAX_CHOICES} (letters A-Z)")
        root = _is_root(n, t, cs)
        if len(cs) < 2 and not root:
            raise ItemError(file, line, fname, f"{len(cs)} choice(s); at least 2 needed")
        if t is not None and t.lower() not in lowered:
            raise ItemError(file, line, fname, f"truth {t!r} (level{n}) is not among the choices {list(cs)}")
        levels.append(Level(n, t, cs, root))
    image = rec["image"]
    item_id = rec.get("id")
    if item_id is not None and not isinstance(item_id, (str, int)):
        raise ItemError(file, line, "id", "must be a string or integer")
    tax = rec.get("taxonomy")
    split = rec.get("split")
    return Item(
        id=str(item_id) if item_id is not None else image,
        image=remap(image, root_map),
        label=rec["label"],
        levels=tuple(levels),
        line=line,
        taxonomy=tax if isinstance(tax, str) else None,
        split=split if isinstance(split, str) else None,
    )


def load_json_line(raw: bytes, path: str | Path, lineno: int, *, objects: bool = True):
    """Decode one JSONL line; ItemError naming file and line for invalid JSON (or, with `objects`,
    for anything but a JSON object)."""
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ItemError(path, lineno, None, f"invalid JSON: {e}") from None
    if objects and not isinstance(rec, dict):
        raise ItemError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
    return rec


def iter_jsonl(path: str | Path, *, objects: bool = True) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) for every non-blank line of a JSONL file, streamed."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            if raw.strip():
                yield lineno, load_json_line(raw, path, lineno, objects=objects)


def detect_taxonomy(path: str | Path, given: str | None = None) -> str:
    """The taxonomy of an items file: `given`, else the items' `taxonomy` field, else inferred from
    the labels of the first 500 items."""
    from itertools import islice

    from harness.data.taxonomy import TAXONOMIES, infer_taxonomy

    if given:
        if given not in TAXONOMIES:
            raise ValueError(f"unknown taxonomy {given!r}; known: {', '.join(TAXONOMIES)}")
        return given
    report = ReadReport()
    items = list(islice(read_items(path, strict=False, report=report), 500))
    if not items:
        if report.errors:
            raise ValueError(f"{path}: no valid item among the first lines; first error: {report.errors[0]}")
        raise ValueError(f"{path}: no items (the file is empty)")
    declared = {i.taxonomy for i in items if i.taxonomy}
    if len(declared) == 1:
        return declared.pop()
    guess = infer_taxonomy([i.label for i in items], [i.levels[0].truth or "" for i in items])
    if guess is None:
        raise ValueError(f"{path}: cannot tell the taxonomy from the labels; pass --taxonomy")
    return guess


def read_items(
    path: str | Path,
    *,
    root_map: Iterable[str] | list[tuple[str, str]] = (),
    strict: bool = True,
    report: ReadReport | None = None,
) -> Iterator[Item]:
    """Stream items from an annotation JSONL file.

    strict: the first bad line raises ItemError (items already yielded stay valid).
    Otherwise bad lines are skipped and recorded in `report`.
    Duplicate ids (the same image twice) get a `#k` suffix so question ids stay unique.
    """
    # (old, new) pairs from a caller are sorted as parse_root_map sorts them: the longest prefix wins
    rm = sorted(root_map, key=lambda p: -len(p[0])) \
        if (isinstance(root_map, list) and root_map and isinstance(root_map[0], tuple)) \
        else parse_root_map(root_map)  # type: ignore[arg-type]
    seen: dict[bytes, int] = {}  # 16-byte digests: a million ids cost tens of MB less than the strings
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)  # a UTF-8 byte-order mark (files saved by some editors)
            if not raw.strip():
                continue
            try:
                item = parse_record(load_json_line(raw, path, lineno, objects=False), path, lineno, rm)
            except ItemError as e:
                if strict:
                    raise
                if report is not None:
                    report.errors.append(e)
                continue
            h = hashlib.blake2b(item.id.encode(), digest_size=16).digest()
            k = seen.get(h, 0)
            seen[h] = k + 1
            if k:
                if report is not None:
                    report.duplicates += 1
                    if report.first_duplicate is None:
                        report.first_duplicate = f"{path}:{lineno}: {item.id}"
                item = Item(f"{item.id}#{k + 1}", item.image, item.label, item.levels, item.line,
                            item.taxonomy, item.split)
            if report is not None:
                report.n_read += 1
            yield item


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (for run manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
