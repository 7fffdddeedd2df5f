"""Classification templates and candidate streams against golden cases (classification-protocol.md s.2)."""

from __future__ import annotations

import json
import random

import pytest

from harness.classification.datasets import load_classes, read_class_items, resolve
from harness.classification.prompts import (
    candidate_stream,
    closed_question,
    nway_question,
    open_question,
    raw_chat_template,
    raw_template,
    raw_templates,
    strip_image,
    with_cot,
)

Q = "What type of object is in this photo?"


@pytest.fixture(scope="module")
def flowers():
    ds = resolve("flowers", None, None, None)
    classes = load_classes(ds.classes)
    return read_class_items(ds.data, classes, split=ds.split), classes


def test_questions_are_the_papers_strings():
    assert [open_question(i) for i in range(4)] == [
        "What type of object is in this photo?", "Can you name the specific item pictured here?",
        "Identify the object in this image.", "What is the main object depicted in this photograph?"]
    assert closed_question(Q, ["tench", "goldfish", "kite (bird of prey)"]) == (
        'What type of object is in this photo? Choose one from "tench, goldfish, kite (bird of prey)".')
    assert nway_question(["tench", "goldfish"]) == (
        "This image represents an object that belongs to one of the following classes: tench, goldfish. What is "
        "the most probable class that the object in the image belongs to, given the provided classes?")
    assert with_cot(Q) == "What type of object is in this photo? Let's think step by step."
    with pytest.raises(ValueError, match="0..3"):
        open_question(4)


@pytest.mark.parametrize("name, plain, cot", [
    ("llava15", "USER: <image>\nQQ\nASSISTANT:", "USER: <image>\nQQ\nASSISTANT: Let's think step by step."),
    ("llava16-mistral", "[INST] <image>\nQQ[/INST]", "[INST] <image>\nQQ[/INST] Let's think step by step."),
    ("llava16-vicuna", ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nQQ ASSISTANT:"),
     ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the human's questions. USER: <image>\nQQ ASSISTANT: Let's think step by step.")),
    ("blip2", "Question: QQ Answer:", "Question: QQ Let's think step by step. Answer:"),
])
def test_raw_templates(name, plain, cot):
    t = raw_template(name)
    assert t.render("QQ") == plain
    assert t.render("QQ", cot=True) == cot


def test_raw_template_loglik_prefixes_and_prediction_cut():
    t = raw_template("llava15")
    assert t.loglik_prompt(Q, "The photo features a") == (
        "USER: <image>\nWhat type of object is in this photo?\nASSISTANT: The photo features a")
    b = raw_template("blip2")
    assert b.loglik_prompt(Q, b.loglik_default_prefix + " tench") == (
        "Question: What type of object is in this photo? Answer: A tench")
    # the reference's pred: decoded prompt + generation, after the last marker, stripped
    assert t.prediction(t.render(Q), " A tench.") == "A tench."
    assert t.prediction(t.render(Q, cot=True), " It is a tench.") == "Let's think step by step. It is a tench."
    assert t.prediction(t.render(Q), " x ASSISTANT: goldfish") == "goldfish"
    assert strip_image(t.render(Q)) == "USER: What type of object is in this photo?\nASSISTANT:"
    assert sorted(raw_templates()) == ["blip2", "llava15", "llava16-mistral", "llava16-vicuna"]
    with pytest.raises(ValueError, match="unknown raw template"):
        raw_template("llava99")


def test_raw_chat_template_renders_the_reference_string():
    pytest.importorskip("jinja2")
    pytest.importorskip("transformers")
    from tests.support.tiny_models import build_tokenizer

    tok = build_tokenizer("llava")
    t = raw_template("llava15")
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                        {"type": "text", "text": "ignored: the question is in the template"}]}
    got = tok.apply_chat_template([user], chat_template=raw_chat_template(t.render(Q)), tokenize=False)
    assert got == "<s>USER: <image>\nWhat type of object is in this photo?\nASSISTANT:"
    # the log-likelihood form renders the assistant's (prefilled) answer where {prefix} stands
    tmpl = raw_chat_template(t.loglik_prompt(Q, "{assistant}"))
    msgs = [user, {"role": "assistant", "content": "The photo features a tench"}]
    got = tok.apply_chat_template(msgs, chat_template=tmpl, tokenize=False, continue_final_message=True)
    assert got == "<s>USER: <image>\nWhat type of object is in this photo?\nASSISTANT: The photo features a tench"
    # two images -> two placeholders; braces in the raw text are literal
    user2 = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}
    assert tok.apply_chat_template([user2], chat_template=raw_chat_template("A{b}<image>!"), tokenize=False) == \
        "<s>A{b}<image><image>!"


