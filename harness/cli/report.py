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
    r.add_argument("--html", metavar="OUT.html",
                   help="also write one self-contained HTML report (figures, taxonomy map, failure gallery)")
    r.add_argument("--score-from", type=int, default=None,
                   help="reference-format files: first scored level (default: 1, or 2 when level 1 is the root)")
    r.set_defaults(func=cmd_report)


def _name(p: str) -> str:
    q = Path(p)
    return str(q.parent if q.name == "results.jsonl" else q).rstrip("/") or str(q)


def _classification(path: str) -> dict | None:
    """The summary of a classification run folder (classify, loglik, wikiqa), else None."""
    from harness.runs.report import CLASSIFICATION_KINDS, run_kind

    kind = run_kind(path)
    if kind not in CLASSIFICATION_KINDS and kind != "generation":  # generation: classify, older folders
        return None
    from harness.runs.classification import OLD_KINDS, summarize_folder

    p = Path(path)
    return {"kind": OLD_KINDS.get(kind, kind)} | summarize_folder(p if p.is_dir() else p.parent)


def cmd_report(args) -> int:
    cls = {p: s for p in args.paths if (s := _classification(p)) is not None}
    hier = [p for p in args.paths if p not in cls]
    results = rows(hier, args.score_from) if hier else []
    by_path = dict(zip(hier, results))
    if args.csv:
        Path(args.csv).write_text(to_csv(results))
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(results))
    if args.html:
        from harness.view.report import write_html

        folders = [str(Path(p).parent) if Path(p).is_file() else p for p in args.paths]
        print(f"harness report: wrote {write_html(folders, args.html)}", file=sys.stderr)
    if args.json:
        objs = [cls[p] | {"run": _name(p)} if p in cls else by_path[p][1].to_json() | {"run": by_path[p][0]}
                for p in args.paths]
        sys.stdout.write(orjson.dumps(objs[0] if len(objs) == 1 else objs, option=orjson.OPT_INDENT_2
                                      | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    else:
        if results:
            render_table(results)
        if cls:
            from harness.runs.classification import summary_lines

            for p, s in cls.items():
                print(f"== {_name(p)} ({s['kind']})")
                print("\n".join(summary_lines(s["kind"], s)))
    return 0
