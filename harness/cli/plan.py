"""`harness plan expand|status|run PLAN`: a study's grid (harness.study), from the command line.

This module only parses arguments: the study package expands a plan into RunSpecs and runs them
(harness.study.executor.SpecRunner); the run results are printed as `harness run` prints them.
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
from harness.study.plan_spec import Vars, load_plan, parse_assignments


def _runner() -> SpecRunner:
    return SpecRunner(on_result=print_result)


def run_plan(exp: Expansion, *, endpoints: dict[str, list[str]] | None = None, launcher: Launcher = launch_server,
             fail_fast: bool = False, dry_run: bool = False, log=None) -> list[Outcome]:
    """harness.study.executor.run_plan with each run's result printed as `harness run` prints it."""
    return _run_plan(exp, _runner(), endpoints=endpoints, launcher=launcher, fail_fast=fail_fast, dry_run=dry_run,
                     log=log)


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
    if args.json:
        sys.stdout.write(orjson.dumps([{"key": c.key, "state": s.state, "detail": s.detail, "lines": s.lines, "hca": s.hca,
                                        "leaf_acc": s.leaf, "out": str(c.out)} for c, s in states],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        t = Table(title=f"plan {exp.plan.name} ({exp.out})")
        for col in ("cell", "state", "lines", "HCA/acc", "leaf", "note"):
            t.add_column(col, justify="right" if col in ("lines", "HCA/acc", "leaf") else "left", overflow="fold")
        colour = {"done": "green", "partial": "yellow", "missing": "white", "blocked": "red"}
        for c, s in states:
            t.add_row(c.key, f"[{colour[s.state]}]{s.state}[/]", f"{s.lines:,}" if s.lines else "",
                      f"{s.hca:.2f}" if s.hca is not None else "", f"{s.leaf:.2f}" if s.leaf is not None else "", s.detail)
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
    outcomes = run_plan(exp, endpoints=eps, fail_fast=args.fail_fast, dry_run=args.dry_run)
    con = _console()
    for o in outcomes:
        colour = "green" if o.result in ("done", "skipped (done)") else "yellow" if o.result.startswith("would") else "red"
        con.print(f"[{colour}]{o.result}[/]: {o.key}", highlight=False, soft_wrap=True)
    done = sum(o.result in ("done", "skipped (done)") for o in outcomes)
    con.print(f"plan {exp.plan.name}: {done}/{len(exp.cells)} cells done", highlight=False)
    if args.dry_run:
        return 0
    return 0 if done == len(exp.cells) else 3



def add_cli(sub) -> None:
    p = sub.add_parser("plan", help="experiment plans: expand, run (resumable, one server per model), status")
    ps = p.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)
    e = ps.add_parser("expand", help="list the cells of a plan and their commands")
    _common(e)
    e.add_argument("--json", action="store_true",
                   help="print the cells as JSON: key, run folder, command line, RunSpec, error, unset variables")
    e.set_defaults(func=_cmd_expand)
    s = ps.add_parser("status", help="done / partial / missing / blocked cells, with HCA of finished ones")
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
    r.set_defaults(func=_cmd_run)
