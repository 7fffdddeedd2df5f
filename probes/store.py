"""Feature store: sharded float16 arrays (safetensors) with an index, written as it goes, resumable.

Layout of a store folder:
  manifest.json            settings (model, recipe, sites, pools, data hash, ...), dims, level names,
                           counts; `complete` once the input is exhausted
  shards/shard-00000.safetensors
                           one (rows, dim) tensor per feature key ("projector.mean", "llm.28.img_mean", ...);
                           metadata: `rows` (the index entries of its rows), `next` (input position
                           after its last input), `errors` (inputs of its range that failed)
  index.jsonl              every row: id, group, split, labels, [level], shard, offset (derived from
                           the shards; rebuilt on resume)
  errors.jsonl             inputs that could not be read (derived from the shards)

A shard is written to a temporary name and renamed, so a folder only ever holds whole shards. Resume
keeps the contiguous whole shards and restarts the input at the last one's `next`: with a deterministic
forward the resumed run writes byte-identical shards. Memory holds one shard buffer, whatever the
dataset size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

MANIFEST = "manifest.json"
SHARDS = "shards"
INDEX = "index.jsonl"
ERRORS = "errors.jsonl"
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _dump(obj) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def _read_meta(path: Path) -> dict:
    """A shard's `rows`, `next` and `errors` (one JSON metadata entry: safetensors writes several entries
    in hash-map order, which would make identical shards differ byte-wise)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return orjson.loads((f.metadata() or {}).get("probe", "{}"))


def _committed_shards(root: Path) -> list[Path]:
    """Whole shards 0..k-1, contiguous from 0 (a gap ends the list)."""
    out = []
    d = root / SHARDS
    k = 0
    while (p := d / shard_name(k)).is_file():
        out.append(p)
        k += 1
    return out


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass
class StoreWriter:
    """Buffer rows of features and write whole shards; `start()` returns the input position to resume at."""

    root: Path
    settings: dict
    shard_size: int = 1024
    store_dtype: str = "float16"
    extra: dict = field(default_factory=dict)  # manifest fields that may differ on resume (level names...)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.settings = orjson.loads(orjson.dumps(self.settings))  # JSON-normal (tuples -> lists) for comparison
        self.extra = orjson.loads(orjson.dumps(self.extra))
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype {self.store_dtype!r}: use one of {', '.join(STORE_DTYPES)}")
        self._np_dtype = STORE_DTYPES[self.store_dtype]
        self._bufs: dict[str, list[np.ndarray]] = {}
        self._rows: list[dict] = []
        self._errors: list[dict] = []
        self._n_shards = 0
        self.n_rows = 0
        self.n_errors = 0
        self.dims: dict[str, int] = {}
        self.next_input = 0

    # ------------------------------------------------------------------ open / resume
    def start(self) -> int:
        """Create or resume the store. Returns how many inputs are already done (skip them)."""
        (self.root / SHARDS).mkdir(parents=True, exist_ok=True)
        for tmp in (self.root / SHARDS).glob("*.tmp"):
            tmp.unlink()  # a shard being written when the last run stopped
        mpath = self.root / MANIFEST
        if mpath.exists():
            old = orjson.loads(mpath.read_bytes())
            diff = _diff(old.get("settings", {}), self.settings)
            if diff:
                raise ValueError(f"{mpath}: this store was made with other settings; use a new --out folder "
                                 f"(or the old settings). Differences: {'; '.join(diff)}")
            self.dims = dict(old.get("dims", {}))
        shards = _committed_shards(self.root)
        stray = sorted(set((self.root / SHARDS).glob("shard-*.safetensors")) - set(shards))
        for p in stray:  # shards after a gap cannot be trusted in order: redo them
            p.unlink()
        self._n_shards = len(shards)
        with (self.root / INDEX).open("wb") as idx, (self.root / ERRORS).open("wb") as err:
            for k, p in enumerate(shards):
                meta = _read_meta(p)
                rows = meta.get("rows", [])
                for j, r in enumerate(rows):
                    idx.write(orjson.dumps({**r, "shard": k, "offset": j}) + b"\n")
                errs = meta.get("errors", [])
                for e in errs:
                    err.write(orjson.dumps(e) + b"\n")
                self.n_rows += len(rows)
                self.n_errors += len(errs)
                self.next_input = int(meta.get("next", self.next_input))
        self._write_manifest(complete=False)
        return self.next_input

    # ------------------------------------------------------------------ writing
    def add(self, rows: list[dict], feats: dict[str, np.ndarray], next_input: int) -> None:
        """Add a batch: index rows and {key: (n, dim)} float32 arrays; `next_input` = position after it."""
        n = len(rows)
        for key, arr in feats.items():
            if arr.shape[0] != n:
                raise ValueError(f"feature {key}: {arr.shape[0]} rows for {n} items")
            d = int(arr.shape[1])
            if self.dims.setdefault(key, d) != d:
                raise ValueError(f"feature {key}: dimension {d}, earlier {self.dims[key]}")
            with np.errstate(over="ignore"):
                cast = arr.astype(self._np_dtype)
            if not np.isfinite(cast).all() and np.isfinite(arr).all():
                raise OverflowError(f"feature {key}: values beyond the {self.store_dtype} range "
                                    f"(max |x| = {float(np.abs(arr).max()):.4g}); use --store-dtype float32")
            self._bufs.setdefault(key, []).append(cast)
        self._rows.extend(rows)
        self.next_input = next_input
        if len(self._rows) >= self.shard_size:
            self.commit()

    def add_error(self, position: int, item_id: str, message: str, next_input: int) -> None:
        self._errors.append({"position": position, "id": item_id, "error": message})
        self.next_input = next_input

    def commit(self) -> None:
        """Write the buffered rows as the next shard (also when only errors were buffered)."""
        if not self._rows and not self._errors:
            return
        from safetensors.numpy import save_file

        k = self._n_shards
        final = self.root / SHARDS / shard_name(k)
        tmp = final.with_suffix(".tmp")
        tensors = {key: np.ascontiguousarray(np.concatenate(parts)) for key, parts in sorted(self._bufs.items())}
        if not self._rows:  # an error-only range still records its `next`
            tensors = {key: np.empty((0, d), self._np_dtype) for key, d in sorted(self.dims.items())}
        meta = {"probe": orjson.dumps({"rows": self._rows, "next": self.next_input, "errors": self._errors}).decode()}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, final)
        with (self.root / INDEX).open("ab") as idx:
            idx.write(b"".join(orjson.dumps({**r, "shard": k, "offset": j}) + b"\n" for j, r in enumerate(self._rows)))
        if self._errors:
            with (self.root / ERRORS).open("ab") as err:
                err.write(b"".join(orjson.dumps(e) + b"\n" for e in self._errors))
        self._n_shards += 1
        self.n_rows += len(self._rows)
        self.n_errors += len(self._errors)
        self._bufs, self._rows, self._errors = {}, [], []
        self._write_manifest(complete=False)

    def finish(self, *, complete: bool = True) -> None:
        """Write the last (partial) shard and the manifest; `complete`: the input was exhausted."""
        self.commit()
        self._write_manifest(complete=complete)

    def _write_manifest(self, *, complete: bool) -> None:
        m = {
            "format": "harness-probe-features/1",
            "settings": self.settings,
            **self.extra,
            "dims": self.dims,
            "store_dtype": self.store_dtype,
            "n_rows": self.n_rows,
            "n_errors": self.n_errors,
            "n_shards": self._n_shards,
            "next_input": self.next_input,
            "complete": complete,
        }
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_bytes(_dump(m))
        os.replace(tmp, self.root / MANIFEST)


