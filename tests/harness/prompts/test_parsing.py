"""Answer parsers: the reference substring quirk, the robust parser, yes/no."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from harness.prompts.parsing import parse_letter, parse_reference, parse_robust, parse_yes_no

OPTS = {"A": "Annelida", "B": "Arthropoda", "C": "Mollusca", "D": "Chordata"}
BIRDS = {"A": "procellariiformes", "B": "diomedeidae", "C": "alcidae", "D": "black-footed albatross"}


# ------------------------------------------------------------------ reference quirk

@pytest.mark.parametrize(
    "raw, letters, expected",
    [
        ("A", "ABCD", "A"),
        ("D", "ABCD", "D"),
        ("C. Arthropoda", "ABCD", "A"),  # the quirk: A appears first in letter order
        ("Based on the image, the answer is D", "ABCD", "B"),  # "Based" contains B
        ("D. Chordata", "ABCD", "C"),  # "Chordata" contains C
        ("no letter here", "ABCD", None),
        ("", "ABCD", None),
        ("the answer is d", "ABCD", None),  # case-sensitive substring
        ("E", "ABCD", None),
        ("E", "ABCDE", "E"),  # more options: all their letters
        ("C", "AB", None),  # FIX: a two-option question never yields a letter it did not offer
        ("Definitely B", "AB", "B"),
        ("DC", "ABC", "C"),
    ],
)
def test_parse_reference(raw, letters, expected):
    assert parse_reference(raw, letters) == expected


def test_parse_letter_dispatch():
    assert parse_letter("C. Arthropoda", OPTS, "reference") == "A"
    assert parse_letter("C. Arthropoda", OPTS, "robust") == "C"
    assert parse_letter(None, OPTS, "reference") is None
    assert parse_letter(None, OPTS, "robust") is None
    assert parse_letter("C", {"A": "x", "B": "y"}, "reference") is None


# ------------------------------------------------------------------ robust parser

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A", "A"),
        ("  B  ", "B"),
        ("A.", "A"),
        ("(A)", "A"),
        ("A)", "A"),
        ("[C]", "C"),
        ("**B**", "B"),
        ("B: Arthropoda", "B"),
        ("B - Arthropoda", "B"),
        ("Answer: A", "A"),
        ("answer: b", "B"),
        ("ANSWER: D", "D"),
        ("the answer is A", "A"),
        ("The answer is C.", "C"),
        ("The correct answer is (B)", "B"),  # lmms-eval #1434 gave "T"
        ("The correct answer is (B).", "B"),
        ("**Answer:** B", "B"),  # markdown around the keyword
        ("answers: B", "B"),
        ("Answer: A or B", None),  # two offered letters: ambiguous, never guessed
        ("The answer is (A) or (C)", None),
        ("Answer: A, because it nests", "A"),
        ("Option C", "C"),
        ("option: d", "D"),
        ("The best choice is C", "C"),
        ("I think the answer is D", "D"),
        ("arthropoda", "B"),  # exact option text, any case
        ("Arthropoda.", "B"),
        ("B. Arthropoda", "B"),
        ("C. Arthropoda", "C"),  # an explicit letter beats the reference quirk
        ("A or B", None),  # ambiguous
        ("The answer is A or the answer is B", None),  # two letters proposed
        ("The answer is a bird", None),  # an article, not a letter
        ("", None),
        ("   ", None),
        ("E", None),  # letter not offered
        ("Answer: E", None),
        ("I think it is a mollusc", None),  # "I" is not a letter answer
        ("I", None),  # not offered (four options)
        ("Insecta", None),
        ("It depends", None),
        ("Arthropods", None),  # not the exact option text
    ],
)
def test_parse_robust_table(raw, expected):
    assert parse_robust(raw, OPTS) == expected


def test_parse_robust_option_text_with_punctuation():
    assert parse_robust("Black-footed Albatross", BIRDS) == "D"
    assert parse_robust("black footed albatross", BIRDS) == "D"
    assert parse_robust("D. black-footed albatross", BIRDS) == "D"
    assert parse_robust("diomedeidae", BIRDS) == "B"


def test_parse_robust_i_is_a_letter_only_when_offered_and_explicit():
    nine = {L: f"opt {L}" for L in "ABCDEFGHI"}
    assert parse_robust("I think the answer is C", nine) == "C"
    assert parse_robust("I think so", nine) is None
    assert parse_robust("I", nine) == "I"
    assert parse_robust("I.", nine) == "I"


def _norm(s: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", s.lower()).strip()


@st.composite
def options_and_letter(draw):
    k = draw(st.integers(2, 26))
    texts = draw(st.lists(st.text(min_size=0, max_size=30), min_size=k, max_size=k))
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:k]
    L = draw(st.sampled_from(letters))
    return dict(zip(letters, texts)), L


@given(options_and_letter(), st.sampled_from(["{L}", "({L})", "Answer: {L}", "{L}.", "answer: {L}",
                                              "The answer is {L}", "**{L}**"]))
def test_letter_forms_parse_to_the_letter_for_any_option_texts(ol, form):
    options, L = ol
    raw = form.format(L=L)
    # an option whose text *is* the response is genuinely ambiguous ("A" as an option text)
    assume(all(_norm(t) != _norm(raw) for t in options.values()))
    assert parse_robust(raw, options) == L


@given(st.text(max_size=60), st.integers(1, 26))
def test_parsers_never_return_a_letter_not_offered(raw, k):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:k]
    options = {L: f"option {L.lower()}{L.lower()}" for L in letters}
    got = parse_robust(raw, options)
    assert got is None or got in options
    ref = parse_reference(raw, letters)
    assert ref is None or (ref in letters and ref in raw)
    # the reference walks letters in order: nothing earlier appears
    if ref is not None:
        assert not any(x in raw for x in letters[: letters.index(ref)])


# ------------------------------------------------------------------ yes / no

@pytest.mark.parametrize(
    "raw, expected",
    [("Yes", 1), ("yes.", 1), ("  YES", 1), ("Y", 1), ("No", 0), ("no, it is not", 0), (" NO", 0),
     ("N/A", 0), ("Maybe", -1), ("", -1), ("   ", -1), (None, -1), ("The statement is correct", -1)],
)
def test_parse_yes_no(raw, expected):
    assert parse_yes_no(raw) == expected
