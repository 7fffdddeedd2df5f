"""Classification runs through the Python API and the CLI are one run: identical result lines (the shared
schema of DESIGN.md section 4 plus the experiment's fields), and `harness report` reads their folders."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from PIL import Image

import harness
from harness.cli import main
from harness.runs.spec import RunSpec
from tests.support.stub_server import Stub, StubThread

CLASSES = ["bird", "cat", "dog", "fish", "red fox", "oak"]
SCHEMA = ("qid", "item", "level", "truth", "choices", "letter", "prediction", "raw", "error")
_CHOOSE = re.compile(r'Choose one from "([^"]*)"')
KEY_ENV = "HARNESS_TEST_NO_KEY"


class FirstCandidate(Stub):
    def answer(self, text: str) -> str:
        m = _CHOOSE.search(text)
        return f"It is a {m.group(1).split(', ')[0]}." if m else super().answer(text)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls-api")
    (d / "img").mkdir()
    with (d / "items.jsonl").open("w") as f:
        for i in range(10):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(d / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"./data/{i}.png", "label": CLASSES[i % len(CLASSES)], "split": "test"}) + "\n")
    (d / "classes.json").write_text(json.dumps(CLASSES))
    return d


def _lines(folder) -> list[dict]:
    rows = [orjson.loads(x) for x in (folder / "results.jsonl").read_bytes().splitlines()]
    for r in rows:
        r.pop("latency", None)  # timing
    return sorted(rows, key=lambda r: r["qid"])


def test_api_and_cli_write_identical_lines(data, tmp_path):
    with StubThread(FirstCandidate()) as st:
        spec = RunSpec(out=str(tmp_path / "api"), data=str(data / "items.jsonl"),
                       backend={"endpoints": [st.url], "api_key_env": KEY_ENV, "concurrency": 4},
                       task={"kind": "classify", "classes": str(data / "classes.json"), "task": "closed", "k": 3},
                       image_root_map=[f"./data={data / 'img'}"])
        r = harness.run(spec)
        assert r.exit_code == 0 and r.status == "done", r.message
        assert main(["classify", "run", "--data", str(data / "items.jsonl"), "--classes", str(data / "classes.json"),
                     "--task", "closed", "--k", "3", "--image-root-map", f"./data={data / 'img'}",
                     "--endpoint", st.url, "--api-key-env", KEY_ENV, "--concurrency", "4", "--quiet",
                     "--out", str(tmp_path / "cli")]) == 0
    a, c = _lines(tmp_path / "api"), _lines(tmp_path / "cli")
    assert len(a) == 10 and a == c
    for x in a:
        assert all(k in x for k in SCHEMA)
        assert x["level"] is None and x["truth"] == x["label"] and x["prediction"] == x["pred"]
        assert list(x["choices"]) == ["A", "B", "C"] and list(x["choices"].values()) == x["candidates"]
    assert r.summary["corrected"]["correct"] == sum(x["candidates"][0] == x["label"] for x in a)
    manifest = json.loads((tmp_path / "api" / "run.json").read_text())
    assert manifest["kind"] == "classify"
    # the recorded spec reproduces the run
    again = RunSpec.model_validate(manifest["spec"])
    assert again.task == spec.task


def test_wikiqa_api_and_cli_and_schema(tmp_path):
    with StubThread(Stub()) as st:
        base = {"backend": {"endpoints": [st.url], "api_key_env": KEY_ENV}, "limit": 5,
                "task": {"kind": "wikiqa", "control": "classname"}}
        r = harness.run(base | {"out": str(tmp_path / "api")})
        assert r.exit_code == 0, r.message
        assert main(["classify", "wikiqa", "--control", "classname", "--limit", "5", "--endpoint", st.url,
                     "--api-key-env", KEY_ENV, "--quiet", "--out", str(tmp_path / "cli")]) == 0
    a, c = _lines(tmp_path / "api"), _lines(tmp_path / "cli")
    assert len(a) == 5 and a == c
    for x in a:
        assert all(k in x for k in SCHEMA)
        assert x["choices"] == x["options"] and set(x["choices"]) == {"A", "B", "C", "D"}
        assert x["letter"] in x["choices"] and x["truth"] == x["label"]


def test_report_reads_a_classification_folder(data, tmp_path, capsys):
    out = tmp_path / "run"
    with StubThread(FirstCandidate()) as st:
        assert main(["classify", "run", "--data", str(data / "items.jsonl"), "--classes", str(data / "classes.json"),
                     "--task", "closed", "--k", "2", "--image-root-map", f"./data={data / 'img'}",
                     "--endpoint", st.url, "--api-key-env", KEY_ENV, "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["report", "--json", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["kind"] == "classify" and got["corrected"] == summary["corrected"]
    assert got["substring"]["accuracy"] == summary["substring"]["accuracy"]
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(classify)" in text and f"{summary['corrected']['accuracy']:.2f}" in text and "corrected" in text
    assert harness.report(out)[0]["corrected"] == summary["corrected"]


def test_old_generation_folder_resumes_and_reports(data, tmp_path, capsys):
    """Folders written before the unified run kinds say `generation`: they resume and report as classify."""
    out = tmp_path / "old"
    with StubThread(FirstCandidate()) as st:
        argv = ["classify", "run", "--data", str(data / "items.jsonl"), "--classes", str(data / "classes.json"),
                "--image-root-map", f"./data={data / 'img'}", "--endpoint", st.url, "--api-key-env", KEY_ENV,
                "--quiet", "--out", str(out), "--limit", "4"]
        assert main(argv) == 0
        m = json.loads((out / "run.json").read_text())
        m["kind"] = "generation"
        (out / "run.json").write_text(json.dumps(m))
        capsys.readouterr()
        assert main(["report", "--json", str(out)]) == 0
        assert json.loads(capsys.readouterr().out)["n"] == 4
        assert main(argv[:-1] + ["6"]) == 0
    assert json.loads((out / "run.json").read_text())["kind"] == "classify"
    assert len(_lines(out)) == 6


def test_analyze_tabulates_classification_runs_beside_hierarchy_runs(data, tmp_path):
    """`harness analyze` reads a classification folder by its kind (its headline accuracy), not as a
    hierarchy run with zero items."""
    from harness.study.analysis import classification_rows, load_runs
    from tests.support.engine_helpers import CUB_SIMILAR

    with StubThread(FirstCandidate()) as st:
        for name, task, d in (("cls", {"kind": "classify", "classes": str(data / "classes.json"), "task": "closed",
                                       "k": 3}, data / "items.jsonl"),
                              ("hier", {"mode": "text"}, CUB_SIMILAR)):
            spec = RunSpec(out=str(tmp_path / "runs" / name), data=str(d), limit=10, task=task,
                           backend={"endpoints": [st.url], "api_key_env": KEY_ENV},
                           image_root_map=[f"./data={data / 'img'}"])
            assert harness.run(spec).exit_code == 0
    runs = load_runs([tmp_path / "runs"])
    assert [r.label for r in runs] == ["hier"] and runs[0].summary.n_items == 10
    (row,) = classification_rows([tmp_path / "runs"])
    summary = harness.report([tmp_path / "runs" / "cls"])[0]
    assert row["kind"] == "classify" and row["n"] == 10 and row["accuracy"] == summary["substring"]["accuracy"]
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "an"), "--draws", "50"]) == 0
    assert "## Classification runs" in (tmp_path / "an" / "report.md").read_text()
    assert (tmp_path / "an" / "classification.csv").read_text().count("\n") == 2


def test_reference_api_preset_and_protocol_flags_reach_the_spec(data, tmp_path):
    """`--preset reference-api` on the command line sends no temperature nor max_tokens (the CLI's own
    defaults must not override the preset); `--protocol` reaches loglik and wikiqa runs."""
    stub = FirstCandidate()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        assert main(["classify", "run", "--data", str(data / "items.jsonl"), "--classes", str(data / "classes.json"),
                     "--task", "closed", "--k", "3", "--image-root-map", f"./data={data / 'img'}", "--limit", "2",
                     "--preset", "reference-api", "--endpoint", st.url, "--api-key-env", KEY_ENV, "--quiet",
                     "--out", str(tmp_path / "p")]) == 0
    assert stub.bodies and all("temperature" not in b and "max_tokens" not in b for b in stub.bodies)
    m = json.loads((tmp_path / "p" / "run.json").read_text())
    assert m["spec"]["task"]["preset"] == "reference-api"
