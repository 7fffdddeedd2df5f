"""Data-frequency analysis: how often each class name occurs in a text corpus, against per-class accuracy.

Counting rule of the reference (data_analysis/tokenize.ipynb): lower-case and word-tokenise every
corpus text and every class name; a class counts once per text in which its tokens occur as a
contiguous sub-sequence. Then Spearman and Pearson correlation (scipy) of count vs per-class accuracy
over the classes of a run, and accuracy per count bin, edges [0, 10, 20, ..., 100, 1000, 10000, 100000).

Tokeniser: the reference used NLTK's `word_tokenize` (Treebank rules). `treebank_tokenize` re-states
those rules here (NLTK is not a dependency and its sentence splitter needs a data download);
`tokenizer="nltk"` uses NLTK's own word tokenizer when it is installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from harness.data.items import iter_jsonl

BINS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 1000, 10000, 100000)

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r'^"'), " `` "),
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),
    (re.compile(r'([ (\[{<])("|\'\')'), r"\1 `` "),
    (re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", re.IGNORECASE), "' "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"([^.])(\.)([\]\)}>\"']*)\s*$"), r"\1 \2\3 "),  # the final period only
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"\*"), " * "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), " -- "),
]
_ENDING: list[tuple[re.Pattern, str]] = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sSmMdD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_SPLIT_WORDS = [re.compile(rf"(?i)\b({a})({b})\b") for a, b in (
    ("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"), ("more", "'n"),
    ("wan", "na"))]
_SPLIT_T = [re.compile(r"(?i) ('t)(is)\b"), re.compile(r"(?i) ('t)(was)\b")]


def treebank_tokenize(text: str) -> list[str]:
    """Word tokens by the Treebank rules NLTK's word tokenizer applies to one sentence."""
    for rx, sub in _RULES:
        text = rx.sub(sub, text)
    text = f" {text} "
    for rx, sub in _ENDING:
        text = rx.sub(sub, text)
    for rx in _SPLIT_WORDS + _SPLIT_T:
        text = rx.sub(r" \1 \2 ", text)
    return text.split()


def get_tokenizer(name: str = "treebank") -> Callable[[str], list[str]]:
    if name == "treebank":
        return treebank_tokenize
    if name == "nltk":
        try:
            from nltk.tokenize import NLTKWordTokenizer
        except ImportError:
            raise ValueError("--tokenizer nltk needs NLTK installed (pip install nltk)") from None
        return NLTKWordTokenizer().tokenize
    if name == "split":
        return str.split
    raise ValueError(f"unknown tokenizer {name!r} (treebank, nltk, split)")


def read_corpus(path: str | Path, field: str = "text") -> Iterator[str]:
    """Texts of a JSONL corpus: each line a JSON string, or an object whose `field` is a string or a
    list of strings (e.g. LLaVA conversation turns flattened by the user)."""
    path = Path(path)
    for n, rec in iter_jsonl(path, objects=False):
        if isinstance(rec, str):
            yield rec
            continue
        if not isinstance(rec, dict) or field not in rec:
            raise ValueError(f"{path}:{n}: field {field!r}: missing (each line: a string or an object with {field!r})")
        v = rec[field]
        if isinstance(v, str):
            yield v
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            yield from v
        else:
            raise ValueError(f"{path}:{n}: field {field!r}: must be a string or a list of strings")


def count_classes(texts: Iterable[str], classes: Sequence[str], tokenize: Callable[[str], list[str]] = treebank_tokenize,
                  ) -> dict[str, int]:
    """Texts containing each class name's tokens contiguously (once per text), keyed by class name.

    Indexed by a class's first token, so the cost is per text token, not per (text, class)."""
    toks = {c: tuple(tokenize(c.lower())) for c in dict.fromkeys(classes)}
    by_first: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for c, t in toks.items():
        if t:
            by_first.setdefault(t[0], []).append((c, t))
    counts = dict.fromkeys(toks, 0)
    for text in texts:
        words = tokenize(text.lower())
        seen: set[str] = set()
        for i, w in enumerate(words):
            for c, t in by_first.get(w, ()):
                if c not in seen and tuple(words[i:i + len(t)]) == t:
                    seen.add(c)
        for c in seen:
            counts[c] += 1
    return counts


def correlate(counts: Mapping[str, int], per_class: Mapping[str, float]) -> dict:
    """Spearman and Pearson correlation of count vs accuracy over the classes that have an accuracy."""
    from scipy.stats import pearsonr, spearmanr

    cls = [c for c in per_class]
    xs = [counts.get(c, 0) for c in cls]
    ys = [per_class[c] for c in cls]
    if len(cls) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"n_classes": len(cls), "spearman": None, "pearson": None}
    s, p = spearmanr(xs, ys)
    r, q = pearsonr(xs, ys)
    return {"n_classes": len(cls), "spearman": float(s), "spearman_p": float(p), "pearson": float(r), "pearson_p": float(q)}


def binned(counts: Mapping[str, int], per_class: Mapping[str, float], bins: Sequence[int] = BINS) -> list[dict]:
    """Mean accuracy of the classes whose count lies in [lo, hi); counts beyond the last edge are left out
    (as in the reference)."""
    out = []
    for lo, hi in pairwise(bins):
        ys = [a for c, a in per_class.items() if lo <= counts.get(c, 0) < hi]
        out.append({"lo": lo, "hi": hi, "n_classes": len(ys), "accuracy": sum(ys) / len(ys) if ys else None})
    return out


def plot(bins_: list[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy per frequency bin (PNG), the reference's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 3.5))
    xs = list(range(len(bins_)))
    ys = [b["accuracy"] if b["accuracy"] is not None else float("nan") for b in bins_]
    ax.plot(xs, ys, marker="o")
    ax.set_xticks(xs, [f"[{b['lo']}, {b['hi']}) ({b['n_classes']} classes)" for b in bins_], rotation=45, ha="right")
    ax.set_xlabel("frequency in the corpus")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
