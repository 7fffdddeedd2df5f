"""The `harness` command line: one module per command, each turning arguments into library calls.

Nothing outside this package imports it (tests/harness/test_imports.py checks).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from harness import __version__

# Command modules, each with add_cli(subparsers). Probes and finetune bring their own.
COMMANDS = [
    "harness.cli.run",
    "harness.cli.report",
    "harness.cli.show",
    "harness.cli.data",
    "harness.cli.build",
    "harness.cli.batch",
    "harness.cli.serve",
    "harness.cli.demo",
    "harness.cli.clip",
    "harness.cli.classify",
    "harness.cli.plan",
    "harness.cli.analyze",
    "harness.cli.view",
    "probes.cli",
    "finetune.cli",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Evaluate hierarchical visual understanding of VLMs.")
    p.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).add_cli(sub)
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
