"""`harness plan run --executor slurm`: one requeueable SLURM job per (model, group of cells), through
submitit (the `[slurm]` extra).

A job (`GroupJob`, a `submitit.helpers.Checkpointable`) runs on the GPUs its model's profile needs
(tensor parallel x data parallel) or on a whole node (`whole_node`: as many data-parallel replicas as
fit), starts the model's server through harness.serving (or uses `--endpoint MODEL=URL`), waits for its
health, runs its cells through harness.runs.execute (RunSpecs, `run_group`), and stops the server. On
preemption or at the time limit SLURM signals the job (USR2, 90 s before the limit): submitit requeues
it; the requeued job skips the cells that are done and resumes the started one inside its run folder
(append-only results; the run folder's lock is an flock, released when the old job's process dies).
A SIGTERM alone (scancel, a preemption's first signal) stops the cell in flight cleanly; the job then
waits for the requeue signal or its end. Jobs run with HF_HUB_OFFLINE=1 (`harness plan prefetch` on a
login node first). Job ids are recorded in OUT/_jobs (harness.study.jobs), shown by `harness plan status`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from harness.runs.execute import RunResult
from harness.study.cells import Expansion
from harness.study.executor import (
    EXIT_INTERRUPTED,
    Group,
    Outcome,
    SpecRunner,
    _what_to_start,
    launch_server,
    plan_groups,
    run_group,
)
from harness.study.gpus import gpu_inventory, profile_parallel
from harness.study.jobs import ALIVE, job_states, now, read_records, write_record
from harness.study.plan_spec import SlurmSection

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - the [slurm] extra is not installed
    submitit = None

    class Checkpointable:  # type: ignore[no-redef]
        pass

__all__ = ["GroupJob", "SlurmUnavailable", "group_resources", "submit_plan"]


class SlurmUnavailable(RuntimeError):
    """submitit or the SLURM commands are missing."""


def _print_result(r: RunResult) -> None:
    for line in r.lines:
        print(line, flush=True)
    if r.message:
        print(f"{r.status}: {r.message}", flush=True)


@dataclass
class _Options:
    whole_node: bool
    hf_offline: bool
    grace: float


class GroupJob(Checkpointable):
    """What one SLURM job runs: a group of a plan's cells against one server. Pickled by submitit at
    submission and again at each checkpoint (the state is on disk: the run folders)."""

    def __init__(self, exp: Expansion, group: Group, *, whole_node: bool = False, hf_offline: bool = True,
                 grace: float = 300.0):
        self.exp = replace(exp, cells=list(group.cells))
        self.group = group
        self.options = _Options(whole_node, hf_offline, grace)

    def _job(self) -> dict:
        return {"executor": "slurm", "job_id": os.environ.get("SLURM_JOB_ID", ""),
                "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "host": socket.gethostname()}

    def __call__(self) -> list[dict]:
        if self.options.hf_offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        job = self._job()
        out, gid = self.exp.out, self.group.gid
        write_record(out, gid, {**job, "state": "running", "started": now(), "pid": os.getpid()}, run=True)
        gpus = gpu_inventory() if self.group.endpoints is None else []
        print(f"harness plan: job {job['job_id']} (restart {job['restart']}) on {job['host']}: group {gid}, "
              f"{len(self.group.cells)} cells, GPUs {','.join(gpus) or 'none'}", flush=True)
        outs = run_group(self.exp, self.group, SpecRunner(progress=False, on_result=_print_result),
                         launcher=launch_server, gpus=gpus or None, fill=self.options.whole_node,
                         log=lambda s: print(s, flush=True), job=job)
        cells = {o.key: {"result": o.result, "rc": o.rc} for o in outs}
        if any(o.rc == EXIT_INTERRUPTED for o in outs):
            write_record(out, gid, {"state": "interrupted", "cells": cells}, run=True)
            print("harness plan: interrupted; waiting for the requeue signal or the end of the job", flush=True)
            deadline = time.monotonic() + self.options.grace
            while time.monotonic() < deadline:  # submitit's USR2 handler requeues and exits from here
                time.sleep(0.2)
            raise RuntimeError(f"group {gid}: interrupted by SIGTERM and not requeued within "
                               f"{self.options.grace:g} s; run the plan again to continue")
        write_record(out, gid, {"state": "finished", "cells": cells}, run=True)
        return [asdict(o) for o in outs]

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Preempted or timed out: record it; the requeued job runs this object again (what is done stays done).

        SIGTERM is ignored from here on, also by the `scontrol requeue` submitit runs next (an ignored
        signal stays ignored across exec): a preemption's SIGTERM, delivered to every process of the job
        step, would otherwise kill that command before it requeues the job. The job exits right after."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        write_record(self.exp.out, self.group.gid, {"state": "requeued", "requeued": now()}, run=True)
        return super().checkpoint(*args, **kwargs)


def group_resources(group: Group, opts: SlurmSection) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one group's job: GPUs for the server it starts (TP x DP of
    its profile, capped at `gpus_per_node`; a whole node with `whole_node`), none with an endpoint."""
    p: dict[str, Any] = {"time": opts.time}
    if opts.partition:
        p["partition"] = opts.partition
    if opts.account:
        p["account"] = opts.account
    if opts.cpus_per_task:
        p["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        p["mem"] = f"{int(opts.mem_gb * 1024)}M"
    if group.endpoints is None:
        if opts.whole_node:
            p["exclusive"] = True
            if opts.gpus_per_node:
                p["gpus_per_node"] = opts.gpus_per_node
        else:
            tp, dp = profile_parallel(_what_to_start(group.entry)[1])
            n = tp * dp
            if opts.gpus_per_node:
                n = tp * max(1, min(dp, opts.gpus_per_node // tp)) if tp <= opts.gpus_per_node else tp
            p["gpus_per_node"] = n
    elif opts.whole_node:
        p["exclusive"] = True
    extra = {k.replace("-", "_").lstrip("_"): v for k, v in opts.sbatch.items()}
    if extra:
        p["additional_parameters"] = extra
    return p


def _executor(folder: Path, opts: SlurmSection):
    if submitit is None:
        raise SlurmUnavailable("--executor slurm needs submitit: pip install 'vlm-hierarchy-harness[slurm]'")
    if not shutil.which("sbatch"):
        raise SlurmUnavailable("--executor slurm: no `sbatch` on PATH (run it on a SLURM login node)")
    return submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=opts.max_requeues)


def submit_plan(exp: Expansion, opts: SlurmSection, *, endpoints: dict[str, list[str]] | None = None,
                wait: bool = False, log: Callable[[str], None] | None = None,
                poll: float = 1.0) -> list[Outcome]:
    """Submit a job per group of cells not done (cells in a job that is still queued or running are not
    submitted again); with `wait`, wait for every job and return its cells' outcomes."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    kinds = SpecRunner().kinds()
    outcomes, groups = plan_groups(exp, kinds, endpoints, cells_per_group=opts.cells_per_job)
    index = {c.key: k for k, c in enumerate(exp.cells)}
    # cells of a job that is still alive: not submitted twice
    recs = read_records(exp.out)
    live = job_states(r.get("job_id") for r in recs)
    queued: dict[str, str] = {}
    for r in recs:
        jid = str(r.get("job_id", ""))
        if live.get(jid) in ALIVE:
            for key in r.get("cells", []):
                queued[key] = f"{jid} ({live[jid]})"
    todo: list[Group] = []
    for g in groups:
        held = [c for c in g.cells if c.key in queued]
        outcomes += [Outcome(c.key, f"queued: job {queued[c.key]}") for c in held]
        rest = [c for c in g.cells if c.key not in queued]
        if rest:
            todo.append(replace(g, cells=rest))
    if not todo:
        return sorted(outcomes, key=lambda o: index.get(o.key, 0))
    folder = exp.out / "_slurm"
    ex = _executor(folder, opts)
    setup = list(opts.setup)
    if opts.hf_offline:
        setup.append("export HF_HUB_OFFLINE=1")
    jobs = []
    for g in todo:
        params = group_resources(g, opts)
        ex.update_parameters(job_name=f"{exp.plan.name}:{g.gid}", setup=setup, **params)
        job = ex.submit(GroupJob(exp, g, whole_node=opts.whole_node, hf_offline=opts.hf_offline))
        write_record(exp.out, g.gid, {
            "group": g.gid, "model": g.entry.name, "executor": "slurm", "job_id": str(job.job_id),
            "cells": [c.key for c in g.cells], "submitted": now(), "folder": str(folder),
            "endpoints": g.endpoints, "resources": {k: v for k, v in params.items() if k != "additional_parameters"},
            "state": "submitted"}, merge=False)
        log(f"harness plan: submitted job {job.job_id} for {g.gid} ({len(g.cells)} cells)"
            + (f", {params['gpus_per_node']} GPUs" if params.get("gpus_per_node") else ""))
        jobs.append((g, job))
    if not wait:
        for g, job in jobs:
            outcomes += [Outcome(c.key, f"submitted: job {job.job_id}") for c in g.cells]
        return sorted(outcomes, key=lambda o: index.get(o.key, 0))
    for g, job in jobs:
        try:
            got = job.result()
            outcomes += [Outcome(**o) for o in got]
        except Exception as e:  # noqa: BLE001 - FailedJobError, UncompletedJobError: the job's cells failed
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            outcomes += [Outcome(c.key, f"failed: job {job.job_id}: {last}", 1) for c in g.cells]
    return sorted(outcomes, key=lambda o: index.get(o.key, 0))


def wait_for_jobs(job_ids: Sequence[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
    """Poll until none of `job_ids` is alive (or `timeout`); their last states."""
    deadline = time.monotonic() + timeout
    while True:
        st = job_states(job_ids)
        if not any(st.get(j) in ALIVE for j in job_ids) or time.monotonic() > deadline:
            return st
        time.sleep(poll)
