"""`harness batch submit|collect`: a run through the OpenAI Batch API (library: harness.runs.batch)."""

from __future__ import annotations

import argparse
import asyncio

from harness.backends.http import FatalError
from harness.cli.run import add_run_arguments, spec_from_args
from harness.cli.spec_errors import validated
from harness.runs import batch
from harness.runs.folder import ExitCode, RunLocked


def add_cli(sub) -> None:
    p = sub.add_parser("batch", help="OpenAI Batch API: submit a run as batch files, collect the answers")
    bsub = p.add_subparsers(dest="batch_command", metavar="SUBCOMMAND", required=True)
    s = bsub.add_parser("submit", help="render, upload and create batches (same options as `harness run`)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(s)
    s.set_defaults(func=cmd_submit)
    c = bsub.add_parser("collect", help="download finished batches into DIR/results.jsonl")
    c.add_argument("out", metavar="DIR", help="the run folder given to `harness batch submit` as --out")
    c.add_argument("--wait", action="store_true", help="poll until every batch has ended")
    c.add_argument("--poll", type=float, default=30.0, help="seconds between polls with --wait")
    c.add_argument("--api-key-env", default=None, help="default: the one recorded at submit")
    c.set_defaults(func=cmd_collect)


def cmd_submit(args) -> int:
    spec = validated(spec_from_args, args)
    try:
        return asyncio.run(batch.submit(spec, dry_run=args.dry_run))
    except RunLocked as e:
        print(f"harness: error: {e}")
        return ExitCode.LOCKED
    except FatalError as e:
        print(f"harness: error: {e}")
        return ExitCode.FATAL


def cmd_collect(args) -> int:
    try:
        return asyncio.run(batch.collect(args.out, wait=args.wait, poll=args.poll, api_key_env=args.api_key_env))
    except RunLocked as e:
        print(f"harness: error: {e}")
        return ExitCode.LOCKED
    except FatalError as e:
        print(f"harness: error: {e}")
        return ExitCode.FATAL
