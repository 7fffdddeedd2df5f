"""Running a plan's cells: grouped by server, resumable, one server per model, side by side on a box.

A cell whose run.json says "done" is skipped without contacting any server, and a started cell resumes
inside its run. Cells of one model run back to back against one server (a `Group`): an endpoint from
the plan or `--endpoint NAME=URL`, or a server started once (harness.serving.launcher) on its share of
the GPUs (tensor-parallel x data-parallel of its profile, CUDA_VISIBLE_DEVICES; harness.study.gpus).
With GPUs known and several groups to run, groups run side by side in forked worker processes on
disjoint GPUs (a group waits until its share is free); otherwise one after another in this process.
A cell is a RunSpec; a `CellRunner` runs it, by default `SpecRunner` (harness.runs.execute, in-process).
The same `run_group` runs a group inside a SLURM job (harness.study.slurm).
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from harness.backends.http import data_parallel
from harness.data.items import ItemError
from harness.runs.execute import RunResult, execute
from harness.runs.folder import ExitCode
from harness.runs.spec import RunSpec
from harness.serving.command import Backend, choose_backend
from harness.serving.launcher import ServerStartError, pdeathsig_preexec, start_server
from harness.serving.profiles import ServerProfile, load_profile
from harness.study.cells import CELL_FILE, Cell, Expansion, blocked_reason, cell_state
from harness.study.gpus import fit, gpu_inventory, profile_parallel
from harness.study.plan_spec import ModelEntry

__all__ = [
    "EXIT_FATAL",
    "CellRunner",
    "Group",
    "LaunchUnavailable",
    "Outcome",
    "SpecRunner",
    "launch_description",
    "launch_server",
    "plan_groups",
    "run_group",
    "run_plan",
]

EXIT_FATAL = int(ExitCode.FATAL)  # a cell's run: the endpoint refused (model not served, bad key, ...)
EXIT_INTERRUPTED = int(ExitCode.INTERRUPTED)  # a cell's run stopped by SIGTERM/SIGINT: the plan stops too


class CellRunner(Protocol):
    """Runs the RunSpec of a cell."""

    def kinds(self) -> Collection[str]:
        """The task kinds that can run here (a cell of another kind is blocked, not failed)."""
        ...

    def run(self, spec: RunSpec, *, quiet: bool = False) -> int:
        """Run `spec` (resumable); its exit code (harness.runs.folder.ExitCode)."""
        ...


class SpecRunner:
    """Cells through the run lifecycle in-process (`harness.runs.execute.execute`, what `harness.run`
    calls). `on_result` sees each run's result (a console prints its lines); `on_error` the message
    of a spec the lifecycle rejects before it starts (a missing file, invalid input)."""

    def __init__(self, *, progress: bool = True, on_result: Callable[[RunResult], None] | None = None,
                 on_error: Callable[[str], None] | None = None):
        self.progress = progress
        self.on_result = on_result
        self.on_error = on_error or (lambda msg: print(f"harness plan: error: {msg}", file=sys.stderr, flush=True))

    def kinds(self) -> set[str]:
        """Hierarchy runs always; classification kinds when their experiment (harness.runs.classification) exists."""
        out = {"hierarchy"}
        if importlib.util.find_spec("harness.runs.classification") is not None:
            out |= {"classify", "loglik", "wikiqa"}
        return out

    def run(self, spec: RunSpec, *, quiet: bool = False) -> int:
        try:
            result = execute(spec, progress=self.progress and not quiet, quiet_server=True)
        except (ItemError, FileNotFoundError, ValueError, KeyError) as e:
            self.on_error(str(e))
            return int(ExitCode.INPUT)
        if self.on_result is not None:
            self.on_result(result)
        return int(result.exit_code)


class LaunchUnavailable(RuntimeError):
    """No endpoint is known for a model and none can be started here."""


Launcher = Callable[[ModelEntry, Path], contextlib.AbstractContextManager]


def _what_to_start(entry: ModelEntry) -> tuple[Backend | None, ServerProfile | None]:
    """(backend, profile) of the server `launch_server` starts for `entry`; backend None: none here.
    vLLM (the one backend choice of harness.serving.command) serves the profile and/or the `path`;
    without it, `transformers serve` can serve a `path` only."""
    prof = load_profile(entry.profile) if entry.profile else None
    if choose_backend() == "vllm" and (prof is not None or entry.path):
        return "vllm", prof
    if entry.path:
        return "transformers", None
    return None, prof


@contextlib.contextmanager
def _cuda_visible(gpus: Sequence[str] | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES = `gpus` in this process's environment for the duration (None: unchanged)."""
    if gpus is None:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def server_share(entry: ModelEntry, gpus: Sequence[str], *, fill: bool = False) -> tuple[int, int, tuple[str, ...]] | None:
    """(tp, dp, device ids) of the server `launch_server` starts for `entry` on `gpus`: the profile's
    TP x DP, DP shrunk to what fits (`fill`: as many replicas as fit); None when one replica does not fit."""
    _, prof = _what_to_start(entry)
    tp, dp = profile_parallel(prof)
    f = fit(tp, None if fill else dp, gpus)
    return None if f is None else (f.tp, f.dp, f.gpus)


