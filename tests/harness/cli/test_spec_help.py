"""Flags that are RunSpec fields take their help from the field's docstring (one source)."""

from __future__ import annotations

import argparse

from harness.cli import build_parser
from harness.runs.spec import ClassifyTask, EndpointBackend, RunSpec


def _sub(p: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for n in names:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[n]
    return p


def _help(p: argparse.ArgumentParser, flag: str) -> str:
    return next(a.help for a in p._actions if flag in a.option_strings)


def test_run_and_classify_flags_use_the_field_docs():
    root = build_parser()
    retries = EndpointBackend.model_fields["max_retries"].description.rstrip(".")
    for cmd in (("run",), ("batch", "submit"), ("classify", "run"), ("classify", "wikiqa")):
        assert _help(_sub(root, *cmd), "--max-retries").lower() == retries.lower()
    # the task's field comes first where a name means two things
    assert _help(_sub(root, "classify", "run"), "--seed") == "seed of the candidate stream"
    assert _help(_sub(root, "run"), "--seed").startswith("sampling seed")
    # a spec-style reference reads as the flag
    assert "--answer logprobs" in _help(_sub(root, "run"), "--top-logprobs")
    assert ClassifyTask.model_fields["seed"].description and RunSpec.model_fields["seed"].description
