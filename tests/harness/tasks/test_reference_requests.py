"""Issue 12: what `--protocol reference` sends, checked request by request against the reference scripts
(LLM-Hierarchical-Consistency at c86f23a) re-done here from their documented behaviour, on real CUB items.

The stub records every body it receives; the expected strings are built the way the reference built
them (prompt_template + "\\n" + "A. ..." lines + suffix), never through the project's renderer."""

from __future__ import annotations

import json
import random

import orjson
import pytest

import harness
from harness.data.taxonomy import load_taxonomy
from harness.runs.folder import ExitCode
from harness.runs.hierarchy import HierarchyExperiment
from harness.runs.spec import RunSpec
from tests.support.engine_helpers import CUB_SIMILAR, cub_lines, image_items
from tests.support.stub_server import Stub, StubThread

SUFFIX = "\nAnswer with the option's letter from the given choices directly."
HELPFUL = "You are a helpful assistant."
BINARY_SYSTEM = ("You are an expert in hierarchical image classification. Given an image and a corresponding "
                 "statement, determine whether the statement accurately reflects the content of the image. "
                 "Respond with a single word: Yes or No.")
RANKS = ["order", "family", "genus", "species"]


def ref_levels(entry: dict) -> list[tuple[str, object, list[str]]]:
    keys = sorted(k for k in entry if k.startswith("level") and k[5:].isdigit())
    return [(k[5:], entry[k], list(entry["choices_" + k])) for k in keys]


def ref_question(prompt: str, choices: list[str]) -> str:
    return prompt + "\n" + "\n".join(f"{chr(65 + j)}. {o}" for j, o in enumerate(choices)) + SUFFIX


def ref_gpt_text_questions(entries: list[dict]) -> list[str]:
    """gpt_cub_text.py: every level but the leaf, file order, "Given the {label}, ... at the {rank} level?"."""
    out = []
    for e in entries:
        levels = ref_levels(e)
        for t, (_, _truth, choices) in enumerate(levels):
            if t == len(levels) - 1:
                continue  # the leaf is filled with the label
            out.append(ref_question(f"Given the {e['label']}, what is its taxonomic classification at the "
                                    f"{RANKS[t]} level?", choices))
    return out


def _run(tmp_path, stub: Stub, name: str, data, **kw) -> list[dict]:
    stub.keep_bodies = True
    spec = harness.RunSpec(out=str(tmp_path / name), data=str(data), model="stub-model",
                           backend={"endpoints": [stub_url(stub)]}, **kw)
    assert harness.run(spec).exit_code == ExitCode.OK
    return [orjson.loads(x) for x in (tmp_path / name / "results.jsonl").read_bytes().splitlines()]


_URLS: dict[int, str] = {}


def stub_url(stub: Stub) -> str:
    return _URLS[id(stub)]


@pytest.fixture
def stub():
    s = Stub()
    with StubThread(s) as t:
        _URLS[id(s)] = t.url
        yield s


def _texts(bodies: list[dict]) -> list[str]:
    out = []
    for b in bodies:
        c = b["messages"][-1]["content"]
        out.append(c if isinstance(c, str) else "".join(p["text"] for p in c if p["type"] == "text"))
    return out


# ------------------------------------------------------------------ item 1: GPT-4o text fills the leaf

def test_gpt4o_text_preset_asks_900_questions_on_300_items_as_the_reference(tmp_path, stub):
    entries = cub_lines(300)
    expected = ref_gpt_text_questions(entries)
    assert len(expected) == 900  # the reference asks 3 of 4 levels; the leaf is the label
    lines = _run(tmp_path, stub, "gpt", CUB_SIMILAR, limit=300,
                 task={"mode": "text", "preset": "gpt-4o", "protocol": "reference"})
    # temperature 0.2 under reference: no dedupe, every question is its own request (15,507 of 17,382
    # CUB text prompts are distinct, so dedupe would drop draws here)
    assert len(stub.bodies) == 900
    assert sorted(_texts(stub.bodies)) == sorted(expected)
    b = stub.bodies[0]
    # the reference GPT text request: system helpful, the user turn a list with one text part
    assert b["messages"][0] == {"role": "system", "content": HELPFUL}
    assert all(len(x["messages"]) == 2 and [p["type"] for p in x["messages"][1]["content"]] == ["text"]
               for x in stub.bodies)
    assert {(x["max_tokens"], x["temperature"], x["seed"]) for x in stub.bodies} == {(5, 0.2, 42)}
    assert len(lines) == 1200 and sum(1 for r in lines if r.get("auto")) == 300
    leaf = next(r for r in lines if r.get("auto") and r["item"] == lines[0]["item"])
    assert leaf["prediction"] == entries[0]["label"]


