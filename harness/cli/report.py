"""`harness report`: metrics of one or more runs, side by side (rich table, JSON, CSV, markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from harness.metrics.hierarchy import Summary
from harness.metrics.report import render_table, to_csv, to_markdown
from harness.runs.report import CLASSIFICATION_KINDS
from harness.runs.report import summarize_path as summarize_any


def add_cli(sub) -> None:
    r = sub.add_parser("report", help="metrics of finished runs, side by side")
    r.add_argument("paths", nargs="+", metavar="DIR_OR_FILE", help="run folder, results.jsonl, or a reference-format JSON list")
    r.add_argument("--json", action="store_true", help="print one JSON object (a list for several inputs)")
    r.add_argument("--csv", metavar="FILE",
                   help="also write the hierarchy runs' metrics to FILE as CSV: one row per run, every metric, "
                        "the HCA 95%% interval and per-level accuracy")
    r.add_argument("--markdown", metavar="FILE",
                   help="also write the hierarchy runs' table to FILE as Markdown (HCA, 95%% CI, leaf, POR, "
                        "strict POR, TOR, per-level accuracy)")
    r.add_argument("--html", metavar="OUT.html",
                   help="also write one self-contained HTML report (figures, taxonomy map, failure gallery)")
    r.add_argument("--reference-format", metavar="OUT.json",
                   help="also write the run in the reference result format (a JSON list of dicts with "
                        "ground_truth_levelN / predicted_levelN; binary runs: what metric_binary.py reads), "
                        "so the authors' utils/metric.py or utils/metric_binary.py reads it unchanged; one "
                        "hierarchy run only")
    r.add_argument("--score-from", type=int, default=None,
                   help="reference-format files: first scored level (default: 1, or 2 when level 1 is the root)")
    r.set_defaults(func=cmd_report)


def _name(p: str) -> str:
    q = Path(p)
    return str(q.parent if q.name == "results.jsonl" else q).rstrip("/") or str(q)


def incomplete_note(name: str, s: dict) -> str | None:
    """One warning line for a run whose numbers are not (yet) a result."""
    answered = (s.get("n_questions") or 0) - (s.get("n_unanswered") or 0)
    if s.get("n_questions") and answered <= 0:
        return f"warning: {name}: no question was answered; its numbers are not a result"
    if s.get("complete"):
        return None
    parts = [f"status {s['status']}" if s.get("status") else "no run.json: cannot tell whether it is finished"]
    if s.get("n_not_asked"):
        parts.append(f"{s['n_not_asked']:,} question(s) not asked yet")
    if s.get("n_failed"):
        parts.append(f"{s['n_failed']:,} failed")
    return f"warning: {name} is incomplete ({', '.join(parts)}): its numbers may change"


def _as_summary(d: dict) -> Summary:
    """The table's view of a summary dict (the fields Summary has)."""
    fields = Summary.__dataclass_fields__
    return Summary(**{k: tuple(v) if k.endswith("_ci") else v for k, v in d.items() if k in fields})


def _wikiqa_stream(paths: list[str], cls: dict[str, dict]) -> None:
    """ImageWikiQA runs of protocol reference: their random guesses continue one stream across the runs,
    in the order given (the reference notebook's seed-once loop over its output files)."""
    from harness.runs.classification import read_manifest, score_wikiqa_stream

    chain = [p for p in paths if p in cls and cls[p]["kind"] == "wikiqa"
             and read_manifest(p).get("settings", {}).get("protocol") == "reference"]
    if len(chain) > 1:
        for p, s in zip(chain, score_wikiqa_stream(chain)):
            cls[p] = cls[p] | s  # the chained scores over the run's own (its completeness kept)


def cmd_report(args) -> int:
    # one summary a run, with whether it is complete (an empty or garbage file is refused here)
    summaries = {p: summarize_any(p, args.score_from) for p in args.paths}
    cls = {p: s for p, s in summaries.items() if s["kind"] in CLASSIFICATION_KINDS}
    _wikiqa_stream(args.paths, cls)
    hier = [p for p in args.paths if p not in cls]
    hier_json = {p: summaries[p] for p in hier}
    results = [(_name(p), _as_summary(hier_json[p])) for p in hier]
    if args.reference_format:
        if len(args.paths) != 1 or not hier:
            print("harness report: --reference-format takes one hierarchy run folder or results file",
                  file=sys.stderr)
            return 2
        from harness.metrics.readers import write_reference_export

        n, start, binary = write_reference_export(args.paths[0], args.reference_format)
        how = ("utils/metric_binary.py --file_path" if binary
               else "utils/metric.py" + (" --cub" if start == 1 else "") + " --file_path")
        print(f"harness report: wrote {n:,} records to {args.reference_format} (check: python {how} "
              f"{args.reference_format})", file=sys.stderr)
    if args.csv:
        Path(args.csv).write_text(to_csv(results))
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(results))
    if args.html:
        from harness.view.report import write_html

        folders = [str(Path(p).parent) if Path(p).is_file() else p for p in args.paths]
        print(f"harness report: wrote {write_html(folders, args.html)}", file=sys.stderr)
    if args.json:
        objs = [cls[p] | {"run": _name(p)} if p in cls else hier_json[p] | {"run": _name(p)} for p in args.paths]
        sys.stdout.write(orjson.dumps(objs[0] if len(objs) == 1 else objs, option=orjson.OPT_INDENT_2
                                      | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    else:
        if results:
            render_table(results)
            for p in hier:
                if (warn := incomplete_note(_name(p), hier_json[p])) is not None:
                    print(warn, file=sys.stderr)
        if cls:
            from harness.runs.classification import summary_lines

            for p, s in cls.items():
                print(f"== {_name(p)} ({s['kind']})")
                print("\n".join(summary_lines(s["kind"], s)))
    return 0
