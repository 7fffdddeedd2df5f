"""Log-likelihood classification, scored server-side with vLLM `prompt_logprobs`.

For each image the prompt is the question plus a prefilled answer prefix ("The photo features a");
for each class the request is prefix + " " + class name, and the server returns the log-probability
of every prompt token. The class's tokens are the prompt tokens after the prefix's tokens, found by
comparing token ids: a head request on the prefix alone (answered before the class requests, which
also puts the image and prefix into vLLM's prefix cache) gives the prefix ids; each class reply's
`prompt_token_ids` must start with them (`misaligned` lists the classes where a merge across the
boundary made them differ: their tokens are then those after the longest common prefix). This is the
reference's rule (class tokens = the class's own tokens after the prefix) without a second
tokenisation.

Scores (`score_run`): sum and mean of the class tokens' log-probs, top-1 / top-5; the reference's
transductive calibration (`(a) S + (1-a) mean over the run's images of S`, a = 0..8; a = 1 is the
plain score) and the paper's image-free prior (`(a) S + (1-a) S(no image)`), for sum and mean.

Requests: chat with `continue_final_message` (the model's chat template), or the reference's raw
prompt (`raw`: the request's `chat_template`, or /completions for the image-free prior).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.client import FatalError, RetryableError
from harness.classification.loop import Group
from harness.classification.prompts import ASSISTANT_SLOT, RawTemplate, raw_chat_template, strip_image
from harness.classification.requests import user_message

PRIOR_QID = "prior"


@dataclass(frozen=True)
class LoglikStyle:
    model: str
    question: str
    prefix: str
    request: str = "chat"  # chat | raw
    template: RawTemplate | None = None
    text_first: bool = False


@dataclass(frozen=True)
class Answer:
    ids: tuple[int, ...]  # the class's token ids
    lp: tuple[float, ...]  # their log-probs
    aligned: bool


def _prompt_fields(resp: dict) -> tuple[list[int] | None, list | None]:
    """(prompt_token_ids, prompt_logprobs) of a chat reply (top level) or a completions reply (choice)."""
    ids, plp = resp.get("prompt_token_ids"), resp.get("prompt_logprobs")
    ch = (resp.get("choices") or [{}])[0] if isinstance(resp.get("choices"), list) else {}
    if ids is None and isinstance(ch, dict):
        ids = ch.get("prompt_token_ids")
    if plp is None and isinstance(ch, dict):
        plp = ch.get("prompt_logprobs")
    return ids, plp


def class_logprobs(prefix_ids: Sequence[int], ids: Sequence[int], plp: Sequence) -> Answer:
    """The class tokens (prompt tokens after the prefix) and their log-probs."""
    p = len(prefix_ids)
    aligned = list(ids[:p]) == list(prefix_ids)
    if not aligned:
        p = 0
        while p < min(len(ids), len(prefix_ids)) and ids[p] == prefix_ids[p]:
            p += 1
    if p >= len(ids):
        raise RetryableError("malformed response: no tokens after the prefix")
    out = []
    for j in range(p, len(ids)):
        entry = plp[j]
        if not isinstance(entry, dict):
            raise RetryableError(f"malformed prompt_logprobs at position {j}")
        v = entry.get(str(ids[j]))
        if v is None:
            raise RetryableError(f"prompt_logprobs at position {j} lacks the prompt token {ids[j]}")
        out.append(float(v["logprob"] if isinstance(v, dict) else v))
    return Answer(tuple(ids[p:]), tuple(out), aligned)


class LoglikTask:
    """Loop task: per image (or the image-free prior), a head request on the prefix then one per class."""

    def __init__(self, style: LoglikStyle, classes: Sequence[str]):
        self.style = style
        self.classes = list(classes)
        self.class_ids: list[tuple[int, ...] | None] = [None] * len(self.classes)

    def group(self, qid: str, image: str | None, data: dict) -> Group:
        return Group(qid, image, 1 + len(self.classes), data, head=True)

    def _answer_text(self, i: int) -> str:
        prefix = self.style.prefix
        return prefix if i == 0 else f"{prefix} {self.classes[i - 1]}"

    def request(self, group: Group, i: int, image) -> tuple[str, dict]:
        s = self.style
        answer = self._answer_text(i)
        body: dict = {"model": s.model, "max_tokens": 1, "temperature": 0.0, "return_token_ids": True}
        if i > 0:
            body["prompt_logprobs"] = 0
        if s.request == "raw" and s.template is not None and image is None:
            body["prompt"] = strip_image(s.template.loglik_prompt(s.question, answer))
            return "/completions", body
        body["messages"] = [user_message(s.question, image, s.text_first), {"role": "assistant", "content": answer}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        if s.request == "raw" and s.template is not None:
            body["chat_template"] = raw_chat_template(s.template.loglik_prompt(s.question, ASSISTANT_SLOT))
        return "/chat/completions", body

    def interpret(self, group: Group, i: int, resp: dict, head: Any) -> Any:
        ids, plp = _prompt_fields(resp)
        if ids is None:
            raise FatalError("the endpoint returned no prompt_token_ids: log-likelihood scoring needs vLLM "
                             "(`return_token_ids` and `prompt_logprobs`)")
        if i == 0:
            return list(ids)
        if plp is None:
            raise FatalError("the endpoint returned no prompt_logprobs: log-likelihood scoring needs vLLM")
        return class_logprobs(head, ids, plp)

    def record(self, group: Group, answers: list) -> dict:
        lp, misaligned, changed = [], [], []
        for c, a in enumerate(answers[1:]):
            lp.append(list(a.lp))
            if not a.aligned:
                misaligned.append(c)
            if self.class_ids[c] is None:
                self.class_ids[c] = a.ids
            elif self.class_ids[c] != a.ids:
                changed.append(c)
        rec = dict(group.data) | {"qid": group.qid, "prefix_tokens": len(answers[0]), "lp": lp, "error": None}
        if misaligned:
            rec["misaligned"] = misaligned
        if changed:
            rec["tokens_differ"] = changed  # class tokens differ from the first image's: context-dependent
        return rec

    def error_record(self, group: Group, error: str) -> dict:
        return dict(group.data) | {"qid": group.qid, "lp": None, "error": error}


# ---------------------------------------------------------------- scoring

def _topk_hits(scores, labels, k: int):
    import numpy as np

    # stable: ties go to the lower class index (the reference's argsort order was unspecified)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top1 = order[:, 0] == labels
    topk = (order == labels[:, None]).any(axis=1)
    return float(top1.mean() * 100), float(topk.mean() * 100)


def score_run(records: Iterable[dict], classes: Sequence[str], alphas: Sequence[float] = tuple(range(9))) -> dict:
    """Top-1 / top-5 of sum and mean scores, the transductive calibration sweep and the image-free prior
    sweep. Streams the records: only two floats per image and class are kept."""
    import numpy as np

    pos = {c: i for i, c in enumerate(classes)}
    prior = None
    S_rows, M_rows, labels = [], [], []
    n_err = misaligned = differ = 0
    n_tok: list[int] | None = None
    for r in records:
        lp = r.get("lp")
        if lp is None:
            n_err += 1
            continue
        if len(lp) != len(classes):
            raise ValueError(f"result {r.get('qid')!r} holds {len(lp)} class scores, the class list has {len(classes)}")
        if r.get("qid") == PRIOR_QID:
            prior = lp
            continue
        if r["label"] not in pos:
            raise ValueError(f"result {r.get('qid')!r}: label {r['label']!r} is not in the class list")
        S_rows.append(np.fromiter((sum(t) for t in lp), float, len(lp)))
        M_rows.append(np.fromiter((sum(t) / len(t) for t in lp), float, len(lp)))
        labels.append(pos[r["label"]])
        misaligned += len(r.get("misaligned", ()))
        differ += len(r.get("tokens_differ", ()))
        if n_tok is None:
            n_tok = [len(t) for t in lp]
    out: dict = {"n": len(labels), "n_errors": n_err, "n_classes": len(classes), "prior": prior is not None}
    if not labels:
        return out
    y = np.array(labels)
    for name, X in (("sum", np.vstack(S_rows)), ("mean", np.vstack(M_rows))):
        t1, t5 = _topk_hits(X, y, 5)
        out[name] = {"top1": t1, "top5": t5}
        cal = X.mean(axis=0)  # per class, mean over the run's images (the reference's transductive prior)
        out[f"{name}_calibrated"] = {_a(a): dict(zip(("top1", "top5"), _topk_hits(a * X + (1 - a) * cal, y, 5)))
                                     for a in alphas}
        if prior is not None:
            P = np.array([sum(t) if name == "sum" else sum(t) / len(t) for t in prior])
            out[f"{name}_prior"] = {_a(a): dict(zip(("top1", "top5"), _topk_hits(a * X + (1 - a) * P, y, 5)))
                                    for a in alphas}
    assert n_tok is not None
    out["class_tokens"] = {"total": int(sum(n_tok)), "mean": float(np.mean(n_tok)), "max": int(max(n_tok))}
    out["misaligned"] = misaligned
    out["tokens_differ"] = differ
    # per image: the reference ran one batch-1 forward per class token plus one for the prefix; here
    # one request per class (prefill of its few tokens; the prefix comes from vLLM's prefix cache)
    out["cost_per_image"] = {"reference_forwards": 1 + int(sum(n_tok)), "requests": 1 + len(classes)}
    return out


def _a(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else str(a)
