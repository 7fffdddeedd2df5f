"""Classification metrics: accuracy with a bootstrap interval, per-class accuracy, macro P/R/F1."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from harness.metrics.hierarchy import bootstrap_ci


@dataclass
class Accuracy:
    n: int
    correct: int
    accuracy: float  # percent
    ci: tuple[float, float]

    def to_json(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def accuracy(hits: Iterable[bool]) -> Accuracy:
    hits = list(hits)
    n, k = len(hits), sum(bool(h) for h in hits)
    return Accuracy(n, k, 100.0 * k / n if n else float("nan"), bootstrap_ci(k, n))


def per_class_accuracy(labels: Sequence[str], hits: Sequence[bool]) -> dict[str, float]:
    """Fraction right per true class (0..1)."""
    tot: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    for lab, h in zip(labels, hits):
        tot[lab] += 1
        ok[lab] += bool(h)
    return {c: ok[c] / tot[c] for c in tot}


@dataclass
class MacroPRF:
    precision: float
    recall: float
    f1: float
    accuracy: float
    n: int
    n_labels: int


def macro_prf(truth: Sequence[str], pred: Sequence[str | None]) -> MacroPRF:
    """Macro-averaged precision, recall and F1 over the labels seen in truth or predictions (the
    scikit-learn `average="macro"` definition, zero_division=0); `None` predictions count as wrong and
    add no label. Values 0..1, as the thesis reports them."""
    if len(truth) != len(pred):
        raise ValueError("truth and predictions differ in length")
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_true: Counter[str] = Counter(truth)
    for t, p in zip(truth, pred):
        if p is not None:
            n_pred[p] += 1
            if p == t:
                tp[t] += 1
    labels = set(n_true) | set(n_pred)
    if not labels:
        return MacroPRF(float("nan"), float("nan"), float("nan"), float("nan"), 0, 0)
    ps, rs, fs = [], [], []
    for c in labels:
        p = tp[c] / n_pred[c] if n_pred[c] else 0.0
        r = tp[c] / n_true[c] if n_true[c] else 0.0
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if p + r else 0.0)
    k = len(labels)
    return MacroPRF(sum(ps) / k, sum(rs) / k, sum(fs) / k, sum(tp.values()) / len(truth), len(truth), k)


def confusion_top(truth: Sequence[str], pred: Sequence[str | None], n: int = 10) -> list[tuple[str, str, int]]:
    """The most frequent (truth, wrong prediction) pairs."""
    c: dict[tuple[str, str], int] = defaultdict(int)
    for t, p in zip(truth, pred):
        if p is not None and p != t:
            c[(t, p)] += 1
    return [(t, p, k) for (t, p), k in sorted(c.items(), key=lambda kv: -kv[1])[:n]]
