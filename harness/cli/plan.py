"""`harness plan expand|status|run|prefetch PLAN`: a study's grid (harness.study), from the command line.

This module only parses arguments: the study package expands a plan into RunSpecs and runs them
(harness.study.executor.SpecRunner; on SLURM harness.study.slurm); the run results are printed as
`harness run` prints them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

import orjson

from harness.cli.run import print_result
from harness.runs.hierarchy import PRESETS
from harness.study.cells import Expansion, cell_state, expand
from harness.study.executor import Launcher, Outcome, SpecRunner, launch_server
from harness.study.executor import run_plan as _run_plan
from harness.study.gpus import parse_gpus
from harness.study.jobs import cell_jobs
from harness.study.plan_spec import SlurmSection, Vars, load_plan, parse_assignments


def _runner() -> SpecRunner:
    return SpecRunner(on_result=print_result)


def run_plan(exp: Expansion, *, endpoints: dict[str, list[str]] | None = None, launcher: Launcher = launch_server,
             fail_fast: bool = False, dry_run: bool = False, log=None, gpus=None) -> list[Outcome]:
    """harness.study.executor.run_plan with each run's result printed as `harness run` prints it."""
    return _run_plan(exp, _runner(), endpoints=endpoints, launcher=launcher, fail_fast=fail_fast, dry_run=dry_run,
                     log=log, gpus=gpus)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan file, or the name of a shipped plan (plans/*.toml)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a ${NAME} variable of the plan")
    p.add_argument("--models", help="comma-separated model names to include (opt-in models only this way)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB", help="cells whose key matches (repeatable)")
    p.add_argument("--out", help="root folder of the cells (default: the plan's `out`)")
    p.add_argument("--limit", type=int, help="first N items of every file (a smoke run; part of the cell names)")


def _expansion(args, extra: Sequence[str] = ()) -> Expansion:
    plan = load_plan(args.plan, presets=sorted(PRESETS))
    sets = {k: v[-1] for k, v in parse_assignments(args.set, "--set").items()}
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    return expand(plan.spec, variables=Vars(plan.spec, sets), models=models, out=args.out, limit=args.limit,
                  extra_args=extra, only=args.only)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _cmd_expand(args) -> int:
    exp = _expansion(args)
    if args.json:
        sys.stdout.write(orjson.dumps([{"key": c.key, "out": str(c.out), "argv": c.command_line(["<ENDPOINT>"], None),
                                        "spec": c.spec.model_dump(mode="json") if c.spec else None,
                                        "error": c.error, "needs": list(c.needs)} for c in exp.cells],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    con = _console()
    con.print(f"[bold]{exp.plan.name}[/]: {len(exp.cells)} cells under {exp.out}", highlight=False)
    for c in exp.cells:
        con.print(f"[cyan]{c.key}[/]", highlight=False)
        con.print("  " + shlex.join(c.command_line([f"<{c.model} endpoint>"], None)), highlight=False, soft_wrap=True)
        if c.error:
            con.print(f"  [red]not accepted[/]: {c.error}", highlight=False, soft_wrap=True)
    for what, why in exp.skipped:
        con.print(f"[dim]not a cell: {what}: {why}[/]", highlight=False)
    return 0


def _cmd_status(args) -> int:
    from rich.table import Table

    exp = _expansion(args)
    kinds = _runner().kinds()
    states = [(c, cell_state(c, kinds, scores=True)) for c in exp.cells]
    jobs = cell_jobs(exp.out)
    if args.json:
        sys.stdout.write(orjson.dumps([{"key": c.key, "state": s.state, "detail": s.detail, "lines": s.lines, "hca": s.hca,
                                        "leaf_acc": s.leaf, "out": str(c.out), "job": jobs.get(c.key)}
                                       for c, s in states],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        t = Table(title=f"plan {exp.plan.name} ({exp.out})")
        cols = ("cell", "state", "lines", "HCA/acc", "leaf", *(("job",) if jobs else ()), "note")
        for col in cols:
            t.add_column(col, justify="right" if col in ("lines", "HCA/acc", "leaf") else "left", overflow="fold")
        colour = {"done": "green", "partial": "yellow", "missing": "white", "blocked": "red"}
        for c, s in states:
            j = jobs.get(c.key)
            job = (f"{j['job_id']} {j['state']}" + (f" (restart {j['restarts']})" if j.get("restarts") else "")
                   if j else "")
            t.add_row(c.key, f"[{colour[s.state]}]{s.state}[/]", f"{s.lines:,}" if s.lines else "",
                      f"{s.hca:.2f}" if s.hca is not None else "", f"{s.leaf:.2f}" if s.leaf is not None else "",
                      *((job,) if jobs else ()), s.detail)
        con = _console()
        con.print(t)
        counts = {k: sum(s.state == k for _, s in states) for k in ("done", "partial", "missing", "blocked")}
        con.print(f"{len(states)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()), highlight=False)
        needs = sorted({n for c, s in states if s.state != "done" for n in c.needs})
        if needs:
            con.print("unset variables: " + ", ".join(needs) + " (--set NAME=VALUE or export NAME=...)", highlight=False)
        missing = sorted({c.data for c, s in states if s.state == "blocked" and s.detail.startswith("no data")})
        for m in missing:
            con.print(f"[red]missing data file[/]: {m}", highlight=False)
    return 0 if all(s.state == "done" for _, s in states) else 3


def _cmd_run(args) -> int:
    exp = _expansion(args, shlex.split(args.run_args or ""))
    eps = parse_assignments(args.endpoint, "--endpoint")
    known = set(exp.entries) | {e.profile for e in exp.entries.values() if e.profile}
    for k in eps:
        if k not in known:
            raise ValueError(f"--endpoint {k}=...: {k!r} is not a selected model of plan {exp.plan.name} ({', '.join(exp.entries)})")
    if args.executor == "slurm":
        from harness.study.slurm import SlurmUnavailable, submit_plan

        if args.dry_run or args.gpus is not None:
            raise ValueError(f"--executor slurm: {'--dry-run' if args.dry_run else '--gpus'} is for the local "
                             "executor (a job uses the GPUs SLURM gives it)")
        try:
            outcomes = submit_plan(exp, _slurm_options(exp.plan.slurm, args), endpoints=eps, wait=args.wait)
        except SlurmUnavailable as e:
            print(f"harness plan: error: {e}", file=sys.stderr)
            return 2
    else:
        gpus = parse_gpus(args.gpus) if args.gpus is not None else None
        outcomes = run_plan(exp, endpoints=eps, fail_fast=args.fail_fast, dry_run=args.dry_run, gpus=gpus)
    con = _console()
    for o in outcomes:
        colour = "green" if o.result in ("done", "skipped (done)") else "yellow" if o.result.startswith(
            ("would", "submitted", "queued")) else "red"
        con.print(f"[{colour}]{o.result}[/]: {o.key}", highlight=False, soft_wrap=True)
    done = sum(o.result in ("done", "skipped (done)") for o in outcomes)
    sent = sum(o.result.startswith(("submitted", "queued")) for o in outcomes)
    con.print(f"plan {exp.plan.name}: {done}/{len(exp.cells)} cells done"
              + (f", {sent} in SLURM jobs (`harness plan status` shows them)" if sent else ""), highlight=False)
    if args.dry_run:
        return 0
    if any(o.rc == 7 for o in outcomes):
        return 7
    return 0 if done + sent == len(exp.cells) else 3


def _slurm_options(base: SlurmSection, args) -> SlurmSection:
    """The plan's [slurm] section with the command line's flags over it."""
    upd = {k: getattr(args, k) for k in ("partition", "account", "time", "gpus_per_node", "cpus_per_task", "mem_gb",
                                         "cells_per_job") if getattr(args, k) is not None}
    if args.whole_node:
        upd["whole_node"] = True
    if args.sbatch:
        upd["sbatch"] = {**base.sbatch, **{k: v[-1] for k, v in parse_assignments(args.sbatch, "--sbatch").items()}}
    if args.setup:
        upd["setup"] = [*base.setup, *args.setup]
    return SlurmSection.model_validate({**base.model_dump(), **upd})


def _cmd_prefetch(args) -> int:
    from harness.study.prefetch import prefetch

    exp = _expansion(args)
    got = prefetch(exp, dry_run=args.dry_run, log=lambda s: print(s, file=sys.stderr, flush=True))
    con = _console()
    failed = 0
    for f in got:
        what = f"{f.repo_id}" + (f"@{f.revision}" if f.revision else "") if f.repo_id else ""
        bad = f.result.startswith("failed")
        failed += bad
        colour = "red" if bad else "dim" if f.result.startswith("skipped") else "green"
        con.print(f"{f.model}: {what + ' -> ' if what else ''}[{colour}]{f.result}[/]", highlight=False, soft_wrap=True)
    return 1 if failed else 0



def add_cli(sub) -> None:
    p = sub.add_parser("plan", help="experiment plans: expand, run (resumable, one server per model), status")
    ps = p.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)
    e = ps.add_parser("expand", help="list the cells of a plan and their commands")
    _common(e)
    e.add_argument("--json", action="store_true",
                   help="print the cells as JSON: key, run folder, command line, RunSpec, error, unset variables")
    e.set_defaults(func=_cmd_expand)
    s = ps.add_parser("status", help="done / partial / missing / blocked cells, with HCA of finished ones "
                      "and the SLURM job of each cell")
    _common(s)
    s.add_argument("--json", action="store_true",
                   help="print the cells as JSON: key, state, detail, result lines, HCA, leaf accuracy, run folder")
    s.set_defaults(func=_cmd_status)
    r = ps.add_parser("run", help="run every cell not done yet (resumable, one server per model)")
    _common(r)
    r.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="where model NAME (plan name or profile) is served; repeat for several servers")
    r.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell (default: go on)")
    r.add_argument("--dry-run", action="store_true", help="say what would run; start and send nothing")
    r.add_argument("--run-args", metavar="'ARGS'", help="extra arguments for every cell, e.g. '--concurrency 256' "
                   "(transport only: answer-changing flags make a started cell refuse to resume)")
    r.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local (default): servers on this machine's GPUs, models side by side when they fit; "
                        "slurm: one requeueable job per model (group of cells) through submitit")
    r.add_argument("--gpus", metavar="IDS|N", help="local: the GPUs to use, e.g. 0,1,2,3 or 4 "
                   "(default: $CUDA_VISIBLE_DEVICES, else nvidia-smi)")
    g = r.add_argument_group("slurm executor (override the plan's [slurm] section)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--time", help="time limit of a job: minutes or HH:MM:SS or D-HH:MM:SS (requeued at the limit)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs of a node (with --whole-node: all of them per job)")
    g.add_argument("--whole-node", action="store_true", default=None,
                   help="one whole node per job; the server runs as many data-parallel replicas as fit")
    g.add_argument("--cpus-per-task", type=int, help="CPUs of a job")
    g.add_argument("--mem-gb", type=float, help="memory of a job in GB")
    g.add_argument("--cells-per-job", type=int, help="at most N cells per job (default: all of a model's)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="a further sbatch option, e.g. qos=high or constraint=h100 (repeatable)")
    g.add_argument("--setup", action="append", default=[], metavar="'SHELL LINE'",
                   help="a shell line run in the job before Python, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--wait", action="store_true", help="wait for the jobs and print their cells' outcomes")
    r.set_defaults(func=_cmd_run)
    f = ps.add_parser("prefetch", help="download a plan's models into the Hugging Face cache (HF_HOME) for "
                      "offline jobs (run on a machine that reaches the hub, e.g. a login node)")
    _common(f)
    f.add_argument("--dry-run", action="store_true", help="list what would be downloaded")
    f.set_defaults(func=_cmd_prefetch)
