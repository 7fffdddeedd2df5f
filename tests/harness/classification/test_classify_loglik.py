"""Log-likelihood scoring mechanics: token alignment, the sum/mean/top-k scores, the reference's
transductive calibration sweep (restated literally from its notebook) and the image-free prior."""

from __future__ import annotations

import numpy as np
import pytest

from harness.backends.http import RetryableError
from harness.classification.loglik import PRIOR_QID, class_logprobs, score_run


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


# ---------------------------------------------------------------- the two server-side methods, offline

class CharModel:
    """A fake server: one token per character (id = code point); log p(token | context) is a fixed
    pseudo-random function of (len(context), token), so both methods must give identical numbers."""

    def lp(self, ctx_len: int, tok: int) -> float:
        return -1.0 - ((ctx_len * 31 + tok * 17) % 97) / 50

    def prompt(self, body: dict) -> list[int]:
        user, answer = body["messages"]
        text = "U:" + "".join("#" if p["type"] == "image_url" else p["text"] for p in user["content"]) + "A:"
        return [ord(ch) for ch in text + answer["content"]]

    def reply(self, body: dict) -> dict:
        ids = self.prompt(body)
        resp: dict = {"prompt_token_ids": ids, "choices": [{"message": {"content": "x"}}]}
        if body.get("prompt_logprobs") is not None:
            resp["prompt_logprobs"] = [None] + [{str(t): {"logprob": self.lp(j, t)}} for j, t in enumerate(ids) if j]
        if body.get("logprob_token_ids"):
            top = [{"token": f"token_id:{t}", "logprob": self.lp(len(ids), t)} for t in body["logprob_token_ids"]]
            resp["choices"][0]["logprobs"] = {"content": [{"token": "token_id:120", "logprob": -0.1, "top_logprobs": top}]}
        return resp


def _run_task(task, model, image="img.png"):
    from harness.backends.images import ImagePayload

    g = task.unit("q", image, {"item": image, "label": task.classes[0]}).groups[0]
    payload = ImagePayload("data:,", "u", 0, None)
    answers = []
    for i in range(g.n):
        _, body = task.request(g, i, payload)
        answers.append(task.interpret(g, i, model.reply(body), answers[0] if i else None))
    return g, task.record(g, answers)


def test_trie_and_prompt_logprobs_give_the_same_scores():
    from harness.classification.loglik import LoglikStyle, LoglikTask, TriePlan

    classes = ["goldfish", "golden retriever", "gold", "tench", "ox"]
    style = LoglikStyle(model="m", question="Q?", prefix="a")
    m = CharModel()
    base = LoglikTask(style, classes, "prompt-logprobs")
    g1, r1 = _run_task(base, m)
    assert g1.n == 1 + len(classes) and r1["requests"] == 6

    trie = LoglikTask(style, classes, "trie")
    prefix = [ord(c) for c in "U:#Q?A:a"]
    trie.plan = TriePlan.build(prefix, [prefix + [ord(c) for c in f" {name}"] for name in classes])
    trie.plan.suffix = {n: "".join(map(chr, n)) for n in trie.plan.nodes}  # what /detokenize would give
    g2, r2 = _run_task(trie, m)
    # nodes: every distinct proper prefix of " goldfish", " golden retriever", " gold", " tench", " ox"
    names = [f" {c}" for c in classes]
    assert g2.n == len({n[:d] for n in names for d in range(len(n))})
    assert r2["lp"] == r1["lp"] and r2["prefix_tokens"] == r1["prefix_tokens"] == len(prefix)
    assert r2["lp"][2] == [m.lp(len(prefix) + d, ord(ch)) for d, ch in enumerate(" gold")]


def test_trie_fallback_for_misaligned_classes_and_alignment_errors():
    from harness.classification.loglik import LoglikStyle, LoglikTask, TriePlan
    from harness.engine.core import GroupError

    style = LoglikStyle(model="m", question="Q?", prefix="a")
    prefix = [1, 2, 3]
    plan = TriePlan.build(prefix, [prefix + [7, 8], [1, 2, 9, 8], prefix + [7]])
    assert plan.fallback == [1] and plan.class_ids == [(7, 8), (), (7,)]
    assert plan.nodes == [(), (7,)] and plan.children == {(): [7], (7,): [8]}

    classes = ["ab", "xy", "a"]
    m = CharModel()
    task = LoglikTask(style, classes, "trie")
    pfx = [ord(c) for c in "U:#Q?A:a"]
    full = [pfx + [ord(c) for c in " ab"], pfx[:-1] + [ord(c) for c in "Xxy"], pfx + [ord(c) for c in " a"]]
    task.plan = TriePlan.build(pfx, full)
    task.plan.suffix = {n: "".join(map(chr, n)) for n in task.plan.nodes}
    g, rec = _run_task(task, m)
    assert task.plan.fallback == [1] and g.n == len(task.plan.nodes) + 1
    assert "misaligned" not in rec  # this fake server tokenises the fallback class in line with the prefix
    assert rec["lp"][1] == [m.lp(len(pfx) + d, ord(ch)) for d, ch in enumerate(" xy")]
    # a node whose prompt does not tokenise as planned: the image is recorded as an error, not retried
    task.plan.suffix[task.plan.nodes[1]] = "?"
    with pytest.raises(GroupError, match="token alignment"):
        _run_task(task, m)
