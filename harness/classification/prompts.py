"""Classification prompts (data in templates.toml) and the candidate-label streams.

Two candidate streams:
- `reference`: the paper's global RNG replay. `random.seed(1234)`, `random.shuffle(split)`, then item
  by item `random.sample(sorted(set(classes) - {label}), K-1)`, `[label] + others`, `random.shuffle`.
  Fixed-order runs make no RNG calls. Replayed from the start on every (re)run, so a resumed run gets
  exactly the candidates of an uninterrupted one (the reference restarted the stream on resume).
- `hashed` (default): the same draw from a per-item RNG seeded by a stable hash of (seed, image,
  label, K): candidates do not depend on run order, resume or sharding.
Both protocols take the items in the reference's seed-1234 shuffled order, so `--limit 1000` is the
paper's "first 1,000 shuffled items".
"""

from __future__ import annotations

import hashlib
import random
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from harness.classification.datasets import ClassItem, unique

_CATALOGUE = Path(__file__).with_name("templates.toml")
IMAGE = "<image>"
Stream = Literal["reference", "hashed"]


@lru_cache(maxsize=1)
def catalogue() -> dict:
    with _CATALOGUE.open("rb") as f:
        return tomllib.load(f)


def catalogue_hash() -> str:
    return hashlib.sha256(_CATALOGUE.read_bytes()).hexdigest()


# ---------------------------------------------------------------- questions

def open_question(wording: int = 0) -> str:
    w = catalogue()["generation"]["wordings"]
    if not 0 <= wording < len(w):
        raise ValueError(f"--wording must be 0..{len(w) - 1}, got {wording}")
    return w[wording]


def closed_question(question: str, labels: Sequence[str]) -> str:
    """`What type of object is in this photo? Choose one from "c1, c2, ..., cK".`"""
    g = catalogue()["generation"]
    return g["closed"].format(question=question, labels=g["labels_sep"].join(labels))


def nway_question(labels: Sequence[str]) -> str:
    """The thesis prompt (Ritossa 2024) over the N candidate labels."""
    n = catalogue()["nway"]
    return n["prompt"].format(labels=n["labels_sep"].join(labels))


def with_cot(question: str) -> str:
    """The API form of CoT: the sentence appended to the user text."""
    return f"{question} {catalogue()['generation']['cot']}"


# ---------------------------------------------------------------- raw templates

@dataclass(frozen=True)
class RawTemplate:
    name: str
    template: str
    cot: str
    marker: str
    loglik: str
    loglik_default_prefix: str | None = None

    def render(self, question: str, *, cot: bool = False) -> str:
        """The reference's prompt string, `<image>` included."""
        return (self.cot if cot else self.template).replace("{question}", question)

    def loglik_prompt(self, question: str, answer: str) -> str:
        """The log-likelihood prompt with `answer` (prefix, or prefix + " " + class) after the question."""
        return self.loglik.replace("{question}", question).replace("{prefix}", answer)

    def prediction(self, prompt: str, completion: str) -> str:
        """The reference's `pred`: decoded prompt + generation, text after the last marker, stripped."""
        return (prompt.replace(IMAGE, "") + completion).split(self.marker)[-1].strip()


def raw_templates() -> list[str]:
    return sorted(catalogue()["raw"])


def raw_template(name: str) -> RawTemplate:
    raw = catalogue()["raw"]
    if name not in raw:
        raise ValueError(f"unknown raw template {name!r}; known: {', '.join(sorted(raw))}")
    t = raw[name]
    return RawTemplate(name, t["template"], t["cot"], t["marker"], t["loglik"], t.get("loglik_prefix"))


def strip_image(prompt: str) -> str:
    """A raw prompt for a text-only request: the image placeholder (and its newline) removed."""
    return prompt.replace(IMAGE + "\n", "").replace(IMAGE, "")


ASSISTANT_SLOT = "{assistant}"


def raw_chat_template(prompt: str, *, bos: bool = True) -> str:
    """A Jinja chat template that renders exactly `prompt` (the question already in it) for a chat of a
    user message with image parts and optionally a final assistant message: `<image>` becomes one
    placeholder per image part of the user message, `{assistant}` the assistant message's text. Sent as
    the request's `chat_template`, vLLM then tokenizes the reference's raw string while still receiving
    the image (the server needs `--trust-request-chat-template`). The loops follow the usual
    `for message in messages` / `for part in message['content']` shape, which vLLM recognises as the
    OpenAI content format."""
    images = ("{% for message in messages %}{% if message['role'] == 'user' and message['content'] is not string %}"
              "{% for part in message['content'] %}{% if part['type'] in ['image', 'image_url'] %}" + IMAGE
              + "{% endif %}{% endfor %}{% endif %}{% endfor %}")
    answer = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
              "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
              "{% endfor %}{% endif %}{% endif %}{% endfor %}")
    out = ["{{ bos_token }}" if bos else ""]
    for piece in re.split(f"({re.escape(IMAGE)}|{re.escape(ASSISTANT_SLOT)})", prompt):
        if piece == IMAGE:
            out.append(images)
        elif piece == ASSISTANT_SLOT:
            out.append(answer)
        elif piece:
            out.append("{% raw %}" + piece + "{% endraw %}")
    return "".join(out)


# ---------------------------------------------------------------- candidate streams

def reference_order(items: Sequence[ClassItem], seed: int = 1234) -> tuple[list[ClassItem], random.Random]:
    """`random.seed(seed); random.shuffle(data)`: the order and the RNG whose stream continues."""
    rng = random.Random(seed)
    data = list(items)
    rng.shuffle(data)
    return data, rng


def _draw(rng: random.Random, label: str, others_pool: list[str], k: int) -> list[str]:
    others = rng.sample(others_pool, k - 1)
    choices = [label] + others
    rng.shuffle(choices)
    return choices


def item_seed(seed: int, item: ClassItem, k: int) -> int:
    h = hashlib.blake2b(f"{seed}\x1f{item.key}\x1f{item.label}\x1f{k}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def candidate_stream(items: Sequence[ClassItem], classes: Sequence[str], k: int | None, *,
                     fixed_order: bool = False, stream: Stream = "hashed", seed: int = 1234,
                     ) -> Iterator[tuple[ClassItem, list[str] | None]]:
    """(item, candidate labels or None for open world), items in the reference's shuffled order.

    k: None = open world; else the label-set size (truth included). Fixed order: every class in class-list
    order (the reference keeps ImageNet's duplicate names there; `hashed` de-duplicates)."""
    data, rng = reference_order(items, seed)
    pool = sorted(set(classes))
    if k is not None:
        if fixed_order:
            n = len(classes) if stream == "reference" else len(pool)
            if k != n:
                raise ValueError(f"fixed label order uses every class: K must be {n}, got {k}")
        elif not 2 <= k <= len(pool):
            raise ValueError(f"K must be in 2..{len(pool)} (distinct classes), got {k}")
    fixed = list(classes) if stream == "reference" else unique(classes)
    for item in data:
        if k is None:
            yield item, None
        elif fixed_order:
            yield item, fixed
        else:
            others = [c for c in pool if c != item.label]  # == sorted(set(classes) - {label})
            r = rng if stream == "reference" else random.Random(item_seed(seed, item, k))
            yield item, _draw(r, item.label, others, k)