@contextlib.contextmanager
def launch_server(entry: ModelEntry, log_dir: Path, *, gpus: Sequence[str] | None = None,
                  fill: bool = False) -> Iterator[tuple[list[str], str | None]]:
    """Start one server for all of a model's cells; yields (endpoints, served model name).

    vLLM with the entry's profile (and `path` as the weights, if given), or `transformers serve` for
    a `path`. The server listens on loopback without a key; its log is `log_dir/<model>.log`.
    `gpus`: the device ids it may use (CUDA_VISIBLE_DEVICES of the server): vLLM takes TP x DP of them
    (the profile's DP, or with `fill` as many replicas as fit; DP shrinks when fewer fit) and its
    endpoint is given as URL#dp=N so each item stays on one engine; `transformers serve` takes the first."""
    backend, prof = _what_to_start(entry)
    if backend is None:
        hint = f" (e.g. after `docker compose up -d {prof.compose_service}`)" if prof else ""
        raise LaunchUnavailable(
            f"model {entry.name}: no endpoint, and "
            + ("vLLM with a GPU is not available here to serve its profile" if prof
               else "no profile or path to start a server from")
            + f"; pass --endpoint {entry.name}=URL{hint}")
    visible: tuple[str, ...] | None = None
    dp = 1
    if gpus is not None and backend == "vllm":
        share = server_share(entry, gpus, fill=fill)
        if share is None:
            tp = profile_parallel(prof)[0]
            raise LaunchUnavailable(f"model {entry.name}: its server needs {tp} GPUs (tensor parallel), "
                                    f"{len(gpus)} here ({','.join(gpus) or 'none'})")
        _, dp, visible = share
        if prof is not None and "data_parallel_size" in type(prof.vllm).model_fields \
                and getattr(prof.vllm, "data_parallel_size", 1) != dp:
            prof = prof.model_copy(update={"vllm": prof.vllm.model_copy(update={"data_parallel_size": dp})})
        elif prof is not None and "data_parallel_size" not in type(prof.vllm).model_fields:
            dp = 1  # profiles without data parallel: one replica
            visible = visible[: profile_parallel(prof)[0]]
    elif gpus is not None:
        visible = tuple(gpus[:1])
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        with _cuda_visible(visible):  # start_server copies the environment when it starts the process
            url, served = stack.enter_context(start_server(
                entry.path, profile=prof, served_model_name=entry.model, backend=backend, timeout=3600,
                log_path=log_dir / f"{entry.name}.log"))
        yield [url + (f"#dp={dp}" if dp > 1 else "")], entry.model or served


def launch_description(entry: ModelEntry) -> str:
    """What `launch_server` would start for `entry` here (for dry runs)."""
    backend, prof = _what_to_start(entry)
    if backend == "vllm":
        return f"a vLLM server the plan starts with {f'profile {prof.name}' if prof else entry.path}"
    if backend == "transformers":
        return f"a transformers server the plan starts for {entry.path}"
    return f"nothing: no endpoint and no way to start one here (pass --endpoint {entry.name}=URL)"


@contextlib.contextmanager
def _given(endpoints: list[str], served: str | None) -> Iterator[tuple[list[str], str | None]]:
    yield endpoints, served


def _served_for(entry: ModelEntry) -> str | None:
    if entry.model:
        return entry.model
    if entry.profile:
        return load_profile(entry.profile).hf_id
    return None


@dataclass
class Outcome:
    key: str
    result: str  # done | skipped (done) | failed (rc N) | blocked: ... | not run | submitted: ... | queued: ...
    rc: int = 0


