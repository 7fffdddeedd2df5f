"""Every option of every command says what it does (`harness CMD --help`)."""

from __future__ import annotations

import argparse

from harness.cli import build_parser


def _parsers(p: argparse.ArgumentParser, name: str = "harness"):
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                yield from _parsers(sp, f"{name} {sub}")


def test_every_option_has_help_text():
    missing = []
    for name, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            if not (a.help or "").strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, "\n".join(missing)
