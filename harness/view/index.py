"""The viewer's index of a run folder: one SQLite file kept beside the results, built once, rebuilt when
the results grow (or a shard appears), and queried page by page so a million-question run opens as
fast as a small one and the server's memory stays bounded.

What the index holds is *where* each question is (results file, byte offset) plus the few columns the
filters need (item, level, truth, prediction, status); the full line is read back from the results
file for the rows of the page shown. The run's metrics are the ones of
:func:`harness.runs.report.summarize_path` (what `harness report --json` prints), computed once per
build and cached in the index with the state of the files they were computed from.

Status of a question: right, wrong, unparsed (answered, but no option could be read from it) or
failed (the request failed: `error`). A binary statement is right when its yes/no matches whether its
option is the truth. Classification lines: the prediction equals the label (generation runs: the label
is named in it, the reference's substring rule; ImageWikiQA: the parsed letter is the answer).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

INDEX_NAME = "view-index.sqlite"
SCHEMA = 4  # bump when the tables change: older index files are rebuilt
STATUSES = ("right", "wrong", "unparsed", "failed")
RIGHT, WRONG, UNPARSED, FAILED = range(4)


def results_files(folder: Path) -> list[Path]:
    """Every results file of a run folder: results.jsonl and results.shard-I-of-N.jsonl, sorted."""
    return sorted(p for p in folder.glob("results*.jsonl") if p.is_file())


def files_state(folder: Path) -> list[list]:
    """(name, size, mtime_ns) of each results file and of run.json: the index is stale when it changes."""
    out = []
    for p in [*results_files(folder), folder / "run.json"]:
        with contextlib.suppress(OSError):
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def read_manifest(folder: Path) -> dict:
    p = folder / "run.json"
    if not p.is_file():
        return {}
    try:
        m = orjson.loads(p.read_bytes())
    except orjson.JSONDecodeError:
        return {}
    return m if isinstance(m, dict) else {}


def _kind(manifest: dict) -> str:
    kind = str(manifest.get("kind") or "hierarchy")
    return {"generation": "classify"}.get(kind, kind)


def _cache_path(folder: Path) -> Path:
    """Where the index lives when the run folder is not writable (a shared, read-only results store)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "harness" / "view"
    h = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return base / f"{folder.name}-{h}.sqlite"


def index_path(folder: Path) -> Path:
    """The index file of a run folder: beside the results, or in the user's cache when the folder is read-only."""
    p = folder / INDEX_NAME
    if p.exists() or os.access(folder, os.W_OK):
        return p
    return _cache_path(folder)


# ------------------------------------------------------------------ status of a line

def _lower(s) -> str | None:
    return s.lower() if isinstance(s, str) else None


def line_status(rec: dict, kind: str, substring=None) -> tuple[int, str | None]:
    """(status, the prediction shown) of one result line."""
    if rec.get("error") is not None:
        return FAILED, None
    truth = rec.get("truth")
    if "option" in rec and rec.get("option") is not None:  # binary statement
        yes = rec.get("yes")
        if yes is None or yes < 0:
            return UNPARSED, None
        choices = rec.get("choices") or {}
        is_truth = _lower(choices.get(rec["option"])) == _lower(truth)
        return (RIGHT if (yes == 1) == is_truth else WRONG), "Yes" if yes == 1 else "No"
    pred = rec.get("prediction")
    if kind == "wikiqa":
        letter = rec.get("letter")
        if letter is None:
            return (UNPARSED if rec.get("pred") is not None else FAILED), rec.get("pred")
        return (RIGHT if letter == truth else WRONG), rec.get("pred")
    if pred is None:
        return UNPARSED, None
    if kind == "classify" and substring is not None:
        return (RIGHT if substring(pred, str(rec.get("label") or truth)) else WRONG), pred
    return (RIGHT if _lower(pred) == _lower(truth) else WRONG), pred


# ------------------------------------------------------------------ building

_TABLES = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE q(id INTEGER PRIMARY KEY, qid TEXT NOT NULL, item_id INTEGER, level INTEGER,
               opt TEXT, truth TEXT, pred TEXT, status INTEGER, scored INTEGER, auto INTEGER,
               file INTEGER, off INTEGER, lraw INTEGER DEFAULT 0);
CREATE TABLE items(id INTEGER PRIMARY KEY, item TEXT UNIQUE, leaf_ok INTEGER, anc_ok INTEGER, lraw INTEGER,
                   data_off INTEGER, image TEXT);