@dataclass
class Group:
    """Cells that run back to back against one server."""

    gid: str
    """Short id (the model's name, `.2`, `.3`, ... when a model's cells are split): job names and records."""
    entry: ModelEntry
    cells: list[Cell]
    endpoints: list[str] | None = None
    """Given endpoints (--endpoint, the plan's); None: the group's server is started for it."""
    extra: dict[str, Any] = field(default_factory=dict)

    def wanted(self, available: int | None = None) -> tuple[int, int]:
        """(tp, dp) of the server this group starts ((0, 0) with given endpoints): the profile's, DP
        shrunk to what fits `available` GPUs."""
        if self.endpoints is not None:
            return 0, 0
        tp, dp = profile_parallel(_what_to_start(self.entry)[1])
        if available is not None:
            dp = max(1, min(dp, available // tp))
        return tp, dp


def plan_groups(exp: Expansion, kinds: Collection[str], endpoints: dict[str, list[str]] | None = None, *,
                cells_per_group: int | None = None) -> tuple[list[Outcome], list[Group]]:
    """The cells to run grouped by server (same endpoint, or same model to start) in plan order, and
    the outcomes of the cells that need no run (done, blocked, not accepted). `cells_per_group` splits
    a model's cells into groups of at most that many (a SLURM job each)."""
    endpoints = endpoints or {}
    outcomes: list[Outcome] = []
    keyed: dict[tuple, list[Cell]] = {}
    given: dict[tuple, list[str]] = {}
    for c in exp.cells:
        e = exp.entries[c.model]
        urls = endpoints.get(e.name) or (endpoints.get(e.profile) if e.profile else None) or e.endpoint
        gk = ("endpoint", tuple(urls), e.model) if urls else \
            ("launch", e.profile, e.path, e.model, e.name if not (e.profile or e.path) else "")
        if urls:
            given[gk] = list(urls)
        st = cell_state(c, kinds)
        if st.state == "done":
            outcomes.append(Outcome(c.key, "skipped (done)"))
        elif st.state == "blocked" or (st.state == "partial" and blocked_reason(c, kinds)):
            outcomes.append(Outcome(c.key, f"blocked: {blocked_reason(c, kinds)}", 1))
        elif c.error is not None:
            outcomes.append(Outcome(c.key, f"failed: arguments not accepted by `harness {' '.join(c.command)}`: "
                                           f"{c.error}", int(ExitCode.INPUT)))
        else:
            keyed.setdefault(gk, []).append(c)
    groups: list[Group] = []
    used: set[str] = set()
    for gk, cells in keyed.items():
        entry = exp.entries[cells[0].model]
        n = cells_per_group or len(cells)
        for k in range(0, len(cells), n):
            gid, i = entry.name if k == 0 else f"{entry.name}.{k // n + 1}", 1
            base = gid
            while gid in used:
                i += 1
                gid = f"{base}-{i}"
            used.add(gid)
            groups.append(Group(gid, entry, cells[k:k + n], given.get(gk)))
    return outcomes, groups


def _cell_index(exp: Expansion) -> dict[str, int]:
    return {c.key: k for k, c in enumerate(exp.cells)}


def _capacity(spec: RunSpec, entry: ModelEntry, url: str) -> RunSpec:
    """A started vLLM with `max_num_seqs` in its profile: that many requests in flight per engine
    (unless the cell sets --concurrency); otherwise the engine's default per engine (URL#dp=N)."""
    b = spec.backend
    if not entry.profile or getattr(b, "concurrency", 1) is not None:
        return spec
    seqs = load_profile(entry.profile).vllm.max_num_seqs
    if not seqs:
        return spec
    return spec.model_copy(update={"backend": b.model_copy(update={"concurrency": seqs * max(1, data_parallel(url))})})


def run_group(exp: Expansion, group: Group, runner: CellRunner, *, launcher: Launcher = launch_server,
              gpus: Sequence[str] | None = None, fill: bool = False, fail_fast: bool = False,
              log: Callable[[str], None] | None = None, job: dict | None = None,
              should_stop: Callable[[], bool] | None = None) -> list[Outcome]:
    """Run a group's cells against its server: the given endpoints, or one `launcher` starts (on `gpus`
    when given). A cell done by now (a requeued job, another process) is skipped; a cell's run stopped
    by SIGTERM/SIGINT (exit 7) stops the group (the rest: "not run"). `job`: recorded in each cell's
    plan-cell.json (the SLURM job that ran it)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    kinds = set(runner.kinds())
    index = _cell_index(exp)
    outcomes: list[Outcome] = []
    todo = []
    for c in group.cells:
        if cell_state(c, kinds).state == "done":
            outcomes.append(Outcome(c.key, "skipped (done)"))
        else:
            todo.append(c)
    if not todo:
        return outcomes
    entry = group.entry
    if group.endpoints is not None:
        ctx = _given(group.endpoints, _served_for(entry))
    else:
        kw: dict[str, Any] = {}
        if gpus is not None:
            kw["gpus"] = list(gpus)
        if fill:
            kw["fill"] = True
        ctx = launcher(entry, exp.out / "_logs", **kw)

    def rest(after: Cell | None, why: str, rc: int) -> None:
        k = 0 if after is None else todo.index(after) + 1
        for c in todo[k:]:
            if not any(o.key == c.key for o in outcomes):
                outcomes.append(Outcome(c.key, why, rc))

    try:
        with ctx as (urls, served):
            for c in todo:
                if should_stop is not None and should_stop():
                    rest(None, "not run: the plan was interrupted", EXIT_INTERRUPTED)
                    break
                e = exp.entries[c.model]
                c.out.mkdir(parents=True, exist_ok=True)
                tax = next((b.taxonomy for b in exp.plan.benchmarks if b.name == c.benchmark), None)
                meta = c.meta(exp.plan.name, e, tax)
                if job:
                    meta["job"] = job
                (c.out / CELL_FILE).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
                spec = c.spec_for(urls, e.model or served)
                if group.endpoints is None:
                    spec = _capacity(spec, e, urls[0])
                log(f"harness plan: [{index.get(c.key, 0) + 1}/{len(exp.cells)}] {c.key}")
                rc = runner.run(spec, quiet=c.quiet)
                outcomes.append(Outcome(c.key, "done" if rc == 0 else f"failed (exit {rc})", rc))
                if rc == 130:
                    raise KeyboardInterrupt
                if rc == EXIT_INTERRUPTED:
                    rest(c, f"not run: {c.key} was interrupted (exit 7)", EXIT_INTERRUPTED)
                    break
                if rc and fail_fast:
                    break
                if rc == EXIT_FATAL:  # the server refused (model not served, bad key, ...): same for the rest
                    rest(c, f"not run: {c.key} stopped with a server error (exit 4)", 4)
                    break
    except LaunchUnavailable as err:
        rest(None, f"blocked: {err}", 1)
    except ServerStartError as err:  # a server that did not start: the other models still run
        rest(None, f"failed: server did not start: {str(err).splitlines()[0]}", 4)
    return outcomes


def _stopping(outs: Sequence[Outcome], fail_fast: bool) -> bool:
    return any(o.rc == EXIT_INTERRUPTED for o in outs) or (fail_fast and any(
        o.rc and not o.result.startswith("blocked") for o in outs))


def run_plan(exp: Expansion, runner: CellRunner | None = None, *, endpoints: dict[str, list[str]] | None = None,
             launcher: Launcher = launch_server, fail_fast: bool = False, dry_run: bool = False,
             log: Callable[[str], None] | None = None, gpus: Sequence[str] | None = None,
             parallel: bool | None = None) -> list[Outcome]:
    """Run every cell that is not done with `runner` (default: a `SpecRunner`). Cells are grouped by
    server (same endpoint, or same model to start) in plan order; a group whose cells are all done or
    blocked starts nothing. `gpus`: the GPU ids to hand out (default: `gpu_inventory()`); each started
    server gets its TP x DP share. `parallel` (default: GPUs known and several groups to run): groups run
    side by side in forked workers, a started server's group when its share is free. Outcomes come in
    plan order."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    runner = runner or SpecRunner()
    outcomes, groups = plan_groups(exp, set(runner.kinds()), endpoints)
    inventory = list(gpus) if gpus is not None else gpu_inventory()
    index = _cell_index(exp)
    if dry_run:
        for g in groups:
            if g.endpoints is not None:
                where = ", ".join(g.endpoints)
            else:
                where = launch_description(g.entry)
                share = server_share(g.entry, inventory) if inventory else None
                if share is not None and where.startswith("a vLLM"):
                    where += f" on GPUs {','.join(share[2])} (TP {share[0]} x DP {share[1]})"
            outcomes += [Outcome(c.key, f"would run against {where}") for c in g.cells]
        return sorted(outcomes, key=lambda o: index.get(o.key, 0))
    if parallel is None:
        parallel = bool(inventory) and len(groups) > 1
    if parallel and len(groups) > 1:
        outcomes += _side_by_side(exp, groups, runner, launcher, inventory, fail_fast, log)
    else:
        for g in groups:
            share = None
            if inventory and g.endpoints is None:
                s = server_share(g.entry, inventory)
                share = list(s[2]) if s is not None else list(inventory)
            outs = run_group(exp, g, runner, launcher=launcher, gpus=share, fail_fast=fail_fast, log=log)
            outcomes += outs
            if _stopping(outs, fail_fast):
                break
        ran = {o.key for o in outcomes}
        outcomes += [Outcome(c.key, "not run: the plan stopped", 1) for g in groups for c in g.cells
                     if c.key not in ran] if any(o.rc == EXIT_INTERRUPTED for o in outcomes) else []
    return sorted(outcomes, key=lambda o: index.get(o.key, 0))


# --------------------------------------------------------------------------------------------------
# Side by side: one forked worker per group, on disjoint GPUs
# --------------------------------------------------------------------------------------------------


def _worker(exp: Expansion, group: Group, runner: CellRunner, launcher: Launcher, share: list[str] | None,
            fail_fast: bool, log: Callable[[str], None], conn) -> None:  # pragma: no cover - in the child
    os.setpgid(0, 0)  # Ctrl-C reaches the parent only, which passes one SIGTERM on
    pd = pdeathsig_preexec()
    if pd is not None:
        pd()  # the parent dies -> SIGTERM: a clean stop
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))  # between cells; execute's own during a run
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))
    try:
        outs = run_group(exp, group, runner, launcher=launcher, gpus=share, fail_fast=fail_fast, log=log,
                         should_stop=lambda: bool(stop))
    except BaseException as e:  # noqa: BLE001 - reported as the group's outcome
        outs = [Outcome(c.key, f"failed: {type(e).__name__}: {e}", 1) for c in group.cells]
    conn.send(outs)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()


