"""ImageWikiQA: the MMMU-style reference parser (random fallback counted), the robust parser, controls."""

from __future__ import annotations

import random

import pytest

from harness.classification.datasets import data_dir, read_wikiqa
from harness.classification.wikiqa import item_text, mmmu_parse, robust_parse, score_run, with_classname

OPTS = {"A": "Fowler's position", "B": "Upright position", "C": "Trendelenburg position", "D": "Flat position"}


@pytest.mark.parametrize("response, letter, guessed", [
    ("(C)", "C", False),
    ("The answer is (B).", "B", False),
    ("C", "C", False),
    ("I think B is right, not A", "A", False),  # " B " and " A ": the right-most wins
    ("(A) looks tempting but (D) is it", "D", False),
    ("The patient should be placed in the Trendelenburg position for shock", "C", False),  # > 5 words: option text
    ("Trendelenburg position", None, True),  # <= 5 words, no letter: random
    ("I cannot tell.", None, True),
])
def test_mmmu_parser(response, letter, guessed):
    got, g = mmmu_parse(response, OPTS, random.Random(0))
    assert g is guessed
    if letter:
        assert got == letter
    else:
        assert got in "ABCD"


def test_mmmu_random_fallback_is_the_seeded_stream():
    rng, ref = random.Random(1234), random.Random(1234)
    got = [mmmu_parse("no idea", OPTS, rng)[0] for _ in range(20)]
    assert got == [ref.choice(["A", "B", "C", "D"]) for _ in range(20)]


@pytest.mark.parametrize("response, letter", [
    ("C", "C"), ("(C)", "C"), ("Answer: C", "C"), ("The correct answer is C. Trendelenburg position", "C"),
    ("Trendelenburg position", "C"),
    ("Let's think step by step. A is wrong, B too. So the answer is D.", "D"),
    ("I cannot tell.", None), ("A or B", None), ("", None),
])
def test_robust_parser_never_guesses(response, letter):
    assert robust_parse(response, OPTS) == letter


def test_classname_control_on_all_2000_questions():
    items = list(read_wikiqa(data_dir() / "imagewikiqa.jsonl"))
    texts = [item_text(it, "classname") for it in items]
    for it, t in zip(items, texts):
        assert t != it.text and it.classname.lower() in t.split("\n")[0].lower()  # every question names its class
        assert t.split("\n")[1:] == it.text.split("\n")[1:]  # options and the instruction unchanged
    first = items[0]
    assert first.classname == "stretcher"
    assert texts[0].startswith("Which position is particularly important for stretcher when transporting")
    assert with_classname("This object flies.", "kite") == "Kite flies."
    assert with_classname("Where do these objects live?", "tench") == "Where do tenchs live?"  # the reference's rule
    with pytest.raises(ValueError):
        with_classname("What is it?", "x")


def test_score_run_counts_random_guesses_and_unparsed():
    recs = [
        {"line": 1, "label": "C", "options": OPTS, "pred": "(C)", "error": None},
        {"line": 2, "label": "A", "options": OPTS, "pred": "hmm", "error": None},
        {"line": 3, "label": "B", "options": OPTS, "pred": None, "error": "gave up"},
        {"line": 4, "label": "D", "options": OPTS, "pred": "The answer is D", "error": None},
    ]
    s = score_run(recs)
    rng = random.Random(1234)
    guess = rng.choice(["A", "B", "C", "D"])
    assert s["n"] == 4 and s["n_errors"] == 1
    assert s["reference"]["random_guesses"] == 1
    assert s["reference"]["correct"] == 2 + (guess == "A")
    assert s["robust"]["correct"] == 2 and s["robust"]["unparsed"] == 1
