"""The `harness` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

import orjson

from harness import __version__

# Modules that add their own subcommands: each exposes add_cli(subparsers).
_PLUGINS = ["harness.data.build", "harness.runs.runner", "harness.backends.batch", "harness.serving.profiles", "harness.demo", "harness.cli.clip", "harness.cli.classify", "harness.study.plans", "probes.cli", "finetune.cli"]


def _cmd_report(args) -> int:
    from harness.metrics.report import main as report_main

    return report_main(args)


def _cmd_stats(args) -> int:
    from harness.data.stats import print_stats, stats

    s = stats(args.file, strict=args.strict)
    if args.json:
        # FIX: `depths` and per-level `options` are keyed by int, which orjson refuses without
        # OPT_NON_STR_KEYS: `harness data stats --json` crashed with "Dict key must be str".
        sys.stdout.write(orjson.dumps(s, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")
    else:
        print_stats(s)
    # FIX: was `skipped_lines and args.strict`, which never holds (strict mode raises at the first bad
    # line), so a file with invalid lines exited 0. Contract: invalid input -> non-zero exit; the
    # skipped lines (file:line: field: reason) are printed above.
    return 1 if s["skipped_lines"] else 0


def _cmd_taxonomy(args) -> int:
    from rich.console import Console

    from harness.data.taxonomy import TAXONOMIES, load_taxonomy

    con = Console()
    names = list(args.taxonomy)
    if names[:1] == ["check"]:  # FIX: taxonomies/README.md documents `harness taxonomy check --all`
        names = names[1:]
    names = list(TAXONOMIES) if args.all or not names else names
    for name in names:
        tax = load_taxonomy(name)
        depth = "/".join(str(len(d)) for d in tax.names_by_depth())
        title = tax.info.display_name if tax.info else str(tax.source)
        con.print(f"[bold]{title}[/] ({tax.source.name}): {len(tax.paths):,} leaves, distinct names per depth {depth}")
        for w in tax.warnings:
            con.print(f"  [yellow]warning[/]: {w}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Evaluate hierarchical visual understanding of VLMs.")
    p.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("report", help="metrics of finished runs, side by side")
    r.add_argument("paths", nargs="+", metavar="DIR_OR_FILE", help="run folder, results.jsonl, or a reference-format JSON list")
    r.add_argument("--json", action="store_true", help="print one JSON object (a list for several inputs)")
    r.add_argument("--csv", metavar="FILE")
    r.add_argument("--markdown", metavar="FILE")
    r.add_argument("--score-from", type=int, default=None,
                   help="reference-format files: first scored level (default: 1, or 2 when level 1 is the root)")
    r.set_defaults(func=_cmd_report)

    d = sub.add_parser("data", help="inspect annotation files")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    st = dsub.add_parser("stats", help="items, questions per level, distinct truths, option counts")
    st.add_argument("file")
    st.add_argument("--json", action="store_true")
    st.add_argument("--strict", action="store_true", help="stop at the first invalid line (default: skip and report)")
    st.set_defaults(func=_cmd_stats)

    t = sub.add_parser("taxonomy", help="validate and describe taxonomies")
    t.add_argument("taxonomy", nargs="*", help="taxonomy ids or files (default: all shipped)")
    t.add_argument("--all", action="store_true")
    t.set_defaults(func=_cmd_taxonomy)

    for mod in _PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # not written yet
                continue
            raise
        m.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from harness.data.items import ItemError

    try:
        return int(args.func(args) or 0)
    except (ItemError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
