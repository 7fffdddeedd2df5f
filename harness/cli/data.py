"""`harness data stats` and `harness taxonomy`: inspect annotation and taxonomy files."""

from __future__ import annotations

import sys

import orjson


def _cmd_stats(args) -> int:
    from harness.data.stats import print_stats, stats

    s = stats(args.file, strict=args.strict)
    if args.json:
        # `depths` and per-level `options` are keyed by int: orjson needs OPT_NON_STR_KEYS for them
        sys.stdout.write(orjson.dumps(s, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")
    else:
        print_stats(s)
    # invalid input -> non-zero exit (strict mode raised at the first bad line already); the skipped
    # lines (file:line: field: reason) are printed above
    return 1 if s["skipped_lines"] else 0


def _cmd_taxonomy(args) -> int:
    from rich.console import Console

    from harness.data.taxonomy import TAXONOMIES, load_taxonomy

    con = Console()
    names = list(args.taxonomy)
    if names[:1] == ["check"]:  # taxonomies/README.md documents `harness taxonomy check --all`
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


def add_cli(sub) -> None:
    d = sub.add_parser("data", help="inspect annotation files")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    st = dsub.add_parser("stats", help="items, questions per level, distinct truths, option counts")
    st.add_argument("file", help="items JSONL (reference annotation format)")
    st.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    st.add_argument("--strict", action="store_true", help="stop at the first invalid line (default: skip and report)")
    st.set_defaults(func=_cmd_stats)

    t = sub.add_parser("taxonomy", help="validate and describe taxonomies")
    t.add_argument("taxonomy", nargs="*", help="taxonomy ids or files (default: all shipped)")
    t.add_argument("--all", action="store_true",
                   help="every shipped taxonomy, whatever TAXONOMY names (also the default without TAXONOMY)")
    t.set_defaults(func=_cmd_taxonomy)