def _reference_loop(data, classes, n_labels, fixed_order=False, seed=1234):
    """The reference's main_results/main.py candidate logic, restated literally."""
    data = list(data)
    random.seed(seed)
    random.shuffle(data)
    out = []
    for item in data:
        if fixed_order:
            choices = classes
        else:
            label = item.label
            other = random.sample(sorted(list(set(classes) - set([label]))), n_labels - 1)  # noqa: C414, C405 (as written)
            shuffled = [label] + other
            random.shuffle(shuffled)
            choices = shuffled
        out.append((item.key, list(choices)))
    return out


@pytest.mark.parametrize("k", [2, 5, 20, 102])
def test_reference_stream_replays_the_seed_1234_global_stream(flowers, k):
    items, classes = flowers
    got = [(it.key, ch) for it, ch in candidate_stream(items, classes, k, stream="reference")]
    assert got == _reference_loop(items, classes, k)


def test_reference_stream_golden_first_items(flowers):
    items, classes = flowers
    got = list(candidate_stream(items, classes, 5, stream="reference"))[:2]
    assert [(it.key, it.label, ch) for it, ch in got] == [
        ("./data/Flowers102/jpg/image_02558.jpg", "columbine",
         ["sweet pea", "bolero deep blue", "globe flower", "bee balm", "columbine"]),
        ("./data/Flowers102/jpg/image_03573.jpg", "azalea",
         ["fritillary", "purple coneflower", "azalea", "globe thistle", "camellia"]),
    ]


def test_hashed_stream_is_per_item_and_order_free(flowers):
    items, classes = flowers
    full = {it.key: ch for it, ch in candidate_stream(items, classes, 5, stream="hashed")}
    part = {it.key: ch for it, ch in candidate_stream(items[1::3], classes, 5, stream="hashed")}
    assert part and all(full[k] == v for k, v in part.items())  # sharding / resume cannot change candidates
    for it, ch in candidate_stream(items[:300], classes, 5, stream="hashed"):
        assert it.label in ch and len(set(ch)) == 5 and set(ch) <= set(classes)
    # a different seed draws differently; the item order is the reference's shuffle in both streams
    other = {it.key: ch for it, ch in candidate_stream(items, classes, 5, stream="hashed", seed=7)}
    assert sum(other[k] != full[k] for k in full) > len(full) * 0.9
    assert [it.key for it, _ in candidate_stream(items, classes, 5, stream="hashed")] == \
        [it.key for it, _ in candidate_stream(items, classes, 5, stream="reference")]


def test_fixed_order_and_imagenet_duplicates():
    from harness.classification.datasets import ClassItem, data_dir

    classes = load_classes(data_dir() / "imagenet_classes.json")
    assert len(classes) == 1000 and len(set(classes)) == 998
    items = [ClassItem(1, "a.jpg", "a.jpg", "tench", "valid"), ClassItem(2, "b.jpg", "b.jpg", "missile", "valid")]
    ref = list(candidate_stream(items, classes, 1000, fixed_order=True, stream="reference"))
    assert all(ch == classes for _, ch in ref)  # the reference offers the list as is, duplicates included
    hashed = list(candidate_stream(items, classes, 998, fixed_order=True, stream="hashed"))
    assert all(len(ch) == 998 and ch == list(dict.fromkeys(classes)) for _, ch in hashed)
    with pytest.raises(ValueError, match="K must be 1000"):
        list(candidate_stream(items, classes, 998, fixed_order=True, stream="reference"))
    with pytest.raises(ValueError, match=r"2\.\.998"):
        list(candidate_stream(items, classes, 999, stream="hashed"))
    allk = {it.key: ch for it, ch in candidate_stream(items, classes, 998, stream="reference")}
    assert all(sorted(ch) == sorted(set(classes)) for ch in allk.values())  # K = all: every class, shuffled
    open_world = list(candidate_stream(items, classes, None))
    assert [ch for _, ch in open_world] == [None, None]


def test_classes_first_synonym(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(["tench, Tinca tinca", "goldfish, Carassius auratus"]))
    assert load_classes(p, first_synonym=True) == ["tench", "goldfish"]
    assert load_classes(p) == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
