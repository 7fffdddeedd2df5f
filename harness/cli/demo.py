"""`harness demo`: the whole flow offline (harness.demo), with the run's lines and the report printed
as `harness run` and `harness report` print them."""

from __future__ import annotations

from harness.cli.run import print_result
from harness.demo import NOTE, run_demo
from harness.metrics.report import render_table, rows


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo: tiny random model, real local server, CUB items")
    p.add_argument("--out", default="runs/demo", help="folder for the model, images and run")
    p.add_argument("--items", type=int, default=40, help="how many CUB images")
    p.add_argument("--mode", choices=["image", "text"], default="image",
                   help="image: the images and the question; text: the leaf name replaces the image (text-only mode)")
    p.add_argument("--endpoint", help="use this server instead of starting one (its model must accept images)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    result, summary = run_demo(args.out, args.items, args.mode, args.endpoint)
    rc = print_result(result)
    if summary is None:
        return rc
    render_table(rows([summary["run"]]))
    print(NOTE.format(run=result.out))
    return rc
