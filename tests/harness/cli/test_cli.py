"""The `harness` command line: data stats, taxonomy, exit codes."""

from __future__ import annotations

import json

import pytest

import harness
import harness.cli


def test_data_stats_json_on_cub(cub_similar, cli):
    rc, out, err = cli("data", "stats", cub_similar, "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["items"] == 5794
    assert s["questions"] == 23176 and s["scored_questions"] == 23176
    assert [s["levels"][k]["distinct_truths"] for k in ("1", "2", "3", "4")] == [13, 37, 124, 200]
    assert [s["levels"][k]["questions"] for k in ("1", "2", "3", "4")] == [5794] * 4
    assert s["depths"] == {"4": 5794}
    assert s["skipped_lines"] == []


def test_data_stats_table(cub_similar, cli):
    rc, out, _ = cli("data", "stats", cub_similar)
    assert rc == 0
    assert "5,794 items" in out and "23,176 questions" in out
    assert "13/37/124/200" in out


def _bad_file(tmp_path):
    good = {"image": "/a.jpg", "label": "a", "level1": "x", "choices_level1": ["x", "y"]}
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(good | {"level1": "z"}) + "\n"
                 + json.dumps(good | {"image": "/b.jpg"}) + "\n")
    return f


def test_data_stats_invalid_line_non_strict(tmp_path, cli):
    f = _bad_file(tmp_path)
    rc, out, _ = cli("data", "stats", f, "--json")
    s = json.loads(out)
    assert s["items"] == 2 and len(s["skipped_lines"]) == 1
    assert s["skipped_lines"][0].startswith(f"{f}:2: field 'choices_level1'")
    assert rc == 1  # invalid input: non-zero, with the lines named


def test_data_stats_invalid_line_strict(tmp_path, cli):
    f = _bad_file(tmp_path)
    rc, _, err = cli("data", "stats", f, "--strict")
    assert rc == 2
    assert f"{f}:2" in err and "choices_level1" in err and "not among the choices" in err


def test_data_stats_missing_file(tmp_path, cli):
    rc, _, err = cli("data", "stats", tmp_path / "nope.jsonl")
    assert rc == 2 and "nope.jsonl" in err


def test_taxonomy_command(cli):
    rc, out, _ = cli("taxonomy", "cub", "imagenet_artifact")
    assert rc == 0
    assert "13/37/124/200" in out and "1/5/40/149/205/162/62/44" in out
    assert "sports equipment" in out and "warning" in out
    rc, out, _ = cli("taxonomy")
    assert rc == 0 and "1/6/27/152/715/2988/5388" in out and "1/6/29/40/24" in out


def test_taxonomy_check_all_as_documented(cli):
    rc, out, _ = cli("taxonomy", "check", "--all")
    assert rc == 0 and "1/5/14/85/286/1702/4271" in out and "1/2/10/37/81/123/81/65/41/64/34/2" in out


def test_taxonomy_malformed_file(tmp_path, cli):
    f = tmp_path / "broken_tax.json"
    f.write_text('{"leaf": []}')
    rc, _, err = cli("taxonomy", f)
    assert rc == 2 and str(f) in err


def test_no_command_prints_help(cli):
    rc, out, _ = cli()
    assert rc == 2 and "report" in out and "data" in out


def test_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as ei:
        harness.cli.main(["--version"])
    assert ei.value.code == 0
    assert harness.__version__ in capsys.readouterr().out
