"""Data-frequency analysis: the tokenizer (against NLTK goldens), the counting rule, correlations, bins, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.classification.frequency import (
    BINS,
    binned,
    correlate,
    count_classes,
    plot,
    read_corpus,
    treebank_tokenize,
)

GOLDEN = Path(__file__).parent / "classify_data" / "nltk_word_tokenize_golden.json"


def test_tokenizer_matches_nltk_goldens():
    # produced with NLTK 3.10's word tokenizer on class names, ImageWikiQA text and classic cases
    # (the full comparison: all 5,843 distinct strings of the shipped files tokenize identically)
    cases = json.loads(GOLDEN.read_text())
    assert len(cases) > 50
    for text, expected in cases:
        assert treebank_tokenize(text) == expected, text


def test_counting_rule_once_per_text_contiguous_tokens():
    classes = ["ant", "great white shark", "kite (bird of prey)", "tench"]
    texts = [
        "An elephant and an ant. Another ant!",  # ant once (per text), not inside "elephant"
        "A great white shark, a white shark",  # contiguous tokens only
        "white great shark",
        "the kite (bird of prey) flew",
        "Tench's fins",  # "tench" + "'s"
    ]
    counts = count_classes(texts, classes)
    assert counts == {"ant": 1, "great white shark": 1, "kite (bird of prey)": 1, "tench": 1}


def test_correlation_and_bins():
    scipy_stats = pytest.importorskip("scipy.stats")
    counts = {"a": 0, "b": 5, "c": 15, "d": 250, "e": 5000}
    acc = {"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.8, "e": 0.9}
    c = correlate(counts, acc)
    xs, ys = [counts[k] for k in acc], list(acc.values())
    assert c["spearman"] == pytest.approx(scipy_stats.spearmanr(xs, ys)[0])
    assert c["pearson"] == pytest.approx(scipy_stats.pearsonr(xs, ys)[0])
    b = binned(counts, acc)
    assert len(b) == len(BINS) - 1
    by = {(x["lo"], x["hi"]): x for x in b}
    assert by[(0, 10)]["n_classes"] == 2 and by[(0, 10)]["accuracy"] == pytest.approx(0.2)
    assert by[(10, 20)]["accuracy"] == pytest.approx(0.2)
    assert by[(100, 1000)]["accuracy"] == pytest.approx(0.8)
    assert by[(1000, 10000)]["accuracy"] == pytest.approx(0.9)
    assert by[(20, 30)]["accuracy"] is None
    assert correlate({"a": 1}, {"a": 1.0})["spearman"] is None


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    p = plot(binned({"a": 3, "b": 40}, {"a": 0.5, "b": 1.0}), tmp_path / "fig" / "bins.png", title="t")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_read_corpus(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('"plain string"\n{"text": "a"}\n{"text": ["b", "c"]}\n\n')
    assert list(read_corpus(p)) == ["plain string", "a", "b", "c"]
    p.write_text('{"caption": "a"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:1: field 'text': missing"):
        list(read_corpus(p))
