"""`harness report`: metrics of one or more runs, side by side (rich table, JSON, CSV, markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from harness.metrics.report import render_table, rows, to_csv, to_markdown


def add_cli(sub) -> None:
    r = sub.add_parser("report", help="metrics of finished runs, side by side")
    r.add_argument("paths", nargs="+", metavar="DIR_OR_FILE", help="run folder, results.jsonl, or a reference-format JSON list")
    r.add_argument("--json", action="store_true", help="print one JSON object (a list for several inputs)")
    r.add_argument("--csv", metavar="FILE")
    r.add_argument("--markdown", metavar="FILE")
    r.add_argument("--score-from", type=int, default=None,
                   help="reference-format files: first scored level (default: 1, or 2 when level 1 is the root)")
    r.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    results = rows(args.paths, args.score_from)
    if args.csv:
        Path(args.csv).write_text(to_csv(results))
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(results))
    if args.json:
        objs = [s.to_json() | {"run": name} for name, s in results]
        sys.stdout.write(orjson.dumps(objs[0] if len(objs) == 1 else objs, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_table(results)
    return 0
