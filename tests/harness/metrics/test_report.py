"""`harness report`: JSON, several inputs, CSV and markdown files, reference-format input."""

from __future__ import annotations

import csv
import io
import json

import pytest
from rich.console import Console

from harness.metrics.report import render_table, resolve, rows, summarize_path, to_csv, to_markdown
from harness.runs.results import write_jsonl

KEYS = ("n_items", "hca", "leaf_acc", "por", "strict_por", "tor", "per_level")


def _line(qid, item, level, truth, pred, **kw):
    return {"qid": qid, "item": item, "level": level, "truth": truth, "choices": {"A": truth, "B": "other"},
            "letter": None, "prediction": pred, "raw": pred, "error": None, "scored": True, **kw}


def _run_dir(tmp_path, name, n_right_leaf=1):
    """Two CUB-like items of 4 levels. Item 1 all right; item 2 wrong at level 2 (and at the leaf
    unless n_right_leaf == 2)."""
    d = tmp_path / name
    d.mkdir()
    lines = []
    for k in range(1, 5):
        lines.append(_line(f"a{k}", "img1", k, f"t{k}", f"T{k}"))
        wrong = k == 2 or (k == 4 and n_right_leaf < 2)
        lines.append(_line(f"b{k}", "img2", k, f"t{k}", "other" if wrong else f"t{k}"))
    write_jsonl(d / "results.jsonl", lines)
    return d


def test_report_json_single_run(tmp_path, cli):
    d = _run_dir(tmp_path, "run1")
    rc, out, err = cli("report", "--json", d)
    assert rc == 0, err
    j = json.loads(out)
    assert isinstance(j, dict)
    for k in KEYS:
        assert k in j
    assert j["n_items"] == 2
    assert j["hca"] == 50.0 and j["leaf_acc"] == 50.0
    assert j["por"] == 75.0  # (4/4 + 2/4) / 2
    assert j["strict_por"] == 62.5  # (1 + 1/4) / 2
    assert j["tor"] == 50.0  # (3/3 + 0/3) / 2
    assert j["per_level"] == {"1": 100.0, "2": 50.0, "3": 100.0, "4": 50.0}
    assert j["n_questions"] == 8 and j["n_unanswered"] == 0
    assert j["run"] == str(d)
    # a results.jsonl path works the same as its folder
    rc, out2, _ = cli("report", "--json", d / "results.jsonl")
    assert json.loads(out2) | {"run": None} == j | {"run": None}


def test_report_several_inputs_give_a_list(tmp_path, cli):
    d1, d2 = _run_dir(tmp_path, "run1"), _run_dir(tmp_path, "run2", n_right_leaf=2)
    rc, out, _ = cli("report", "--json", d1, d2)
    assert rc == 0
    j = json.loads(out)
    assert isinstance(j, list) and [x["run"] for x in j] == [str(d1), str(d2)]
    assert [x["leaf_acc"] for x in j] == [50.0, 100.0]
    assert [x["hca"] for x in j] == [50.0, 50.0]


def test_report_csv_and_markdown_files(tmp_path, cli):
    d1, d2 = _run_dir(tmp_path, "run1"), _run_dir(tmp_path, "run2", n_right_leaf=2)
    c, m = tmp_path / "out.csv", tmp_path / "out.md"
    rc, out, _ = cli("report", d1, d2, "--csv", c, "--markdown", m)
    assert rc == 0
    table = list(csv.DictReader(io.StringIO(c.read_text())))
    assert [r["run"] for r in table] == [str(d1), str(d2)]
    assert [float(r["leaf_acc"]) for r in table] == [50.0, 100.0]
    assert [float(r["level2"]) for r in table] == [50.0, 50.0]
    assert [int(r["n_items"]) for r in table] == [2, 2]
    md = m.read_text().strip().splitlines()
    assert len(md) == 4  # header, separator, one row per input
    assert md[0].startswith("| run | items | HCA |") and md[1].startswith("|---|")
    assert md[2].startswith(f"| {d1} | 2 | 50.00 |") and md[3].startswith(f"| {d2} | 2 | 50.00 |")
    assert "run1" in out and "run2" in out  # the rich table is printed without --json


def test_report_reference_format_input(tmp_path, cli):
    data = [
        {"image": "/a.jpg", "label": "x", "ground_truth_level1": "Animalia", "predicted_level1": "Animalia",
         "ground_truth_level2": "Chordata", "predicted_level2": "Chordata",
         "ground_truth_level3": "Aves", "predicted_level3": "Unknown"},
        {"image": "/b.jpg", "label": "y", "ground_truth_level1": "Animalia", "predicted_level1": "Plantae",
         "ground_truth_level2": "Chordata", "predicted_level2": "chordata",
         "ground_truth_level3": "Aves", "predicted_level3": "aves"},
    ]
    f = tmp_path / "qwen_inat.json"
    f.write_text("\n  " + json.dumps(data, indent=4))  # leading whitespace: still a JSON list
    rc, out, err = cli("report", "--json", f)
    assert rc == 0, err
    j = json.loads(out)
    assert j["n_items"] == 2 and j["hca"] == 50.0 and j["per_level"] == {"2": 100.0, "3": 50.0}
    rc, out, _ = cli("report", "--json", "--score-from", "1", f)
    j = json.loads(out)
    assert j["hca"] == 0.0 and j["per_level"] == {"1": 50.0, "2": 100.0, "3": 50.0}


def test_report_missing_input(tmp_path, cli):
    rc, out, err = cli("report", "--json", tmp_path / "nope")
    assert rc == 2 and "nope" in err and out == ""
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    rc, _, err = cli("report", empty)
    assert rc == 2 and "no results.jsonl" in err


def test_resolve_and_rows(tmp_path):
    d = _run_dir(tmp_path, "r")
    assert resolve(d) == d / "results.jsonl"
    with pytest.raises(FileNotFoundError):
        resolve(tmp_path / "missing")
    (name, s), = rows([str(d)])
    assert name == str(d) and s.n_items == 2
    assert summarize_path(d).hca == 50.0


def test_render_functions_on_several_runs(tmp_path):
    results = rows([str(_run_dir(tmp_path, "a")), str(_run_dir(tmp_path, "b", 2))])
    buf = io.StringIO()
    render_table(results, Console(file=buf, width=250))
    text = buf.getvalue()
    assert "50.00" in text and "100.00" in text and "L4" in text
    assert to_csv(results).count("\n") == 3
    assert to_markdown(results).count("\n") == 4