CREATE TABLE nodes(level INTEGER, truth TEXT, parent TEXT, n INTEGER, right INTEGER, scored INTEGER);
"""


def _scan(files: list[Path], kind: str) -> Iterator[tuple]:
    """(qid, item, level, opt, truth, pred, status, scored, auto, file, offset) of every parseable line."""
    substring = None
    if kind == "classify":
        from harness.classification.scoring import substring
    for fi, path in enumerate(files):
        with path.open("rb") as f:
            off = 0
            for line in f:
                start, off = off, off + len(line)
                if not line.endswith(b"\n"):
                    break  # a torn last line (a writer mid-line): not a result yet
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or "qid" not in rec:
                    continue
                status, pred = line_status(rec, kind, substring)
                item = rec.get("item")
                item = str(item) if item is not None else None
                level = rec.get("level")
                opt = rec.get("option")
                truth = rec.get("truth")
                yield (str(rec["qid"]), item, level, opt, None if truth is None else str(truth),
                       None if pred is None else str(pred), status, int(bool(rec.get("scored", True))),
                       int(bool(rec.get("auto", False))), fi, start)


def _data_path(manifest: dict, folder: Path) -> Path | None:
    for d in ((manifest.get("spec") or {}).get("data"), (manifest.get("settings") or {}).get("data")):
        if not d:
            continue
        for p in (Path(d), folder / d, folder.parent / d):
            if p.is_file():
                return p
    return None


def root_map(manifest: dict) -> list[tuple[str, str]]:
    from harness.data.items import parse_root_map

    try:
        return parse_root_map((manifest.get("spec") or {}).get("image_root_map") or [])
    except ValueError:
        return []


def build(folder: Path, out: Path | None = None) -> Path:
    """Build the index of a run folder (written to a temporary file, then moved into place)."""
    from harness.data.items import remap

    folder = Path(folder)
    out = out or index_path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = files_state(folder)
    manifest = read_manifest(folder)
    kind = _kind(manifest)
    files = results_files(folder)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    t0 = time.perf_counter()
    db = sqlite3.connect(tmp)
    try:
        db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=MEMORY;"
                         "PRAGMA cache_size=-65536;" + _TABLES)
        # nodes: (level, truth) -> parent truth (the truth one level up in the same item), seen in file order
        edges: Counter = Counter()
        cur_item, cur_levels = None, {}

        def flush_item():
            for lv, t in cur_levels.items():
                if isinstance(lv, int) and lv - 1 in cur_levels:
                    edges[(lv, t, cur_levels[lv - 1])] += 1

        item_ids: dict[str | None, int] = {}  # one integer per item (its text is stored once, in items)

        def rows():
            nonlocal cur_item, cur_levels
            for r in _scan(files, kind):
                item = r[1]
                if item != cur_item:
                    flush_item()
                    cur_item, cur_levels = item, {}
                if r[4] is not None:
                    cur_levels[r[2]] = r[4]
                iid = item_ids.get(item)
                if iid is None:
                    iid = item_ids[item] = len(item_ids) + 1
                yield (r[0], iid, *r[2:])
            flush_item()

        # last line of a qid wins (--retry-errors appends): insert all, then drop the superseded lines
        db.executemany("INSERT INTO q(qid,item_id,level,opt,truth,pred,status,scored,auto,file,off) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows())
        db.executemany("INSERT INTO items(id, item, lraw) VALUES (?, ?, 0)",
                       ((i, it) for it, i in item_ids.items()))
        item_ids.clear()
        db.execute("CREATE INDEX q_qid ON q(qid, id)")
        db.execute("DELETE FROM q WHERE id IN (SELECT a.id FROM q a JOIN q b ON a.qid = b.qid AND b.id > a.id)")
        db.executescript("""
            CREATE INDEX q_status ON q(status);
            CREATE INDEX q_level ON q(level, status);
            CREATE INDEX q_truth ON q(truth, level);
            CREATE INDEX q_item ON q(item_id, level);
        """)
        # per item: the leaf (deepest scored level) right, every scored ancestor right
        db.execute("""
            UPDATE items SET leaf_ok = s.leaf_ok, anc_ok = s.anc_ok FROM (
              SELECT item_id, MAX(CASE WHEN r = 1 THEN ok END) AS leaf_ok,
                     MIN(CASE WHEN r > 1 THEN ok ELSE 1 END) AS anc_ok FROM (
                SELECT item_id, status = 0 AS ok,
                       ROW_NUMBER() OVER (PARTITION BY item_id ORDER BY level DESC) AS r
                FROM q WHERE scored = 1 AND opt IS NULL AND truth IS NOT NULL AND level IS NOT NULL)
              GROUP BY item_id) AS s
            WHERE items.id = s.item_id""")
        db.execute("UPDATE items SET lraw = 1 WHERE leaf_ok = 1 AND anc_ok = 0")
        db.execute("UPDATE q SET lraw = 1 WHERE item_id IN (SELECT id FROM items WHERE lraw = 1)")
        db.execute("CREATE INDEX q_lraw ON q(lraw) WHERE lraw = 1")
        # accuracy per taxonomy node: the questions whose truth is that node
        parent_of: dict[tuple, str] = {}
        for (lv, t, p), _ in sorted(edges.items(), key=lambda kv: -kv[1]):
            parent_of.setdefault((lv, t), p)  # the most frequent parent (a consistent taxonomy has one)
        nodes = db.execute("SELECT level, truth, COUNT(*), SUM(status = 0), MAX(scored) FROM q "
                           "WHERE truth IS NOT NULL GROUP BY level, truth").fetchall()
        db.executemany("INSERT INTO nodes VALUES (?,?,?,?,?,?)",
                       [(lv, t, parent_of.get((lv, t)), n, r, s) for lv, t, n, r, s in nodes])
        # where each item's line is in the items file (to render its questions) and its image
        rmap = root_map(manifest)
        data = _data_path(manifest, folder)
        if data is not None and kind == "hierarchy":
            _locate_items(db, data, rmap)
        if rmap:
            todo = db.execute("SELECT item FROM items WHERE image IS NULL").fetchall()
            db.executemany("UPDATE items SET image = ? WHERE item = ?", [(remap(i, rmap), i) for (i,) in todo])
        else:
            db.execute("UPDATE items SET image = item WHERE image IS NULL")
        build_s = time.perf_counter() - t0
        from harness.runs.report import summarize_path

        t1 = time.perf_counter()
        try:
            summary = summarize_path(folder)
        except (ValueError, FileNotFoundError, KeyError) as e:
            summary = {"kind": kind, "error": str(e)}
        counts = dict(db.execute("SELECT status, COUNT(*) FROM q GROUP BY status").fetchall())
        meta = {
            "schema": SCHEMA, "state": state, "kind": kind, "summary": summary,
            "files": [p.name for p in files], "data": str(data) if data else None,
            "counts": {STATUSES[s]: counts.get(s, 0) for s in range(4)},
            "n_lines": db.execute("SELECT COUNT(*) FROM q").fetchone()[0],
            "build_seconds": build_s, "summary_seconds": time.perf_counter() - t1,
        }
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, orjson.dumps(v).decode()) for k, v in meta.items()])
        db.commit()
        db.execute("ANALYZE")
        db.commit()
    except BaseException:
        db.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    db.close()
    os.replace(tmp, out)
    return out


def _locate_items(db: sqlite3.Connection, data: Path, rmap: list[tuple[str, str]]) -> None:
    from harness.data.items import remap

    known = db.execute
    found: list[tuple] = []
    with data.open("rb") as f:
        off = 0
        for line in f:
            start, off = off, off + len(line)
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                continue
            iid = rec.get("id")
            iid = str(iid) if iid is not None else rec["image"]
            if known("SELECT 1 FROM items WHERE item = ?", (iid,)).fetchone():
                found.append((start, remap(rec["image"], rmap), iid))
            if len(found) >= 10000:
                db.executemany("UPDATE items SET data_off = ?, image = ? WHERE item = ?", found)
                found.clear()
    db.executemany("UPDATE items SET data_off = ?, image = ? WHERE item = ?", found)


# ------------------------------------------------------------------ querying

@dataclass
class Filters:
    """What the Questions page asks for (every field optional)."""

    level: int | None = None
    status: str | None = None  # right / wrong / unparsed / failed
    lraw: bool = False  # the item's leaf is right and an ancestor wrong
    truth: str | None = None
    item: str | None = None
    other: RunIndex | None = None  # with `disagree`: the questions this run and `other` answer differently
    disagree: bool = False
    extra: dict = field(default_factory=dict)


class RunIndex:
    """A built index, opened read-only (one connection per thread: sqlite objects stay in their thread)."""

    def __init__(self, folder: str | Path, *, rebuild: bool = False):
        self.folder = Path(folder)
        self.path = index_path(self.folder)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._checked = 0.0
        self.ensure(force=rebuild)

    # -- freshness
    def _read_meta(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                return {k: orjson.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        except sqlite3.Error:
            return None

    def stale(self) -> bool:
        m = self._read_meta(self.path)
        return m is None or m.get("schema") != SCHEMA or m.get("state") != files_state(self.folder)

    def ensure(self, force: bool = False, every: float = 0.0) -> bool:
        """Rebuild when the results changed (checked at most once every `every` seconds). True if rebuilt."""
        now = time.monotonic()
        if not force and every and now - self._checked < every:
            return False
        with self._lock:
            self._checked = now
            if not force and not self.stale():
                if not hasattr(self, "meta"):
                    self.meta = self._read_meta(self.path) or {}
                return False
            if not results_files(self.folder):
                raise FileNotFoundError(f"{self.folder}: no results.jsonl in this folder")
            build(self.folder, self.path)
            self.meta = self._read_meta(self.path) or {}
            self._local = threading.local()  # connections to the replaced file are dropped
            return True

    @property
    def db(self) -> sqlite3.Connection:
        c = getattr(self._local, "db", None)
        if c is None:
            c = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            c.execute("PRAGMA cache_size=-16384")  # 16 MB page cache a connection: bounded memory
            self._local.db = c
        return c

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "hierarchy")

    @property
    def summary(self) -> dict:
        return self.meta.get("summary") or {}

    # -- questions
    def _where(self, f: Filters) -> tuple[str, list, str]:
        cond, args, join = [], [], ""
        if f.level is not None:
            cond.append("q.level = ?")
            args.append(f.level)
        if f.status:
            cond.append("q.status = ?")
            args.append(STATUSES.index(f.status))
        if f.truth is not None:
            cond.append("q.truth = ?")
            args.append(f.truth)
        if f.item is not None:
            cond.append("q.item_id = (SELECT id FROM items WHERE item = ?)")
            args.append(f.item)
        if f.lraw:
            cond.append("q.lraw = 1")
        if f.other is not None and f.disagree:
            join = (" JOIN items i ON i.id = q.item_id JOIN other.items oi ON oi.item = i.item"
                    " JOIN other.q o ON o.item_id = oi.id AND o.level IS q.level AND o.opt IS q.opt")
            cond.append("(o.status != q.status OR COALESCE(LOWER(o.pred), '') != COALESCE(LOWER(q.pred), ''))")
        return (" WHERE " + " AND ".join(cond)) if cond else "", args, join

    @contextlib.contextmanager
    def _attached(self, other: RunIndex | None):
        if other is None:
            yield self.db
            return
        db = self.db
        db.execute("ATTACH DATABASE ? AS other", (f"file:{other.path}?mode=ro",))
        try:
            yield db
        finally:
            db.execute("DETACH DATABASE other")

    def count(self, f: Filters) -> int:
        where, args, join = self._where(f)
        with self._attached(f.other if f.disagree else None) as db:
            return db.execute(f"SELECT COUNT(*) FROM q{join}{where}", args).fetchone()[0]

    def page(self, f: Filters, page: int = 0, per: int = 25) -> list[dict]:
        """The result lines of one page (file order), each with its index columns under `_`."""
        where, args, join = self._where(f)
        sql = (f"SELECT q.id, q.file, q.off, q.status, q.pred FROM q{join}{where} ORDER BY q.id "
               "LIMIT ? OFFSET ?")
        with self._attached(f.other if f.disagree else None) as db:
            rows = db.execute(sql, [*args, per, page * per]).fetchall()
        return [self._line(file, off) | {"_": {"id": i, "status": STATUSES[st], "shown": pred}}
                for i, file, off, st, pred in rows]

    def _line(self, file: int, off: int) -> dict:
        path = self.folder / self.meta["files"][file]
        with path.open("rb") as fh:
            fh.seek(off)
            return orjson.loads(fh.readline())

    def item_lines(self, item: str) -> list[dict]:
        rows = self.db.execute("SELECT file, off, status, pred FROM q WHERE item_id = "
                               "(SELECT id FROM items WHERE item = ?) ORDER BY level, opt", (item,)).fetchall()
        return [self._line(f, o) | {"_": {"status": STATUSES[s], "shown": p}} for f, o, s, p in rows]

    def item_info(self, item: str) -> dict | None:
        r = self.db.execute("SELECT leaf_ok, anc_ok, lraw, data_off, image FROM items WHERE item = ?",
                            (item,)).fetchone()
        if r is None:
            return None
        return dict(zip(("leaf_ok", "anc_ok", "lraw", "data_off", "image"), r))

    def nodes(self) -> list[dict]:
        return [dict(zip(("level", "truth", "parent", "n", "right", "scored"), r))
                for r in self.db.execute("SELECT level, truth, parent, n, right, scored FROM nodes "
                                         "ORDER BY level, truth")]

    def levels(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT level FROM q WHERE level IS NOT NULL ORDER BY level")]

    def close(self) -> None:
        c = getattr(self._local, "db", None)
        if c is not None:
            c.close()
            self._local.db = None
