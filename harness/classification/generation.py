"""Classification by generation: open world, closed world (K candidates), and the thesis's N-way.

One result line an image, in the shared result schema (DESIGN.md section 4): qid, item (image path as
in the file), level (null), truth (the label), choices (letter -> candidate, in prompt order; null for
the open world and when every class is offered), letter (null: answers name a class, the scorers map
them), prediction (= pred), raw, error; and the experiment's fields: line, label, k, candidates (the K
candidates in prompt order; "all" when every class is offered), question, pred (what is scored: the
completion stripped; for raw templates the reference's cut after the template's marker), tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from harness.classification.datasets import ClassItem
from harness.classification.prompts import (
    candidate_stream,
    catalogue,
    closed_question,
    nway_question,
    open_question,
)
from harness.classification.requests import Style, completion_text, generation_request, usage_tokens
from harness.engine.core import Group, Unit

TaskName = Literal["open", "closed", "nway"]


@dataclass(frozen=True)
class Question:
    item: ClassItem
    choices: list[str] | None
    text: str


def questions(items: list[ClassItem], classes: list[str], *, task: TaskName, k: int | None, fixed_order: bool,
              stream: str, seed: int, wording: int) -> Iterator[Question]:
    """Every question of the run in the reference's item order (candidates drawn as the protocol says)."""
    if task == "open":
        k = None
    elif k is None:
        raise ValueError(f"--k is required for the {task} task")
    base = open_question(wording)
    for item, choices in candidate_stream(items, classes, k, fixed_order=fixed_order, stream=stream, seed=seed):  # type: ignore[arg-type]
        if choices is None:
            text = base
        elif task == "nway":
            text = nway_question(choices)
        else:
            text = closed_question(base, choices)
        yield Question(item, choices, text)


def qid_of(item: ClassItem) -> str:
    return f"{item.line}:{item.key}"


def letters(n: int) -> list[str]:
    """A, B, ..., Z, AA, AB, ... (spreadsheet order): the letters of n candidates."""
    out = []
    for i in range(n):
        s = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            s = chr(65 + r) + s
        out.append(s)
    return out


def lettered(candidates: list[str] | None) -> dict[str, str] | None:
    return None if candidates is None else dict(zip(letters(len(candidates)), candidates))


def candidates_of(rec: dict) -> list[str] | str | None:
    """The candidate list of a result line (older folders kept it under `choices`)."""
    if "candidates" in rec:
        return rec["candidates"]
    ch = rec.get("choices")
    return None if isinstance(ch, dict) else ch


class GenerationTask:
    """Engine task: one request per image."""

    def __init__(self, style: Style, *, cot: bool, n_classes: int):
        self.style, self.cot, self.n_classes = style, cot, n_classes
        self.cot_sentence = catalogue()["generation"]["cot"]

    def unit(self, q: Question) -> Unit:
        return Unit(q.item.image, [Group(qid_of(q.item), 1, q)], key=q.item.key)

    def request(self, group: Group, i: int, image) -> tuple[str, dict]:
        path, body, _ = generation_request(self.style, group.data.text, image, cot=self.cot,
                                           cot_sentence=self.cot_sentence)
        return path, body

    def interpret(self, group: Group, i: int, resp: dict, head: Any) -> dict:
        raw = completion_text(resp)
        q: Question = group.data
        pred = raw.strip()
        if self.style.request == "raw" and self.style.template is not None:
            pred = self.style.template.prediction(self.style.template.render(q.text, cot=self.cot), raw)
        return {"raw": raw, "pred": pred, "tokens": usage_tokens(resp)}

    def _base(self, group: Group) -> dict:
        q: Question = group.data
        cands: list[str] | str | None = q.choices
        if q.choices is not None and len(q.choices) >= self.n_classes:
            cands = "all"  # every class: the order is reproducible from the stream, not worth 10 kB a line
        return {"qid": group.qid, "item": q.item.key, "level": None, "truth": q.item.label,
                "choices": lettered(cands) if isinstance(cands, list) else None, "letter": None,
                "line": q.item.line, "label": q.item.label, "k": None if q.choices is None else len(q.choices),
                "candidates": cands, "question": None if cands == "all" else q.text}

    def record(self, group: Group, answers: list) -> dict:
        ans = answers[0]
        return self._base(group) | {"prediction": ans["pred"]} | ans | {"error": None}

    def error_record(self, group: Group, error: str) -> dict:
        return self._base(group) | {"prediction": None, "raw": None, "pred": None, "error": error}


# ---------------------------------------------------------------- scoring a run

def latest_records(path) -> list[dict]:
    """Result lines, the last line of each qid winning (--retry-errors appends)."""
    from harness.metrics.readers import iter_records

    latest: dict[str, dict] = {}
    for rec in iter_records(path):
        if isinstance(rec, dict) and "qid" in rec:
            latest[rec["qid"]] = rec
    return list(latest.values())


def score_run(records: list[dict], classes: list[str], *, synonyms: dict[str, list[str]] | None = None,
              mapper=None, direct_rule: str = "contained", per_class_scorer: str = "corrected") -> dict:
    """Accuracy under every scorer, the corrected scorer's verdict counts, per-class accuracy, and
    (for closed-world / N-way runs) the label-set mapping with macro precision / recall / F1."""
    from harness.classification.mapping import map_answer
    from harness.classification.metrics import accuracy, confusion_top, macro_prf, per_class_accuracy
    from harness.classification.scoring import SCORERS, NameIndex, corrected, score

    index = NameIndex(classes, synonyms)
    uniq = list(dict.fromkeys(classes))
    labels = [r["label"] for r in records]
    out: dict = {"n": len(records), "n_errors": sum(r.get("error") is not None for r in records)}
    hits: dict[str, list[bool]] = {}
    for s in SCORERS:
        hits[s] = [r.get("error") is None and score(r.get("pred"), r["label"], s, index, synonyms) for r in records]
        out[s] = accuracy(hits[s]).to_json()
    verdicts = [corrected(r.get("pred"), r["label"], index) for r in records]
    status: dict[str, int] = {}
    for v in verdicts:
        status[v.status] = status.get(v.status, 0) + 1
    out["corrected_status"] = status
    out["per_class"] = per_class_accuracy(labels, hits[per_class_scorer])
    out["per_class_scorer"] = per_class_scorer
    out["confusions"] = [list(c) for c in confusion_top(labels, [v.predicted for v in verdicts])]
    if any(r.get("k") for r in records) or mapper is not None:
        how: dict[str, int] = {}
        preds: list[str | None] = []
        for r in records:
            ch = candidates_of(r)
            cands = uniq if ch in (None, "all") else ch
            lab, h = map_answer(r.get("pred"), cands, mapper, direct_rule, index)  # type: ignore[arg-type]
            how[h] = how.get(h, 0) + 1
            preds.append(lab)
        m = macro_prf(labels, preds)
        out["mapping"] = {"mapper": getattr(mapper, "name", None), "direct_rule": direct_rule, "how": how,
                          "needed_mapping": how.get("mapped", 0) + how.get("unmapped", 0),
                          "precision": m.precision, "recall": m.recall, "f1": m.f1, "accuracy": m.accuracy,
                          "n_labels": m.n_labels}
    return out
