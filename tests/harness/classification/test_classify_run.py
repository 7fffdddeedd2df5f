"""`harness classify` end to end against the loopback stub (mechanics: streaming loop, retries, resume,
manifest, summaries, scoring commands). Real-server checks are in tests/integration/test_classify_vllm.py."""

from __future__ import annotations

import argparse
import json
import re

import orjson
import pytest
from PIL import Image

from harness.cli.classify import add_cli
from tests.support.stub_server import Stub, StubThread

CLASSES = ["bird", "cat", "dog", "fish", "red fox", "oak", "tench", "goldfish"]
_CHOOSE = re.compile(r'Choose one from "([^"]*)"')


class FirstCandidate(Stub):
    """Answers with the first offered candidate (or a letter for lettered questions)."""

    def answer(self, text: str) -> str:
        m = _CHOOSE.search(text)
        return f"It is a {m.group(1).split(', ')[0]}." if m else super().answer(text)


def classify(*argv) -> int:
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    args = p.parse_args(["classify", *map(str, argv)])
    return args.func(args)


def _lines(path):
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    (d / "img").mkdir()
    with (d / "items.jsonl").open("w") as f:
        for i in range(24):
            Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(d / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"./data/{i}.png", "label": CLASSES[i % len(CLASSES)],
                                "split": "test" if i < 20 else "train"}) + "\n")
    (d / "classes.json").write_text(json.dumps(CLASSES))
    return d


def _gen(data, out, url, *extra):
    return classify("run", "--data", data / "items.jsonl", "--classes", data / "classes.json",
                    "--image-root-map", f"./data={data / 'img'}", "--endpoint", url, "--out", out,
                    "--api-key-env", "HARNESS_TEST_NO_KEY", "--quiet", "--concurrency", 4, *extra)


def test_closed_world_run_scores_and_resumes(data, tmp_path):
    stub = FirstCandidate()
    with StubThread(stub) as st:
        out = tmp_path / "run"
        assert _gen(data, out, st.url, "--task", "closed", "--k", 3) == 0
        lines = _lines(out / "results.jsonl")
        assert len(lines) == 20 and stub.requests == 20  # the test split only
        assert all(x["label"] in x["candidates"] and len(x["candidates"]) == 3 and x["error"] is None for x in lines)
        assert all(x["pred"] == f"It is a {x['candidates'][0]}." for x in lines)
        summary = json.loads((out / "summary.json").read_text())
        expected = sum(x["candidates"][0] == x["label"] for x in lines)
        assert summary["corrected"]["correct"] == expected and summary["exact"]["correct"] == 0  # "It is a X."
        assert summary["mapping"]["how"] == {"direct": 20}
        manifest = json.loads((out / "run.json").read_text())
        assert manifest["kind"] == "classify" and manifest["status"] == "done"
        assert manifest["settings"]["k"] == 3 and manifest["settings"]["stream"] == "hashed"
        # resume: nothing asked again
        assert _gen(data, out, st.url, "--task", "closed", "--k", 3) == 0
        assert stub.requests == 20
        # other answer-changing settings: refused
        with pytest.raises(ValueError, match="other settings"):
            _gen(data, out, st.url, "--task", "closed", "--k", 4)


def test_reference_stream_survives_interruption(data, tmp_path):
    with StubThread(FirstCandidate()) as st:
        a, b = tmp_path / "a", tmp_path / "b"
        assert _gen(data, a, st.url, "--task", "closed", "--k", 4, "--protocol", "reference", "--limit", 5) == 0
        assert _gen(data, a, st.url, "--task", "closed", "--k", 4, "--protocol", "reference", "--limit", 12) == 0
        assert _gen(data, b, st.url, "--task", "closed", "--k", 4, "--protocol", "reference", "--limit", 12) == 0
    ca = {x["qid"]: x["candidates"] for x in _lines(a / "results.jsonl")}
    cb = {x["qid"]: x["candidates"] for x in _lines(b / "results.jsonl")}
    assert len(ca) == 12 and ca == cb


def test_faults_are_retried_and_open_world_questions(data, tmp_path):
    stub = FirstCandidate(faults={"429": 0.3, "500": 0.2, "malformed": 0.1, "drop": 0.1})
    with StubThread(stub) as st:
        out = tmp_path / "open"
        assert _gen(data, out, st.url, "--wording", 2, "--max-retries", 6) == 0
    lines = _lines(out / "results.jsonl")
    assert len(lines) == 20 and all(x["error"] is None for x in lines)
    assert {x["question"] for x in lines} == {"Identify the object in this image."}
    assert sum(stub.faults_sent.values()) > 0
    assert json.loads((out / "run.json").read_text())["stats"]["retried"] == sum(stub.faults_sent.values())