# ------------------------------------------------------------------ item 2: a prompt kind's system wins

def test_binary_run_with_a_profile_gets_the_binary_system_prompt(tmp_path, stub):
    data = image_items(tmp_path, 3)
    _run(tmp_path, stub, "bin", data, task={"mode": "binary", "profile": "qwen2.5-vl-7b", "protocol": "reference"})
    assert len(stub.bodies) == 3 * 16  # 16 statements an image, as the reference's eval_CUB_binary.py
    assert {b["messages"][0]["content"] for b in stub.bodies} == {BINARY_SYSTEM}
    assert {b["max_tokens"] for b in stub.bodies} == {10}  # eval_CUB_binary.py: max_new_tokens=10
    # reference: random.seed(42), shuffle every level's choices, one statement per option in that order
    random.seed(42)
    first = cub_lines(1)[0]
    want = []
    for t, (_, _truth, choices) in enumerate(ref_levels(first)):
        random.shuffle(choices)
        want += [f"The bird in the image belongs to the {RANKS[t]} {o}.\nIs this statement correct? "
                 "Please answer Yes or No." for o in choices]
    assert _texts(stub.bodies[:16]) == want


# ------------------------------------------------------------------ item 3: Qwen2.5-7B base, raw completions

def test_qwen25_base_profile_sends_raw_completions(tmp_path, stub):
    entries = cub_lines(5)
    lines = _run(tmp_path, stub, "base", CUB_SIMILAR, limit=5,
                 task={"mode": "text", "profile": "qwen2.5-7b", "protocol": "reference"})
    # og_llm/qwen/eval_text_og_cub.py --base --prompt_order 1 (the profile's CUB text variant):
    # text = question + " Answer:", no chat template, no system text, max_new_tokens 5, greedy
    want = [q + " Answer:" for q in ref_gpt_text_questions(entries)]
    assert [b["prompt"] for b in stub.bodies] == want
    assert all("messages" not in b for b in stub.bodies)
    assert {(b["max_tokens"], b["temperature"]) for b in stub.bodies} == {(5, 0.0)}
    assert want[0] == ("Given the Black-footed Albatross, what is its taxonomic classification at the order "
                       "level?\nA. procellariiformes\nB. apodiformes\nC. podicipediformes\nD. pelecaniformes\n"
                       "Answer with the option's letter from the given choices directly. Answer:")
    asked = [r for r in lines if not r.get("auto")]
    assert len(asked) == 15 and all(r["error"] is None and r["letter"] in "ABCD" for r in asked)
    assert all(r["raw"].startswith(" ") for r in asked)  # choices[0].text, as sent back


# ------------------------------------------------------------------ item 4: LLaVA-OV text lower-cases

def test_llava_text_lower_cases_the_label(tmp_path):
    entries = cub_lines(20)
    spec = RunSpec(out=str(tmp_path / "o"), data=str(CUB_SIMILAR), model="m", limit=20,
                   task={"mode": "text", "profile": "llava-onevision-7b", "protocol": "reference"})
    exp = HierarchyExperiment(spec, "m")
    bodies = [exp.task.body(q, None) for _, qs in exp.work(set()) for q in qs if q.auto is None]
    # llava/eval_text_cub.py: label = label.lower(); "Given the {label}, ..." (variant 1), file order
    want = [q for e in entries for q in ref_gpt_text_questions([{**e, "label": e["label"].lower()}])]
    assert [b["messages"][1]["content"] for b in bodies] == want
    assert want[0].startswith("Given the black-footed albatross, what is its taxonomic classification")
    assert {b["messages"][0]["content"] for b in bodies} == {HELPFUL}
    assert {b["max_tokens"] for b in bodies} == {5}
    # Qwen's text runs keep the case (its scripts do not lower-case)
    qwen = HierarchyExperiment(spec.model_copy(update={"task": spec.task.model_copy(update={"profile": "qwen2.5-vl-7b"})}), "m")
    q0 = next(q for _, qs in qwen.work(set()) for q in qs)
    assert q0.text.startswith("Given the Black-footed Albatross,")


# ------------------------------------------------------------------ item 5: LLaVA taxonomy in context

def _context() -> str:
    return str(json.loads(load_taxonomy("cub").source.read_text(encoding="utf-8")))


