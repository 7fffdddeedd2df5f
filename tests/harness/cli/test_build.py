"""`harness build` and `harness distractor-stats` (harness/cli/build.py)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

import harness.cli
from harness.cli import main
from harness.data.items import read_items

REPO = Path(__file__).resolve().parents[3]
CUB_RANDOM = REPO / "data/hierarchy/CUB200_with_random_choice.jsonl"
SHIPPED_COMMANDS = list(harness.cli.COMMANDS)


@pytest.fixture(autouse=True)
def _only_these_commands(monkeypatch):
    """`main` with this command module alone: its parsing and exit codes, whatever the other commands do."""
    monkeypatch.setattr(harness.cli, "COMMANDS", ["harness.cli.build"])


def test_the_build_commands_are_registered_from_the_cli_package():
    assert "harness.cli.build" in SHIPPED_COMMANDS and "harness.data.build" not in SHIPPED_COMMANDS
    parser = harness.cli.build_parser()
    assert parser.parse_args(["distractor-stats", "x.jsonl"]).command == "distractor-stats"


def test_cli_build_and_stats(tmp_path, capsys):
    out = tmp_path / "sub" / "items.jsonl"
    rc = main(["build", "--taxonomy", "cub", "--images", str(CUB_RANDOM), "--out", str(out),
               "--choices", "siblings", "--limit", "50"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "50 items, 200 questions" in text and "skipped 0" in text
    items = list(read_items(out))
    assert len(items) == 50 and items[0].taxonomy == "cub"
    assert [p.name for p in out.parent.iterdir()] == ["items.jsonl"]  # no temp file left
    rc = main(["distractor-stats", str(out), "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["taxonomy"] == "cub" and [lv["level"] for lv in stats["levels"]] == [2, 3, 4]
    assert all(lv["distractors"] == 150 for lv in stats["levels"])
    rc = main(["distractor-stats", str(CUB_RANDOM), "--taxonomy", "cub"])
    assert rc == 0 and "0.9%" in capsys.readouterr().out


def test_cli_unmatched_strict_and_default(tmp_path, capsys):
    lst = tmp_path / "l.csv"
    lst.write_text("image,label\n/a.jpg,Laysan Albatross\n/b.jpg,Dodo\n")
    out = tmp_path / "o.jsonl"
    assert main(["build", "--taxonomy", "cub", "--images", str(lst), "--out", str(out), "--strict"]) == 2
    assert f"{lst}:3: label 'Dodo'" in capsys.readouterr().err and not out.exists()
    assert main(["build", "--taxonomy", "cub", "--images", str(lst), "--out", str(out), "--no-lowercase"]) == 0
    cap = capsys.readouterr()
    assert "unmatched label: 1" in cap.out and f"{lst}:3" in cap.err
    [rec] = map(orjson.loads, out.read_bytes().splitlines())
    assert rec["level4"] == "Laysan Albatross"  # --no-lowercase keeps the taxonomy's case
    lst.write_text("image,label\n/b.jpg,Dodo\n")
    assert main(["build", "--taxonomy", "cub", "--images", str(lst), "--out", str(tmp_path / "x.jsonl")]) == 1
    assert not (tmp_path / "x.jsonl").exists()