def _side_by_side(exp: Expansion, groups: list[Group], runner: CellRunner, launcher: Launcher,
                  inventory: list[str], fail_fast: bool, log: Callable[[str], None]) -> list[Outcome]:
    ctx = multiprocessing.get_context("fork")
    free = list(inventory)
    pending: list[tuple[Group, int]] = []
    outcomes: list[Outcome] = []
    for g in groups:
        if g.endpoints is None and inventory:
            tp, dp = g.wanted(len(inventory))
            if tp > len(inventory):
                outcomes += [Outcome(c.key, f"blocked: model {g.entry.name}: its server needs {tp} GPUs (tensor "
                                            f"parallel), {len(inventory)} here ({','.join(inventory)})", 1)
                             for c in g.cells]
                continue
            pending.append((g, tp * dp))
        else:
            pending.append((g, 0))
    running: dict[Any, tuple[Any, Group, list[str]]] = {}
    stopping: list[str] = []

    def on_signal(sig, frame):
        stopping.append(signal.Signals(sig).name)
        for proc, _, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)

    import threading

    main = threading.current_thread() is threading.main_thread()
    prev = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        while (pending and not stopping) or running:
            if not stopping:
                for item in list(pending):
                    g, need = item
                    if need > len(free):
                        continue
                    share, free = free[:need], free[need:]
                    r, w = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_worker, args=(exp, g, runner, launcher, share if need else None,
                                                             fail_fast, log, w), daemon=False)
                    proc.start()
                    w.close()
                    pending.remove(item)
                    running[r] = (proc, g, share)
                    if share:
                        log(f"harness plan: {g.gid} on GPUs {','.join(share)}")
            if not running:
                if pending and not stopping:  # nothing fits and nothing runs: cannot happen (needs <= inventory)
                    time.sleep(0.1)
                continue
            for r in multiprocessing.connection.wait(list(running), timeout=1.0):
                proc, g, share = running.pop(r)
                try:
                    outs = r.recv()
                except (EOFError, OSError):
                    outs = None
                proc.join()
                free = [x for x in inventory if x in set(free) | set(share)]  # keep the inventory's order
                if outs is None:
                    outs = [Outcome(c.key, f"failed: the worker for {g.gid} exited with code {proc.exitcode}", 1)
                            for c in g.cells]
                outcomes += outs
                if _stopping(outs, fail_fast) and not stopping:
                    stopping.append("interrupted" if any(o.rc == EXIT_INTERRUPTED for o in outs) else "fail-fast")
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
    for g, _ in pending:
        why = "not run: the plan was interrupted" if stopping and stopping[0] != "fail-fast" else "not run: fail-fast"
        outcomes += [Outcome(c.key, why, EXIT_INTERRUPTED if "interrupted" in why else 1) for c in g.cells]
    return outcomes
