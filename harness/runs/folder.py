"""The run folder: results.jsonl (append-only), run.json (manifest), summary.json - and the one rule
that decides whether a folder may be resumed, and the exit codes, declared once for every run kind.

Resume rule: the *resolved* settings of a run (what the spec became after presets, profiles and data
hashes) are all answer-changing, except fields marked ``Field(json_schema_extra=NOT_ANSWERS)`` (a
larger `limit`, where the data file lives). A folder whose recorded settings differ in any other field
is refused, naming the field.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from harness import __version__
from harness.runs.results import ResultStore


class ExitCode(IntEnum):
    """What a run's exit status means (a scheduler requeues on FATAL, a user fixes INPUT)."""

    OK = 0
    INPUT = 2  # invalid input: a flag, a file, a line (the message names it)
    UNANSWERED = 3  # questions left unanswered (failed, or the run was stopped): rerun to continue
    FATAL = 4  # the backend failed in a way every further request would (bad key, unknown model, ...)
    UNAVAILABLE = 5  # no backend answered for too long, or nearly every request failed alike: requeue later


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


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results = self.path / "results.jsonl"
        self.manifest_path = self.path / "run.json"
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
        """Refuse to resume a folder written with other answer-changing settings (or another run kind)."""
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

    def store(self) -> ResultStore:
        return ResultStore(self.results)

    def done(self, retry_errors: bool = False) -> set[str]:
        """The qids already answered (a torn last line is cut off first)."""
        return self.store().scan(retry_errors=retry_errors)

    def write_manifest(self, *, kind: str, spec: BaseModel, settings: Settings, status: str, started: str,
                       stats: dict | None = None, **extra: Any) -> None:
        """run.json, written atomically. `spec` must already be free of secrets (it holds key *names*)."""
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
        if stats is not None:
            m["stats"] = stats
        self._write(self.manifest_path, m)

    def write_summary(self, summary: dict) -> None:
        self._write(self.summary_path, summary)

    def _write(self, path: Path, obj: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                     | orjson.OPT_NON_STR_KEYS))
        os.replace(tmp, path)
