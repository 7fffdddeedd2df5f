"""The hierarchy experiment as an engine task: items -> questions (one request each) -> result lines.

Result line (DESIGN.md section 4): qid, item, level, truth, choices (letter -> text), letter,
prediction, raw, error, scored (False for the taxonomy root), plus `auto` (text-mode leaf filled with
the label, not asked), and for binary prompts `option` (the statement's letter) and `yes` (1/0/-1);
answer fields: tokens, latency, letter_logprobs (logprobs mode), scores/logits (CLIP), cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from harness.backends.http import FatalError, RetryableError
from harness.backends.images import ImagePayload
from harness.data.items import LETTERS, Item
from harness.engine.cache import request_key
from harness.engine.core import Group, Unit
from harness.prompts.hierarchy import PromptConfig, Question, Renderer, build_messages, build_prompt
from harness.prompts.parsing import parse_letter, parse_yes_no

AnswerMode = Literal["generate", "choice", "logprobs"]


@dataclass(frozen=True)
class Decoding:
    model: str
    answer: AnswerMode = "generate"
    max_tokens: int = 10
    temperature: float = 0.0
    seed: int | None = None
    top_logprobs: int = 20
    parser: str = "robust"


def record(q: Question, *, letter: str | None, raw: str | None, error: str | None, **extra) -> dict:
    """The result line of a question."""
    choices = q.choices
    rec = {
        "qid": q.qid,
        "item": q.item_id,
        "level": q.level,
        "truth": q.truth,
        "choices": choices,
        "letter": letter,
        "prediction": q.auto if q.auto is not None else (choices.get(letter) if letter else None),
        "raw": raw,
        "error": error,
        "scored": q.scored,
    }
    if q.auto is not None:
        rec["auto"] = True
    if q.option is not None:
        rec["option"] = LETTERS[q.option]
    rec.update(extra)
    return rec


def units(work: Iterable[tuple[Item, list[Question]]]) -> Iterator[Unit]:
    """One unit an item: its asked questions as groups, its auto-filled ones as records."""
    for item, qs in work:
        groups, auto = [], []
        for q in qs:
            if q.auto is not None:
                auto.append(record(q, letter=None, raw=None, error=None))
            else:
                groups.append(Group(q.qid, 1, q))
        image = item.image if any(g.data.image for g in groups) else None
        yield Unit(image, groups, auto, key=item.id)


def questions(items: Iterable[Item], renderer: Renderer, done: set[str]) -> Iterator[tuple[Item, list[Question]]]:
    """(item, questions not done yet). Every item is rendered: keeps the reference shuffle stream in step."""
    for item in items:
        qs = [q for q in renderer.render(item) if q.qid not in done]
        if qs:
            yield item, qs


class ChatTask:
    """Hierarchy questions (and binary statements) as OpenAI chat requests, or as raw completions
    (`prompt.request == "completions"`: a base LLM without chat template, POST /completions with the
    prompt `question + " Answer:"`, the answer read from choices[0].text)."""

    def __init__(self, prompt: PromptConfig, decoding: Decoding):
        self.prompt, self.dec = prompt, decoding
        self.completions = prompt.request == "completions"
        self.path = "/completions" if self.completions else "/chat/completions"

    def body(self, q: Question, image: ImagePayload | None, *, for_key: bool = False) -> dict:
        d = self.dec
        if self.completions:
            b: dict = {"model": d.model, "prompt": build_prompt(q), "temperature": d.temperature}
        else:
            url = None
            if image is not None:
                url = f"digest:{image.uuid}:{image.n_bytes}" if for_key else image.url
            msgs = build_messages(q, url, self.prompt, uuid=None if for_key or image is None else image.uuid)
            b = {"model": d.model, "messages": msgs, "temperature": d.temperature}
        if d.seed is not None:
            b["seed"] = d.seed
        if d.answer == "logprobs":
            # completions: `logprobs` is the number of top tokens; chat: a flag plus top_logprobs
            b.update({"max_tokens": 1, "logprobs": d.top_logprobs} if self.completions
                     else {"max_tokens": 1, "logprobs": True, "top_logprobs": d.top_logprobs})
        else:
            b["max_tokens"] = d.max_tokens
        if d.answer == "choice":
            b["structured_outputs"] = {"choice": ["Yes", "No"] if q.option is not None else list(q.choices)}
        return b

    # -- engine task
    def request(self, group: Group, i: int, image: ImagePayload | None) -> tuple[str, bytes]:
        """The body serialised once, keys sorted: without an image these bytes are also the cache key's."""
        q: Question = group.data
        return self.path, orjson.dumps(self.body(q, image if q.image else None), option=orjson.OPT_SORT_KEYS)

    def cache_key(self, group: Group, i: int, image: ImagePayload | None, body: bytes) -> str:
        q: Question = group.data
        if not q.image or image is None:
            return hashlib.sha256(body).hexdigest()  # = request_key(body as a dict)
        return request_key(self.body(q, image, for_key=True))

    def est_tokens(self, group: Group, i: int) -> int:
        q: Question = group.data
        return len(q.text) // 4 + (85 if q.image else 0) + (1 if self.dec.answer == "logprobs" else self.dec.max_tokens)

    def retry_empty(self, group: Group, ans: dict) -> bool:
        return ans["raw"] == "" and group.data.option is None and self.dec.answer != "logprobs"

    def interpret(self, group: Group, i: int, resp: dict, head: Any = None) -> dict:
        """Response JSON -> the answer fields of a result line. Raises RetryableError if malformed."""
        q: Question = group.data
        try:
            choice = resp["choices"][0]
            raw = choice["text"] if self.completions else choice["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            what = "choices[0].text" if self.completions else "choices[0].message"
            raise RetryableError(f"malformed response (no {what})") from None
        if raw is None:
            raw = ""
        out: dict = {"raw": raw}
        usage = resp.get("usage") or {}
        out["tokens"] = [usage.get("prompt_tokens", 0) or 0, usage.get("completion_tokens", 0) or 0]
        if q.option is not None:  # binary statement
            out["yes"] = parse_yes_no(raw)
            out["letter"] = None
            return out
        if self.dec.answer == "logprobs":
            if choice.get("logprobs") is None:
                raise FatalError("the endpoint returned no logprobs: it does not support `--answer logprobs` "
                                 "(transformers serve ignores it); use `--answer generate`, or vLLM")
            if self.completions:  # {"top_logprobs": [{token: logprob, ...}, ...]}
                first = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
                top = [{"token": k, "logprob": v} for k, v in sorted(first.items(), key=lambda kv: -kv[1])]
            else:
                lp = (choice.get("logprobs") or {}).get("content") or []
                top = lp[0].get("top_logprobs") or [] if lp else []
            dist: dict[str, float] = {}
            for t in top:
                tok = str(t.get("token", "")).strip().strip("().:*")
                if tok in q.choices and tok not in dist:
                    dist[tok] = float(t.get("logprob", float("-inf")))
            out["letter"] = max(dist, key=dist.__getitem__) if dist else None
            out["letter_logprobs"] = dist
            return out
        # An empty completion is retried once by the engine, then kept; only a non-empty answer outside
        # the letters shows that the endpoint ignored structured_outputs.
        if self.dec.answer == "choice" and raw.strip() and raw.strip() not in q.choices:
            raise FatalError(f"`--answer choice` got {raw[:40]!r}, not one of the offered letters: the endpoint "
                             "ignored vLLM's structured_outputs; use `--answer logprobs` or `--answer generate`")
        out["letter"] = parse_letter(raw, q.choices, self.dec.parser)  # type: ignore[arg-type]
        return out

    def record(self, group: Group, answers: list[dict]) -> dict:
        ans = answers[0]  # shared with the memo, cache and in-flight waiters: read, never changed
        rec = record(group.data, letter=ans["letter"], raw=ans["raw"], error=None)
        for k, v in ans.items():
            if k != "letter" and k != "raw":
                rec[k] = v
        return rec

    def error_record(self, group: Group, error: str) -> dict:
        return record(group.data, letter=None, raw=None, error=error)
