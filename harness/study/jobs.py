"""Where a plan's cluster jobs are recorded: `OUT/_jobs/<group>.json` (written when a job is submitted:
job id, cells, submitit folder, resources) and `OUT/_jobs/<group>.run.json` (written by the job itself:
state, restarts, host, each cell's outcome). `harness plan status` reads both, and asks SLURM
(`squeue`, else `sacct`) for the live state of the jobs it finds; nothing here needs submitit.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import orjson

from harness.study.records import read_json

__all__ = ["ALIVE", "JOBS_DIR", "cell_jobs", "job_states", "read_records", "write_record"]

JOBS_DIR = "_jobs"
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
         "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"}
"""SLURM states of a job that will still run cells (a PREEMPTED job with requeue comes back)."""


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_record(out: Path, gid: str, data: dict, *, run: bool = False, merge: bool = True) -> Path:
    """Write (atomically; merged into what is there unless `merge` is False) the record of group `gid`:
    the submission record, or with `run` the job's own."""
    d = Path(out) / JOBS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / (f"{gid}.run.json" if run else f"{gid}.json")
    old = read_json(path) if merge else {}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps({**old, **data, "updated": now()}, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)
    return path


def read_records(out: Path) -> list[dict]:
    """Every group's submission record with its job's own record under "run" (when it is of that job)."""
    d = Path(out) / JOBS_DIR
    if not d.is_dir():
        return []
    recs = []
    for p in sorted(d.glob("*.json")):
        if p.name.endswith(".run.json"):
            continue
        rec = read_json(p)
        if not rec:
            continue
        run = read_json(p.with_name(p.name[:-5] + ".run.json"))
        if run and str(run.get("job_id")) == str(rec.get("job_id")):
            rec["run"] = run
        recs.append(rec)
    return recs


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def job_states(ids: Iterable[str]) -> dict[str, str]:
    """The SLURM state of each job id that squeue (pending and running jobs) or sacct (finished ones,
    with accounting) knows; ids neither knows are left out."""
    ids = sorted({str(i) for i in ids if i})
    if not ids:
        return {}
    out: dict[str, str] = {}
    text = _run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)])
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    rest = [i for i in ids if i not in out]
    if rest:
        text = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(rest)])
        for line in (text or "").splitlines():
            jid, _, state = line.partition("|")
            if jid in rest and state:
                out[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return out


def cell_jobs(out: Path, *, live: bool = True) -> dict[str, dict]:
    """cell key -> {"job_id", "group", "executor", "state" (live SLURM state or the recorded one),
    "restarts"} of the latest job that was given the cell."""
    recs = read_records(out)
    states = job_states(r.get("job_id") for r in recs) if live and recs else {}
    by_cell: dict[str, dict] = {}
    for r in sorted(recs, key=lambda r: r.get("submitted", "")):
        run = r.get("run") or {}
        jid = str(r.get("job_id", ""))
        info = {"job_id": jid, "group": r.get("group"), "executor": r.get("executor", "slurm"),
                "state": states.get(jid) or run.get("state") or r.get("state", "submitted"),
                "restarts": run.get("restart", 0)}
        for key in r.get("cells", []):
            by_cell[key] = info
    return by_cell
