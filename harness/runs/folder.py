"""The run folder: results.jsonl (append-only), run.json (manifest), summary.json - and the one rule
that decides whether a folder may be resumed, its writer lock, and the exit codes, declared once for
every run kind.

Shards (`--shard I/N`): shard I of N writes results.shard-I-of-N.jsonl and its own manifest
run.shard-I-of-N.json (status, stats, host, pid); run.json is the folder's manifest, rewritten by every
writer under a short lock: the spec without `shard` (it reproduces the whole run), the settings every
shard is checked against, the status of the whole run and each shard's. Readers take every results
file of the folder as one run (:func:`harness.metrics.readers.results_files`).

Lock: one writer per results file. A writer holds ``fcntl.flock`` on .lock (unsharded) or
.lock.shard-I-of-N for as long as it runs; the kernel drops it when the process dies, however it dies,
so a lock left by a SIGKILL is stale by construction (its file still names the old holder, which the
next writer reports and replaces). A writer also refuses while a writer of another layout (unsharded vs
sharded, or another N) holds its lock: their items would overlap.

Resume rule: the *resolved* settings of a run (what the spec became after presets, profiles and data
hashes) are all answer-changing, except fields marked ``Field(json_schema_extra=NOT_ANSWERS)`` (a
larger `limit`, where the data file lives). A folder whose recorded settings differ in any other field
is refused, naming the field.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from harness import __version__
from harness.metrics.readers import iter_records, results_files
from harness.runs.results import ResultStore, repair_tail
from harness.runs.spec import parse_shard

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]


class ExitCode(IntEnum):
    """What a run's exit status means (a scheduler requeues on FATAL, a user fixes INPUT)."""

    OK = 0
    INPUT = 2  # invalid input: a flag, a file, a line (the message names it)
    UNANSWERED = 3  # questions left unanswered (failed, or the run was stopped): rerun to continue
    FATAL = 4  # the backend failed in a way every further request would (bad key, unknown model, ...)
    UNAVAILABLE = 5  # no backend answered for too long, or nearly every request failed alike: requeue later
    LOCKED = 6  # another process is writing this run folder (or this shard of it): the message names it
    INTERRUPTED = 7  # SIGTERM / SIGINT: stopped cleanly, answers kept; the same command resumes


OLD_KINDS = {"generation": "classify"}
"""Run kinds in the run.json of folders written before the run kinds were unified -> today's."""

NOT_ANSWERS = {"answers": False}
"""`json_schema_extra` of a settings field that does not change any answer already given."""


class Settings(BaseModel):
    """Resolved settings of a run kind: every field changes answers unless marked NOT_ANSWERS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def fingerprint(self) -> dict[str, Any]:
        skip = {k for k, f in type(self).model_fields.items() if f.json_schema_extra == NOT_ANSWERS}
        return self.model_dump(mode="json", exclude=skip)


class SettingsChanged(ValueError):
    """The folder holds a run with other answer-changing settings."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunLocked(RuntimeError):
    """Another process writes this run folder (or this shard of it)."""


_LOCK_NAME = re.compile(r"\.lock(?:\.shard-(\d+)-of-(\d+))?")
_STATUS_ORDER = ("running", "killed", "pending", "fatal", "unavailable", "interrupted", "stopped", "incomplete", "done")


def command_line() -> list[str]:
    """This process's command line, credentials cut out of URLs (user:pass@host)."""
    from harness.backends.http import redact_url

    out = []
    for a in sys.argv:
        flag, eq, val = a.partition("=") if a.startswith("--") else ("", "", a)
        out.append(flag + eq + (redact_url(val) if "://" in val else val))
    return out


def _holder(info: dict) -> str:
    cmd = " ".join(info.get("command") or [])
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f": {cmd}" if cmd else ""))


def _read_info(path: Path) -> dict:
    try:
        info = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