class FeatureStore:
    """Read a store: the manifest, the index rows, and any feature as one float32 array."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.root}: not a feature store (no {MANIFEST}; run `harness probe extract`)")
        self.manifest = orjson.loads(mpath.read_bytes())
        self.shards = _committed_shards(self.root)

    @property
    def keys(self) -> list[str]:
        return sorted(self.manifest.get("dims", {}))

    @property
    def level_names(self) -> list[str]:
        return list(self.manifest.get("level_names", []))

    def rows(self) -> Iterator[dict]:
        """Index rows in store order (read from the shards themselves, the source of truth)."""
        for p in self.shards:
            yield from _read_meta(p).get("rows", [])

    def load(self, key: str, dtype=np.float32) -> np.ndarray:
        """All rows of one feature, in store order."""
        from safetensors import safe_open

        if key not in self.manifest.get("dims", {}):
            raise KeyError(f"{self.root}: no feature {key!r}; have {', '.join(self.keys) or 'none'}")
        parts = []
        for p in self.shards:
            with safe_open(str(p), framework="np") as f:
                if key in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                    parts.append(f.get_tensor(key).astype(dtype, copy=False))
        if not parts:
            return np.empty((0, self.manifest["dims"][key]), dtype)
        return np.concatenate(parts)

    def match(self, patterns: Iterable[str]) -> list[str]:
        """Feature keys matching shell-style patterns ("llm.*.mean"), in store key order."""
        import fnmatch

        out: list[str] = []
        for pat in patterns:
            hits = [k for k in self.keys if fnmatch.fnmatchcase(k, pat)]
            if not hits:
                raise KeyError(f"{self.root}: no feature matches {pat!r}; have {', '.join(self.keys)}")
            out.extend(h for h in _natural(hits) if h not in out)
        return out


def _natural(keys: list[str]) -> list[str]:
    import re

    return sorted(keys, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
