"""Log-likelihood scoring mechanics: token alignment, the sum/mean/top-k scores, the reference's
transductive calibration sweep (restated literally from its notebook) and the image-free prior."""

from __future__ import annotations

import numpy as np
import pytest

from harness.classification.loglik import PRIOR_QID, class_logprobs, score_run
from harness.client import RetryableError


def _plp(ids, lps):
    return [None] + [{str(t): {"logprob": lp, "rank": 1, "decoded_token": "x"}} for t, lp in zip(ids[1:], lps[1:])]


def test_class_tokens_are_those_after_the_prefix():
    prefix = [1, 5, 6, 7]
    ids = prefix + [9, 10]
    lps = [0.0, -1.0, -2.0, -3.0, -0.5, -0.25]
    a = class_logprobs(prefix, ids, _plp(ids, lps))
    assert a.ids == (9, 10) and a.lp == (-0.5, -0.25) and a.aligned
    # a merge across the boundary: the prompt's last prefix token differs -> misaligned, longest common prefix
    ids2 = [1, 5, 6, 8, 10]
    b = class_logprobs(prefix, ids2, _plp(ids2, [0, -1, -2, -4.0, -0.25]))
    assert not b.aligned and b.ids == (8, 10) and b.lp == (-4.0, -0.25)
    with pytest.raises(RetryableError, match="no tokens after the prefix"):
        class_logprobs(prefix, prefix, _plp(prefix, [0, -1, -2, -3]))
    with pytest.raises(RetryableError, match="lacks the prompt token"):
        class_logprobs(prefix, ids, [None, {}, {}, {}, {"99": {"logprob": -1}}, {"10": {"logprob": -1}}])


def _records(rng, n_img, classes, n_tok):
    recs = []
    for i in range(n_img):
        lp = [list(-rng.random(n_tok[c]) * 3) for c in range(len(classes))]
        recs.append({"qid": f"{i}:x", "label": classes[i % len(classes)], "lp": lp})
    return recs


def _reference_get_accuracy(data, classes):
    """inference_analysis/get_accuracy.ipynb, restated (top-1/top-5 of mean, sum, then the alpha sweep)."""
    out = {}
    for name, agg in (("mean", np.mean), ("sum", np.sum)):
        a1, a5 = [], []
        for item in data:
            probs = [agg(np.array(p)) for p in item["probs"]]
            preds = np.array(probs).argsort()[-5:][::-1]
            a1.append(preds[0] == item["label_index"])
            a5.append(item["label_index"] in preds)
        out[name] = (np.mean(a1) * 100, np.mean(a5) * 100)
    all_probs = [item["probs"] for item in data]
    calibrated = [np.mean([p[i] for p in all_probs], axis=0) for i in range(len(all_probs[0]))]
    for alpha in range(9):
        a1, a5 = [], []
        for item in data:
            probs = [(alpha * np.array(p) + (1 - alpha) * np.array(calibrated[i])).sum() for i, p in enumerate(item["probs"])]
            preds = np.array(probs).argsort()[-5:][::-1]
            a1.append(preds[0] == item["label_index"])
            a5.append(item["label_index"] in preds)
        out[alpha] = (np.mean(a1) * 100, np.mean(a5) * 100)
    return out


def test_scores_match_the_reference_notebook():
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(12)]
    n_tok = [1 + i % 3 for i in range(12)]
    recs = _records(rng, 40, classes, n_tok)
    s = score_run(recs, classes)
    ref = _reference_get_accuracy([{"probs": r["lp"], "label_index": classes.index(r["label"])} for r in recs], classes)
    assert (s["mean"]["top1"], s["mean"]["top5"]) == pytest.approx(ref["mean"])
    assert (s["sum"]["top1"], s["sum"]["top5"]) == pytest.approx(ref["sum"])
    for a in range(9):
        got = s["sum_calibrated"][str(a)]
        assert (got["top1"], got["top5"]) == pytest.approx(ref[a]), a
    assert s["sum_calibrated"]["1"] == s["sum"]  # alpha 1 is the plain score
    assert s["class_tokens"] == {"total": sum(n_tok), "mean": pytest.approx(np.mean(n_tok)), "max": 3}
    assert s["cost_per_image"] == {"reference_forwards": 1 + sum(n_tok), "requests": 13}
    assert "sum_prior" not in s and s["prior"] is False


def test_image_free_prior_sweep():
    classes = ["a", "b", "c"]
    # image scores favour "a" for every image; the prior says "a" is just a priori likely
    recs = [{"qid": f"{i}", "label": lab, "lp": [[-1.0], [-1.5], [-1.6]]} for i, lab in enumerate(["a", "b", "c", "b"])]
    prior = {"qid": PRIOR_QID, "label": None, "lp": [[-0.2], [-2.0], [-2.2]]}
    s = score_run(recs + [prior], classes)
    assert s["n"] == 4 and s["prior"] is True
    assert s["sum"]["top1"] == 25.0  # always "a"
    # alpha 2: 2 S - P -> a: -1.8, b: -1.0, c: -1.0 -> b (ties to the lower index)
    assert s["sum_prior"]["2"]["top1"] == 50.0
    assert s["sum_prior"]["1"] == s["sum"]


def test_errors_and_mismatched_class_lists():
    classes = ["a", "b"]
    recs = [{"qid": "1", "label": "a", "lp": [[-1.0], [-2.0]]}, {"qid": "2", "label": "b", "lp": None, "error": "x"}]
    s = score_run(recs, classes)
    assert s["n"] == 1 and s["n_errors"] == 1 and s["sum"]["top1"] == 100.0
    with pytest.raises(ValueError, match="holds 2 class scores, the class list has 3"):
        score_run(recs, classes + ["c"])
