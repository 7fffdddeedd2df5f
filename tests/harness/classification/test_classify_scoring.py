"""Scorers on tricky class names (the ImageNet / Flowers / Caltech collisions of the protocol) and metrics."""

from __future__ import annotations

import json

import pytest

from harness.classification.datasets import data_dir, load_classes
from harness.classification.metrics import accuracy, macro_prf, per_class_accuracy
from harness.classification.scoring import (
    NameIndex,
    corrected,
    exact,
    final_answer,
    load_synonyms,
    score,
    substring,
)


def _classes(name):
    return list(dict.fromkeys(load_classes(data_dir() / f"{name}_classes.json")))


@pytest.fixture(scope="module")
def imagenet():
    c = _classes("imagenet")
    return c, NameIndex(c)


@pytest.mark.parametrize("name, n_sub, n_slash, n_paren", [("imagenet", 56, 5, 6), ("flowers", 4, 0, 0),
                                                            ("caltech", 5, 0, 0), ("cars", 0, 0, 0)])
def test_collision_counts_of_the_protocol(name, n_sub, n_slash, n_paren):
    c = [x.lower() for x in _classes(name)]
    assert sum(any(a != b and a in b for b in c) for a in c) == n_sub
    assert sum(" / " in a for a in c) == n_slash
    assert sum("(" in a for a in c) == n_paren


@pytest.mark.parametrize("name", ["imagenet", "flowers", "caltech"])
def test_every_substring_collision(name):
    """For every pair where name a is a substring of name b: the reference scorer calls the answer b
    right for truth a (its false positive); the corrected scorer does not, and still accepts b for b."""
    c = _classes(name)
    index = NameIndex(c)
    pairs = [(a, b) for a in c for b in c if a != b and a.lower() in b.lower()]
    assert pairs
    for a, b in pairs:
        assert substring(b, a)
        assert not corrected(b, a, index).correct, (a, b)
        assert not exact(b, a, index)
        assert corrected(b, b, index).correct, b
        assert exact(b, b, index)


TABLE = [
    # answer, truth, substring, exact, corrected, status
    ("An elephant.", "ant", True, False, False, "none"),
    ("a tiger shark", "tiger", True, False, False, "wrong"),
    ("a tiger cat", "tiger", True, False, False, "wrong"),
    ("Two tigers resting.", "tiger", True, False, True, "correct"),
    ("The photo features a hen.", "hen", True, False, True, "correct"),
    ("a kite", "kite (bird of prey)", False, True, True, "correct"),
    ("Kite (bird of prey)", "kite (bird of prey)", True, True, True, "correct"),
    ("a Mexican hairless dog", "Mexican hairless dog (xoloitzcuintli)", False, True, True, "correct"),
    ("a cardboard box", "cardboard box / carton", False, True, True, "correct"),
    ("carton", "cardboard box / carton", False, True, True, "correct"),
    ("swim trunks", "swim trunks / shorts", False, True, True, "correct"),
    ("a goldfish or a tench", "tench", True, False, False, "ambiguous"),
    ("St. Bernard", "St. Bernard", True, True, True, "correct"),
    ("st bernard", "St. Bernard", False, True, True, "correct"),
    ("Let's think step by step. It has fins... The answer is: tench.", "tench", True, False, True, "correct"),
    ("", "tench", False, False, False, "none"),
    ("construction crane", "crane bird", False, False, False, "wrong"),
]


@pytest.mark.parametrize("answer, truth, sub, ex, cor, status", TABLE)
def test_scorer_table(imagenet, answer, truth, sub, ex, cor, status):
    classes, index = imagenet
    assert truth in classes
    assert substring(answer, truth) is sub
    assert exact(answer, truth, index) is ex
    v = corrected(answer, truth, index)
    assert (v.correct, v.status) == (cor, status)
    assert score(answer, truth, "corrected", index) is cor


def test_forms_and_final_answer(imagenet):
    _, index = imagenet
    assert index.forms("kite (bird of prey)") == ["kite", "kite bird of prey"]
    assert index.forms("baluster / handrail") == ["baluster", "baluster handrail", "handrail"]
    assert index.named("a water ouzel, maybe a tiger shark") == ("tiger shark",)
    assert final_answer("blah. Final answer: goldfish") == "goldfish"
    assert final_answer("no cue here") == "no cue here"


def test_synonyms(tmp_path, imagenet):
    classes, _ = imagenet
    p = tmp_path / "syn.json"
    p.write_text(json.dumps({"tench": ["Tinca tinca"], "tiger": ["Panthera tigris"]}))
    syn = load_synonyms(p, classes)
    index = NameIndex(classes, syn)
    assert corrected("a Tinca tinca", "tench", index).correct
    assert score("a Tinca tinca", "tench", "substring", index, syn)
    assert not score("a Tinca tinca", "tench", "substring", index)
    assert exact("Panthera tigris", "tiger", index)
    j = tmp_path / "syn.jsonl"
    j.write_text('{"class": "tench", "synonyms": ["Tinca tinca"]}\n{"class": "carp", "synonyms": ["x"]}\n')
    with pytest.raises(ValueError, match=r"syn\.jsonl:2: field 'class': 'carp' is not in the class list"):
        load_synonyms(j, classes)
    j.write_text('{"class": "tench", "synonyms": "Tinca"}\n')
    with pytest.raises(ValueError, match=r"syn\.jsonl:1: field 'synonyms'"):
        load_synonyms(j, classes)


def test_macro_prf_hand_computed():
    truth = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", None]
    m = macro_prf(truth, pred)
    # a: P 1/1 R 1/2 F 2/3; b: P 1/2 R 1/1 F 2/3; c: P 0 R 0 F 0
    assert m.precision == pytest.approx((1 + 0.5 + 0) / 3)
    assert m.recall == pytest.approx((0.5 + 1 + 0) / 3)
    assert m.f1 == pytest.approx((2 / 3 + 2 / 3) / 3)
    assert m.accuracy == pytest.approx(0.5)
    assert m.n_labels == 3
    # a predicted label that is never the truth counts in the macro average (scikit-learn's rule)
    m2 = macro_prf(["a", "a"], ["a", "z"])
    assert m2.n_labels == 2 and m2.precision == pytest.approx(0.5) and m2.recall == pytest.approx(0.25)


def test_accuracy_and_per_class():
    a = accuracy([True, False, True, True])
    assert (a.n, a.correct, a.accuracy) == (4, 3, 75.0)
    assert a.ci[0] <= 75.0 <= a.ci[1]
    assert per_class_accuracy(["x", "x", "y"], [True, False, False]) == {"x": 0.5, "y": 0.0}