def test_llava_taxonomy_in_context_goes_in_the_user_turn(tmp_path, stub):
    data = image_items(tmp_path, 2)
    _run(tmp_path, stub, "tic", data, task={"profile": "llava-onevision-7b", "taxonomy_in_context": True,
                                            "protocol": "reference"})
    ctx = _context()
    assert len(ctx) == 17137  # the reference's str() of the CUB taxonomy dict
    random.seed(42)
    want = []
    for e in cub_lines(2):
        for t, (_, _truth, choices) in enumerate(ref_levels(e)):
            random.shuffle(choices)
            question = "\n" + ref_question(f"Based on taxonomy, what is the {RANKS[t]} of the bird in this image?",
                                           choices)
            want.append("Here is a taxonomy: " + ctx + "\n" + "<image>" + question)  # eval_CUB_tax_llava.py
    got = []
    for b in stub.bodies:
        parts = b["messages"][-1]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "text"]
        got.append("".join("<image>" if p["type"] == "image_url" else p["text"] for p in parts))
        assert b["messages"][0] == {"role": "system", "content": HELPFUL}  # the profile's, not the taxonomy
        assert b["max_tokens"] == 10
    assert got == want
    assert "D. " in want[0] and "\nAnswer with" in want[0]


def test_qwen_taxonomy_in_context_is_unchanged(tmp_path):
    data = image_items(tmp_path, 1)
    spec = RunSpec(out=str(tmp_path / "o"), data=str(data), model="m",
                   task={"profile": "qwen2.5-vl-7b", "taxonomy_in_context": True, "protocol": "reference"})
    exp = HierarchyExperiment(spec, "m")
    q = next(q for _, qs in exp.work(set()) for q in qs)
    body = exp.task.body(q, None)
    # eval_CUB_tax_qwen.py: system "You are a helpful assistant. Here is a taxonomy: " + context, and no "\n"
    # before the suffix [QUIRK]
    assert body["messages"][0]["content"] == "You are a helpful assistant. Here is a taxonomy: " + _context()
    random.seed(42)
    choices = ref_levels(cub_lines(1)[0])[0][2]
    random.shuffle(choices)
    assert q.text == ref_question("Based on taxonomy, what is the order of the bird in this image?",
                                  choices).replace("\nAnswer with", "Answer with")
    assert q.context is None and exp.settings.max_tokens == 10


# ------------------------------------------------------------------ item 7: levels whose truth is None

def _with_none(tmp_path, n: int, level: int = 2, *, images: bool = False):
    src = image_items(tmp_path, n) if images else CUB_SIMILAR
    out = tmp_path / "none.jsonl"
    with src.open("rb") as f, out.open("wb") as g:
        for k, line in enumerate(f):
            if k == n:
                break
            rec = orjson.loads(line)
            rec[f"level{level}"] = None  # as in the non-public files: the level exists, its truth does not
            g.write(orjson.dumps(rec) + b"\n")
    return out


def test_none_truth_levels_asked_by_text_and_gpt_under_reference_only(tmp_path, stub):
    data = _with_none(tmp_path, 10)
    ref = _run(tmp_path, stub, "ref", data, task={"mode": "text", "protocol": "reference"})
    asked = [r for r in ref if not r.get("auto")]
    # the reference text scripts ask every non-leaf level, None truth included: 3 a record
    assert len(asked) == 30 and len(stub.bodies) == len({*_texts(stub.bodies)})
    none = [r for r in ref if r["level"] == 2]
    assert len(none) == 10 and all(r["truth"] is None and r["scored"] and r["prediction"] for r in none)
    stub.bodies.clear()
    rob = _run(tmp_path, stub, "rob", data, task={"mode": "text", "protocol": "robust"})
    assert len([r for r in rob if not r.get("auto")]) == 20 and not any(r["level"] == 2 for r in rob)
    # GPT image script asks the None level too; the local image scripts skip it (and consume no shuffle)
    img = _with_none(tmp_path, 4, images=True)
    stub.bodies.clear()
    gpt = _run(tmp_path, stub, "gpt", img, task={"preset": "gpt-4o", "protocol": "reference"})
    assert len(gpt) == 16 and sum(r["truth"] is None for r in gpt) == 4
    stub.bodies.clear()
    local = _run(tmp_path, stub, "local", img, task={"protocol": "reference"})
    assert len(local) == 12 and all(r["truth"] is not None for r in local)


# ------------------------------------------------------------------ the >1680 px resize reaches the request

def test_reference_run_sends_the_reference_resize(tmp_path, stub):
    import base64
    import io

    from PIL import Image

    data = image_items(tmp_path, 1, size=(2125, 1600))
    _run(tmp_path, stub, "big", data, max_side=1680, task={"protocol": "reference"})
    url = stub.bodies[0]["messages"][-1]["content"][0]["image_url"]["url"]
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        s = 1680 / 2125
        assert im.size == (int(2125 * s), int(1600 * s)) == (1679, 1264)  # eval_CUB.py's arithmetic