def test_wikiqa_run_and_scores(tmp_path):
    from harness.classification.datasets import data_dir, read_wikiqa

    items = list(read_wikiqa(data_dir() / "imagewikiqa.jsonl"))[:30]
    img = tmp_path / "img"
    img.mkdir()
    for it in items:
        Image.new("RGB", (8, 8)).save(img / it.key.split("/")[-1], format="JPEG")
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        out = tmp_path / "wiki"
        rc = classify("wikiqa", "--endpoint", st.url, "--out", out, "--limit", 30, "--cot", "--quiet",
                      "--image-root-map", f"images={img}", "--api-key-env", "HARNESS_TEST_NO_KEY")
    assert rc == 0
    texts = [b["messages"][0]["content"][1]["text"] for b in stub.bodies]
    assert all(t.endswith("Choose A, B, C, or D. Let's think step by step.") for t in texts)
    expected = sum(Stub().answer(f"{it.text} Let's think step by step.") == it.label for it in items)
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 30 and s["robust"]["correct"] == expected and s["robust"]["unparsed"] == 0
    assert s["reference"]["correct"] == expected and s["reference"]["random_guesses"] == 0


def test_wikiqa_classname_control_is_text_only(tmp_path):
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        rc = classify("wikiqa", "--endpoint", st.url, "--out", tmp_path / "c", "--limit", 3, "--control", "classname",
                      "--quiet", "--api-key-env", "HARNESS_TEST_NO_KEY")
    assert rc == 0
    contents = [b["messages"][0]["content"] for b in stub.bodies]
    assert all(len(c) == 1 and c[0]["type"] == "text" for c in contents)
    assert contents[0][0]["text"].startswith("Which position is particularly important for stretcher")


@pytest.mark.parametrize("method, message", [("trie", "has no /tokenize"), ("prompt-logprobs", "needs vLLM")])
def test_loglik_needs_vllm(data, tmp_path, capsys, method, message):
    with StubThread(Stub()) as st:
        rc = classify("loglik", "--data", data / "items.jsonl", "--classes", data / "classes.json", "--limit", 2,
                      "--image-root-map", f"./data={data / 'img'}", "--endpoint", st.url, "--out", tmp_path / "ll",
                      "--api-key-env", "HARNESS_TEST_NO_KEY", "--quiet", "--method", method)
    assert rc == 4
    assert message in capsys.readouterr().err
    results = tmp_path / "ll" / "results.jsonl"
    assert not results.exists() or not results.read_bytes()  # nothing half-written


def test_dry_run_and_input_errors(data, tmp_path, capsys):
    with StubThread(Stub()) as st:
        assert _gen(data, tmp_path / "d", st.url, "--task", "nway", "--k", 5, "--dry-run") == 0
        out = capsys.readouterr().out
        assert "This image represents an object that belongs to one of the following classes: " in out
        assert "dry run: 20 items to ask" in out and not (tmp_path / "d").exists()
        with pytest.raises(ValueError, match="--request raw needs --template"):
            _gen(data, tmp_path / "e", st.url, "--request", "raw")
        with pytest.raises(ValueError, match="--k applies to"):
            _gen(data, tmp_path / "e", st.url, "--k", 5)


def test_score_and_freq_commands(data, tmp_path, capsys):
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    with StubThread(FirstCandidate()) as st:
        run = tmp_path / "run"
        assert _gen(data, run, st.url, "--task", "closed", "--k", 2) == 0
    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"tench": ["Tinca tinca"]}))
    capsys.readouterr()
    assert classify("score", run, "--json", "--synonyms", syn) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kind"] == "classify" and s["n"] == 20 and set(s["per_class"]) == set(CLASSES)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                              ["a bird and a cat", "the cat sat", "a red fox", "cat", "goldfish bowl"]))
    assert classify("freq", "--corpus", corpus, "--run", run, "--out", tmp_path / "f.json",
                    "--plot", tmp_path / "f.png") == 0
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["counts"]["cat"] == 3 and f["counts"]["fish"] == 0 and f["counts"]["red fox"] == 1
    assert f["correlation"]["n_classes"] == len(CLASSES)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_plugin_wiring(capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(["classify", "--help"])
    assert e.value.code == 0
    assert "loglik" in capsys.readouterr().out
