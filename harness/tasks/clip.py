"""The CLIP/SigLIP experiment as an engine task: items -> questions (one score request each) -> result lines.

Questions are the reference's: every level with a truth, options in file order, qid
`make_qid(item, level, "image", template, "clip")`. A request asks the backend
(:class:`harness.backends.clip.ClipScorer`) to score the item's image against each option's text
(`template` with the option filled in); the answer is the argmax of the logits (the first on a tie).

Result line: :func:`harness.tasks.hierarchy.record` with `letter`, `raw` = the letter, plus `scores`
(letter -> softmax probability over the offered options, 6 decimals) and `logits` (letter -> the
model's logit, 5 decimals). `harness report` reads them like any hierarchy run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from harness.backends.clip import SCORE_PATH, check_template, fill
from harness.backends.http import RetryableError
from harness.data.items import LETTERS, Item
from harness.engine.core import Group
from harness.prompts.hierarchy import Question, make_qid
from harness.tasks.hierarchy import record

ANSWER_MODE = "clip"


def questions_for(item: Item, template: str) -> list[Question]:
    """The questions of an item (options in file order, as the reference CLIP/SigLIP runs)."""
    out = []
    for t, lv in enumerate(item.levels):
        if lv.truth is None:
            continue
        qid = make_qid(item.id, lv.n, "image", template, ANSWER_MODE)
        out.append(Question(qid, item.id, lv.n, t, lv.choices, lv.truth, None, "", item.image, not lv.root))
    return out


class ClipTask:
    """Hierarchy questions scored by a contrastive model (engine Task protocol)."""

    def __init__(self, template: str):
        check_template(template)
        self.template = template

    def questions(self, items: Iterable[Item], done: set[str]) -> Iterator[tuple[Item, list[Question]]]:
        """(item, its questions not done yet); items with nothing left are skipped."""
        for item in items:
            qs = [q for q in questions_for(item, self.template) if q.qid not in done]
            if qs:
                yield item, qs

    def texts(self, q: Question) -> list[str]:
        return [fill(self.template, o) for o in q.options]

    # -- engine task
    def request(self, group: Group, i: int, image: Any) -> tuple[str, dict]:
        return SCORE_PATH, {"image": image, "texts": self.texts(group.data)}

    def interpret(self, group: Group, i: int, resp: dict, head: Any = None) -> dict:
        q: Question = group.data
        n = len(q.options)
        try:
            logits, probs = list(resp["logits"]), list(resp["probs"])
        except (KeyError, TypeError):
            raise RetryableError("malformed CLIP reply (no logits/probs)") from None
        if len(logits) != n or len(probs) != n:
            raise RetryableError(f"malformed CLIP reply ({len(logits)} logits for {n} options)")
        best = max(range(n), key=logits.__getitem__)  # the first on a tie, as torch.argmax
        return {"letter": LETTERS[best],
                "scores": {L: round(p, 6) for L, p in zip(LETTERS, probs)},
                "logits": {L: round(v, 5) for L, v in zip(LETTERS, logits)}}

    def record(self, group: Group, answers: list[dict]) -> dict:
        ans = answers[0]
        letter = ans["letter"]
        return record(group.data, letter=letter, raw=letter, error=None, scores=ans["scores"], logits=ans["logits"])

    def error_record(self, group: Group, error: str) -> dict:
        return record(group.data, letter=None, raw=None, error=error)