class FolderLock:
    """The writer lock of one results file of a run folder (see the module docstring)."""

    def __init__(self, folder: Path, shard: tuple[int, int] | None):
        self.folder, self.shard = folder, shard
        tag = "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"
        self.path = folder / f".lock{tag}"
        self._fd: int | None = None
        self.stale: dict | None = None  # the holder a SIGKILLed writer left in the file, if any
        self.note: str | None = None  # why nothing is locked (a file system without locks)

    def _what(self) -> str:
        return "this run folder" if self.shard is None else f"shard {self.shard[0]}/{self.shard[1]} of this run folder"

    def acquire(self) -> None:
        if fcntl is None:
            self.note = "no file locks on this platform: make sure no other run writes this folder"
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for attempt in range(4):  # a probe (held()) takes a free lock for an instant: look again
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 3:
                        raise
                    time.sleep(0.05)
        except BlockingIOError:
            os.close(fd)
            info = _read_info(self.path)
            raise RunLocked(f"{self.folder}: {self._what()} is being written by another run "
                            f"({_holder(info) if info else 'holder unknown'}); wait for it, stop it, or use "
                            "another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                self.note = f"{self.folder}: the file system has no locks ({e.strerror}): writing unlocked"
                return
            raise
        self._fd = fd
        try:
            old = os.read(fd, 1 << 16)
            if old.strip():
                with contextlib.suppress(orjson.JSONDecodeError):
                    info = orjson.loads(old)
                    self.stale = info if isinstance(info, dict) else {}
            self._check_layouts()
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now(), "command": command_line(),
                  "shard": None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}"}
            os.ftruncate(fd, 0)
            os.pwrite(fd, orjson.dumps(me), 0)
        except BaseException:
            self.release(clear=False)
            raise

    def _check_layouts(self) -> None:
        """Refuse while a writer of another layout holds its lock (taken after our own: of two writers
        starting at once, at least one sees the other)."""
        n = 1 if self.shard is None else self.shard[1]
        for other in self.folder.glob(".lock*"):
            m = _LOCK_NAME.fullmatch(other.name)
            if not m or other == self.path:
                continue
            if (int(m[2]) if m[2] else 1) == n and self.shard is not None:
                continue  # another shard of the same N: its own items
            if held(other):
                info = _read_info(other)
                theirs = f"shard {info['shard']}" if info.get("shard") else "an unsharded run"
                ours = "an unsharded run" if self.shard is None else f"shard {self.shard[0]}/{n}"
                raise RunLocked(f"{self.folder}: {theirs} is writing this folder ({_holder(info)}); "
                                f"{ours} would ask the same items: wait for it, or use the same --shard N")

    def release(self, clear: bool = True) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if clear:
                os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def stale_line(self) -> str | None:
        if not self.stale:
            return None
        return (f"note: the last writer of {self._what()} ({_holder(self.stale)}) ended without releasing its "
                "lock (killed?); its results are kept and this run continues them")

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held(lock_file: Path) -> bool:
    """Whether a live process holds this lock file (a probe: taken and dropped at once)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops a probe lock we got
    return False


class RunFolder:
    def __init__(self, path: str | Path, shard: str | tuple[int, int] | None = None):
        self.path = Path(path)
        self.shard = parse_shard(shard) if isinstance(shard, str) else shard
        tag = "" if self.shard is None else f".shard-{self.shard[0]}-of-{self.shard[1]}"
        self.results = self.path / f"results{tag}.jsonl"  # this writer's results file
        self.manifest_path = self.path / "run.json"  # the folder's manifest (the whole run)
        self.shard_manifest_path = self.path / f"run{tag}.json"  # this writer's (run.json when unsharded)
        self.summary_path = self.path / "summary.json"

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            m = orjson.loads(self.manifest_path.read_bytes())
        except orjson.JSONDecodeError as e:
            raise ValueError(f"{self.manifest_path}: not valid JSON ({e}); move it away to start afresh") from None
        return m if isinstance(m, dict) else None

    def check(self, kind: str, settings: Settings, force: bool = False) -> None:
        """Refuse to resume a folder written with other answer-changing settings (or another run kind).
        run.json holds what every writer (each shard) ran with, so the check covers all shards."""
        if force:
            return
        old = self.read_manifest()
        if old is None:
            return
        old_kind = old.get("kind", "hierarchy")
        if old_kind != kind:
            raise SettingsChanged(f"{self.manifest_path}: this folder holds a {old_kind} run, not {kind}; "
                                  "use another --out")
        recorded = old.get("settings") or {}
        for k, v in settings.fingerprint().items():
            if k in recorded and recorded[k] != v:
                raise SettingsChanged(
                    f"{self.manifest_path}: this folder holds a run with other settings "
                    f"({k}: {recorded[k]!r} -> {v!r}). Use another --out, or --force to resume anyway.")

    def prepare(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path}: exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)

    def lock(self) -> FolderLock:
        """This writer's lock (a context manager); raises RunLocked naming the holder."""
        return FolderLock(self.path, self.shard)

    def store(self) -> ResultStore:
        return ResultStore(self.results)

    def results_files(self) -> list[Path]:
        """Every results file of the folder (all shards), read as one run."""
        return results_files(self.path)

    def done(self, retry_errors: bool = False, *, repair: bool = True) -> set[str]:
        """The qids already answered in any results file of the folder (so a resume with another
        --shard layout still asks every question once). This writer's torn last line is cut off first
        (`repair`); the other files belong to other writers and are only read. With `retry_errors`,
        a qid whose last line in every file is a failure is not done."""
        if not self.path.is_dir():
            return set()
        if repair:
            repair_tail(self.results)
        answered: set[str] = set()
        failed: set[str] = set()
        for f in results_files(self.path):
            last: dict[str, bool] = {}
            for rec in iter_records(f):
                if isinstance(rec, dict) and (qid := rec.get("qid")) is not None:
                    last[qid] = rec.get("error") is not None
            for qid, err in last.items():
                (failed if err else answered).add(qid)
        return answered if retry_errors else answered | failed

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        """A short exclusive lock around reading and writing the manifests (shards end at once)."""
        if fcntl is None:
            yield
            return
        fd = os.open(self.path / ".lock.manifest", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def claim(self, *, kind: str, settings: Settings, force: bool = False, **manifest: Any) -> None:
        """check() and the first write_manifest() as one step, so two shards starting at once on a
        fresh folder cannot both record their own settings."""
        with self._manifest_lock():
            self.check(kind, settings, force)
            self._write_manifest(kind=kind, settings=settings, **manifest)

    def write_manifest(self, *, kind: str, spec: BaseModel, settings: Settings, status: str, started: str,
                       stats: dict | None = None, **extra: Any) -> None:
        """run.json (and a shard's run.shard-I-of-N.json), written atomically. `spec` must already be
        free of secrets (it holds key *names*)."""
        with self._manifest_lock():
            self._write_manifest(kind=kind, spec=spec, settings=settings, status=status, started=started,
                                 stats=stats, **extra)

    def _write_manifest(self, *, kind: str, spec: BaseModel, settings: Settings, status: str, started: str,
                        stats: dict | None = None, **extra: Any) -> None:
        m = {
            "harness_version": __version__,
            "kind": kind,
            "status": status,
            "started": started,
            "updated": now(),
            "spec": spec.model_dump(mode="json"),
            "settings": settings.model_dump(mode="json"),
            "python": platform.python_version(),
            **extra,
        }
        target = self.manifest_path if self.shard is None else self.shard_manifest_path
        before, total = _cumulative(_read_info(target) if target.is_file() else {}, stats)
        m["stats_before"] = before  # totals of the earlier invocations (a resumed run adds up)
        if stats is not None:
            m["stats"] = stats  # this invocation
        m["stats_total"] = total
        if self.shard is None:
            self._write(self.manifest_path, m)
            return
        m |= {"shard": f"{self.shard[0]}/{self.shard[1]}", "host": socket.gethostname(), "pid": os.getpid()}
        self._write(self.shard_manifest_path, m)
        shards = self._shard_states()
        whole = {k: v for k, v in m.items() if k not in ("stats", "shard", "host", "pid", "started")}
        whole["spec"] = m["spec"] | {"shard": None}  # the whole run: what reproduces it into one folder
        whole["status"] = _whole_status(shards, self.shard[1])
        whole["shards"] = shards
        self._write(self.manifest_path, whole)

    def _shard_states(self) -> dict[str, dict]:
        """shard "I/N" -> its status ("killed": it said running but holds no lock), started, updated, stats."""
        out: dict[str, dict] = {}
        for f in self.path.glob("run.shard-*-of-*.json"):
            m = _read_info(f)
            if not m.get("shard"):
                continue
            i, n = parse_shard(m["shard"])
            status = m.get("status")
            if status == "running" and not held(self.path / f".lock.shard-{i}-of-{n}"):
                status = "killed"
            out[m["shard"]] = {"status": status, "started": m.get("started"), "updated": m.get("updated"),
                               "host": m.get("host"), "pid": m.get("pid"), "stats": m.get("stats")}
        return dict(sorted(out.items(), key=lambda kv: parse_shard(kv[0])[::-1]))

    def write_summary(self, summary: dict | Callable[[], dict]) -> dict:
        """summary.json; given a function, it is computed under the manifest lock (the last shard to
        end writes the summary of every shard's answers)."""
        with self._manifest_lock():
            s = summary() if callable(summary) else summary
            self._write(self.summary_path, s)
        return s

    def _write(self, path: Path, obj: dict) -> None:
        # a per-process temporary name: shards write the shared files concurrently
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                     | orjson.OPT_NON_STR_KEYS))
        os.replace(tmp, path)


_NOT_SUMMED = {"started", "fatal", "stopped", "unavailable"}


def _cumulative(prev: dict, stats: dict | None) -> tuple[dict, dict]:
    """(totals before this invocation, totals including it) from the manifest on disk: while this
    invocation runs, its own "running" manifest carries the totals it started from."""
    if prev.get("status") == "running" and "stats_before" in prev:
        before = prev["stats_before"]
    else:
        before = prev.get("stats_total") or ({**prev["stats"], "invocations": 1} if prev.get("stats") else {})
    if stats is None:
        return before, before
    total = dict(before)
    for k, v in stats.items():
        if k in _NOT_SUMMED or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        total[k] = total.get(k, 0) + v
    total["invocations"] = before.get("invocations", 0) + 1
    return before, total


def _whole_status(shards: dict[str, dict], n: int) -> str:
    """The status of a sharded run: the least finished of its N shards (a shard not started: pending)."""
    states = [shards.get(f"{i}/{n}", {}).get("status") or "pending" for i in range(n)]
    return min(states, key=lambda s: _STATUS_ORDER.index(s) if s in _STATUS_ORDER else 0)
