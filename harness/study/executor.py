"""Running a plan's cells: grouped by server, resumable, one server per model.

A cell whose run.json says "done" is skipped without contacting any server, and a started cell resumes
inside its run. Cells of one model run back to back against one server: an endpoint from the plan or
`--endpoint NAME=URL`, or a server started once (harness.serving.launcher). A cell is a RunSpec; a
`CellRunner` runs it, by default `SpecRunner` (the run lifecycle, harness.runs.execute, in-process).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

from harness.data.items import ItemError
from harness.runs.execute import RunResult, execute
from harness.runs.folder import ExitCode
from harness.runs.spec import RunSpec
from harness.serving.command import Backend, choose_backend
from harness.serving.launcher import ServerStartError, start_server
from harness.serving.profiles import ServerProfile, load_profile
from harness.study.cells import CELL_FILE, Cell, Expansion, blocked_reason, cell_state
from harness.study.plan_spec import ModelEntry

__all__ = [
    "EXIT_FATAL",
    "CellRunner",
    "LaunchUnavailable",
    "Outcome",
    "SpecRunner",
    "launch_description",
    "launch_server",
    "run_plan",
]

EXIT_FATAL = int(ExitCode.FATAL)  # a cell's run: the endpoint refused (model not served, bad key, ...)


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
def launch_server(entry: ModelEntry, log_dir: Path) -> Iterator[tuple[list[str], str | None]]:
    """Start one server for all of a model's cells; yields (endpoints, served model name).

    vLLM with the entry's profile (and `path` as the weights, if given), or `transformers serve` for
    a `path`. The server listens on loopback without a key; its log is `log_dir/<model>.log`."""
    backend, prof = _what_to_start(entry)
    if backend is None:
        hint = f" (e.g. after `docker compose up -d {prof.compose_service}`)" if prof else ""
        raise LaunchUnavailable(
            f"model {entry.name}: no endpoint, and "
            + ("vLLM with a GPU is not available here to serve its profile" if prof
               else "no profile or path to start a server from")
            + f"; pass --endpoint {entry.name}=URL{hint}")
    log_dir.mkdir(parents=True, exist_ok=True)
    with start_server(entry.path, profile=prof, served_model_name=entry.model, backend=backend, timeout=3600,
                      log_path=log_dir / f"{entry.name}.log") as (url, served):
        yield [url], entry.model or served


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
    result: str  # done | skipped (done) | failed (rc N) | blocked: ... | not run
    rc: int = 0


def run_plan(exp: Expansion, runner: CellRunner | None = None, *, endpoints: dict[str, list[str]] | None = None,
             launcher: Launcher = launch_server, fail_fast: bool = False, dry_run: bool = False,
             log: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run every cell that is not done with `runner` (default: a `SpecRunner`). Cells are grouped by
    server (same endpoint, or same model to start) in plan order; a group whose cells are all done or
    blocked starts nothing."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    runner = runner or SpecRunner()
    endpoints = endpoints or {}
    kinds = set(runner.kinds())
    outcomes: list[Outcome] = []
    groups: dict[tuple, list[Cell]] = {}
    given: dict[tuple, list[str]] = {}
    for c in exp.cells:
        e = exp.entries[c.model]
        urls = endpoints.get(e.name) or (endpoints.get(e.profile) if e.profile else None) or e.endpoint
        gk = ("endpoint", tuple(urls), e.model) if urls else ("launch", e.profile, e.path, e.model, e.name if not (e.profile or e.path) else "")
        if urls:
            given[gk] = list(urls)
        groups.setdefault(gk, []).append(c)
    for gk, cells in groups.items():
        todo: list[Cell] = []
        for c in cells:
            st = cell_state(c, kinds)
            if st.state == "done":
                outcomes.append(Outcome(c.key, "skipped (done)"))
            elif st.state == "blocked" or (st.state == "partial" and blocked_reason(c, kinds)):
                outcomes.append(Outcome(c.key, f"blocked: {blocked_reason(c, kinds)}", 1))
            elif c.error is not None:
                outcomes.append(Outcome(c.key, f"failed: arguments not accepted by `harness {' '.join(c.command)}`: "
                                               f"{c.error}", int(ExitCode.INPUT)))
            else:
                todo.append(c)
        if not todo:
            continue
        entry = exp.entries[todo[0].model]
        if dry_run:
            where = ", ".join(given[gk]) if gk in given else launch_description(entry)
            for c in todo:
                outcomes.append(Outcome(c.key, f"would run against {where}"))
            continue
        ctx = _given(given[gk], _served_for(entry)) if gk in given else launcher(entry, exp.out / "_logs")
        try:
            with ctx as (urls, served):
                for c in todo:
                    e = exp.entries[c.model]
                    c.out.mkdir(parents=True, exist_ok=True)
                    tax = next((b.taxonomy for b in exp.plan.benchmarks if b.name == c.benchmark), None)
                    (c.out / CELL_FILE).write_bytes(orjson.dumps(c.meta(exp.plan.name, e, tax), option=orjson.OPT_INDENT_2))
                    spec = c.spec_for(urls, e.model or served)
                    log(f"harness plan: [{len(outcomes) + 1}/{len(exp.cells)}] {c.key}")
                    rc = runner.run(spec, quiet=c.quiet)
                    outcomes.append(Outcome(c.key, "done" if rc == 0 else f"failed (exit {rc})", rc))
                    if rc == 130:
                        raise KeyboardInterrupt
                    if rc and fail_fast:
                        return outcomes
                    if rc == EXIT_FATAL:  # the server refused (model not served, bad key, ...): same for the rest
                        for rest in todo[todo.index(c) + 1:]:
                            outcomes.append(Outcome(rest.key, f"not run: {c.key} stopped with a server error (exit 4)", 4))
                        break
        except LaunchUnavailable as err:
            for c in todo:
                if not any(o.key == c.key for o in outcomes):
                    outcomes.append(Outcome(c.key, f"blocked: {err}", 1))
        except ServerStartError as err:  # a server that did not start: the other models still run
            for c in todo:
                if not any(o.key == c.key for o in outcomes):
                    outcomes.append(Outcome(c.key, f"failed: server did not start: {str(err).splitlines()[0]}", 4))
            if fail_fast:
                return outcomes
    return outcomes

