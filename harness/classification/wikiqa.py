"""ImageWikiQA: knowledge questions about the object in an ImageNet image (2,000, four options).

Requests: the item's `text` with the image, with or without "Let's think step by step." (API form:
appended to the user text; raw templates: the reference's CoT template). The text-only control
`classname` replaces "this object" with the class name (the reference's rule, first match of "this
object" / "This object" / "these objects") and sends no image; `noimage` sends the question as is
without the image.

Parsers: `reference` is MMMU's (strip punctuation; "(X)", else " X ", else option texts for answers
over five words; several -> the right-most; none -> random.choice with random.seed(1234) over the
file, counted and labelled as `random`); `robust` (harness.prompts.parsing.parse_robust, then the same on the
text after the last answer cue) never guesses and counts what it cannot read.

Result lines follow the shared schema (DESIGN.md section 4): qid, item, level (null), truth (the right
letter), choices (= options, letter -> text), letter (the robust parser's letter, or null), prediction
(= pred, the scored text), raw, error; plus line, label, classname, options, control, pred, tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

from harness.classification.datasets import WikiItem
from harness.classification.prompts import catalogue
from harness.classification.requests import Style, completion_text, generation_request, usage_tokens
from harness.classification.scoring import final_answer
from harness.engine.core import Group, Unit
from harness.prompts.parsing import parse_robust

Control = Literal["none", "classname", "noimage"]
LETTERS = ("A", "B", "C", "D")


def with_classname(question: str, classname: str) -> str:
    """The reference's "question_with_classname" (gen_data.ipynb): the first rule that applies."""
    if "this object" in question:
        return question.replace("this object", classname)
    if "This object" in question:
        return question.replace("This object", classname.capitalize())
    if "these objects" in question:
        return question.replace("these objects", classname + "s")
    raise ValueError(f"question has no 'this object' / 'This object' / 'these objects': {question[:60]!r}")


def item_text(item: WikiItem, control: Control) -> str:
    if control == "classname":
        return item.text.replace(item.question, with_classname(item.question, item.classname), 1)
    return item.text


def mmmu_parse(response: str, options: dict[str, str], rng: random.Random) -> tuple[str, bool]:
    """MMMU's multiple-choice parser as the reference used it: (letter, guessed at random)."""
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = " " + response + " "
    choices = list(options)
    candidates: list[str] = []
    index_ans, with_brackets = True, False
    for c in choices:
        if f"({c})" in response:
            candidates.append(c)
            with_brackets = True
    if not candidates:
        for c in choices:
            if f" {c} " in response:
                candidates.append(c)
    if not candidates and len(response.split()) > 5:
        for c, text in options.items():
            if text.lower() in response.lower():
                candidates.append(c)
                index_ans = False
    if not candidates:
        return rng.choice(choices), True
    if len(candidates) == 1:
        return candidates[0], False
    if index_ans:
        pat = "({})" if with_brackets else " {} "
        starts = [response.rfind(pat.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(options[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))], False  # first max, like argmax


def robust_parse(response: str, options: dict[str, str]) -> str | None:
    """A letter only when the answer states one unambiguously (never a guess)."""
    got = parse_robust(response, options)
    if got is None:
        tail = final_answer(response)
        if tail is not response:
            got = parse_robust(tail, options)
    return got


class WikiQATask:
    def __init__(self, style: Style, *, cot: bool, control: Control = "none"):
        self.style, self.cot, self.control = style, cot, control
        self.cot_sentence = catalogue()["wikiqa"]["cot"]

    def unit(self, item: WikiItem) -> Unit:
        image = None if self.control != "none" else item.image
        return Unit(image, [Group(f"{item.line}:{item.key}", 1, item)], key=item.key)

    def request(self, group: Group, i: int, image) -> tuple[str, dict]:
        path, body, _ = generation_request(self.style, item_text(group.data, self.control), image, cot=self.cot,
                                           cot_sentence=self.cot_sentence)
        return path, body

    def interpret(self, group: Group, i: int, resp: dict, head: Any) -> dict:
        raw = completion_text(resp)
        pred = raw.strip()
        if self.style.request == "raw" and self.style.template is not None:
            prompt = self.style.template.render(item_text(group.data, self.control), cot=self.cot)
            pred = self.style.template.prediction(prompt, raw)
        return {"raw": raw, "pred": pred, "tokens": usage_tokens(resp)}

    def _base(self, group: Group) -> dict:
        it: WikiItem = group.data
        return {"qid": group.qid, "item": it.key, "level": None, "truth": it.label, "choices": it.options,
                "line": it.line, "label": it.label, "classname": it.classname, "options": it.options,
                "control": self.control}

    def record(self, group: Group, answers: list) -> dict:
        ans = answers[0]
        letter = robust_parse(ans["pred"], group.data.options)
        return self._base(group) | {"letter": letter, "prediction": ans["pred"]} | ans | {"error": None}

    def error_record(self, group: Group, error: str) -> dict:
        return self._base(group) | {"letter": None, "prediction": None, "raw": None, "pred": None, "error": error}


def score_run(records: Sequence[dict], seed: int = 1234, rng: random.Random | None = None) -> dict:
    """Accuracy under both parsers; the reference's random guesses and the robust parser's unparsed
    answers are counted. Records are taken in file order (the reference's random stream order).

    The MMMU parser's guesses come from `rng`, or from a Random seeded `seed` for this run alone.
    The reference notebook seeded once and continued the one stream across all its output files:
    `score_runs` reproduces that by passing one `rng` through the runs in order."""
    from harness.classification.metrics import accuracy

    recs = sorted(records, key=lambda r: r.get("line", 0))
    rng = random.Random(seed) if rng is None else rng
    ref_hits, rob_hits = [], []
    n_random = random_right = unparsed = 0
    for r in recs:
        pred = r.get("pred")
        if pred is None:  # failed request: wrong under both parsers, no RNG draw (it has no answer)
            ref_hits.append(False)
            rob_hits.append(False)
            continue
        letter, guessed = mmmu_parse(pred, r["options"], rng)
        ref_hits.append(letter == r["label"])
        if guessed:
            n_random += 1
            random_right += letter == r["label"]
        rl = robust_parse(pred, r["options"])
        unparsed += rl is None
        rob_hits.append(rl == r["label"])
    return {
        "n": len(recs), "n_errors": sum(r.get("error") is not None for r in recs),
        "reference": accuracy(ref_hits).to_json() | {"random_guesses": n_random, "random_right": random_right},
        "robust": accuracy(rob_hits).to_json() | {"unparsed": unparsed},
    }


def score_runs(runs: Sequence[Sequence[dict]], seed: int = 1234) -> list[dict]:
    """Several runs scored as the reference notebook scored its output files: `random.seed(seed)` once,
    then every file in turn (each in line order) draws its random guesses from the same stream, so a
    file's guesses depend on how many guesses the files before it drew. `runs` is in the notebook's
    file order; the robust parser never guesses and is unaffected."""
    rng = random.Random(seed)
    return [score_run(r, seed, rng=rng) for r in runs]
