"""`harness analyze RUNS... --out DIR`: cross-run analyses, tables and figures (harness.study.analysis)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _pairs(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        a, sep, b = v.partition("=")
        if not sep or not a or not b:
            raise ValueError(f"{flag} {v!r}: expected A=B")
        out.append((a, b))
    return out


def _cmd_analyze(args) -> int:
    try:
        from rich.console import Console

        from harness.study.analysis import (
            CLASSIFICATION_COLUMNS,
            SHORT_COLUMNS,
            analyze,
            classification_rows,
            fmt,
            load_runs,
            render_table,
            table_rows,
        )
    except ModuleNotFoundError as e:  # scipy / matplotlib: the [analysis] extra
        raise ValueError(f"harness analyze needs {e.name}: pip install 'vlm-hierarchy-harness[analysis]'") from None
    runs = load_runs(args.runs)
    cls = classification_rows(args.runs)
    an = analyze(runs, args.out, pair_text=dict(_pairs(args.pair_text, "--pair-text")),
                 compare=_pairs(args.compare, "--compare"), draws=args.draws, classification=cls)
    con = Console(width=None if sys.stdout.isatty() else 200)
    render_table(table_rows(runs), SHORT_COLUMNS, f"{len(runs)} runs", con)
    if cls:
        render_table(cls, CLASSIFICATION_COLUMNS, f"{len(cls)} classification runs", con)
    for c in an.correlations:
        con.print(f"text vs visual HCA ({c.scope}, n={c.n}, {c.n_models} models): Pearson {fmt(c.pearson)} "
                  f"[{fmt(c.pearson_ci[0])}, {fmt(c.pearson_ci[1])}], Spearman {fmt(c.spearman)} "
                  f"[{fmt(c.spearman_ci[0])}, {fmt(c.spearman_ci[1])}]", highlight=False)
    if not an.points:
        con.print("text vs visual: no model with both image and text runs on the same items file", highlight=False)
    for s in an.spreads:
        con.print(f"variant spread {s.model} {s.taxonomy} {s.mode} {s.data}: mean {s.mean:.2f} std {s.std:.2f} "
                  f"min {s.min:.2f} max {s.max:.2f} ({len(s.variants)} variants)", highlight=False)
    for d in an.deltas:
        con.print(f"finetuning {d.taxonomy} {d.mode}: HCA {d.hca_before:.2f} -> {d.hca_after:.2f} ({d.hca_delta:+.2f})",
                  highlight=False)
    con.print(f"wrote {an.files['report']} ({len(an.figures)} figures, {len(an.files) - 2} tables)", highlight=False)
    return 0


def add_cli(sub) -> None:
    a = sub.add_parser("analyze", help="cross-run analyses and figures: text vs visual HCA, leaf-HCA gap, "
                                       "per-level curves, prompt-variant spread, finetuning deltas")
    a.add_argument("runs", nargs="+", metavar="RUN_OR_FOLDER", help="run folders, or folders searched for run folders")
    a.add_argument("--out", required=True, help="folder for tables, figures and report.md")
    a.add_argument("--pair-text", action="append", default=[], metavar="VLM=LLM",
                   help="take the text HCA of model LLM for VLM (e.g. an OG LLM); default: the VLM's own text runs")
    a.add_argument("--compare", action="append", default=[], metavar="BEFORE=AFTER",
                   help="finetuning deltas: runs of model (or under folder) BEFORE vs AFTER")
    a.add_argument("--draws", type=int, default=2000, help="bootstrap draws for correlation intervals")
    a.set_defaults(func=_cmd_analyze)
