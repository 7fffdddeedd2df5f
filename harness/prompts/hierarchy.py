"""Prompt catalogue (data in prompts.toml) and rendering of items into questions.

A question is one chat request: optional system text, the user text (prompt, lettered options,
suffix) and optionally the item's image. Option order is a policy:
  - "reference": replay CPython `random.seed(42)` + in-place `random.shuffle` over records and levels
    in file order, exactly as the reference local-model image scripts did (text runs: file order);
  - "file": options in file order (reference GPT, CLIP and text-only runs);
  - "hashed" (default): a per-question shuffle seeded by a stable hash of (item, level, seed), so it
    does not depend on run order and survives resume and sharding.
"""

from __future__ import annotations

import hashlib
import json
import random
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_serializer

from harness.data.items import LETTERS, Item
from harness.data.taxonomy import get_info, load_taxonomy

_CATALOGUE = Path(__file__).with_name("prompts.toml")

Mode = Literal["image", "text", "binary"]
OptionOrder = Literal["reference", "file", "hashed"]


@lru_cache(maxsize=1)
def catalogue() -> dict:
    with _CATALOGUE.open("rb") as f:
        return tomllib.load(f)


def catalogue_hash() -> str:
    """sha256 of the prompt catalogue file (recorded in run manifests)."""
    return hashlib.sha256(_CATALOGUE.read_bytes()).hexdigest()


class PromptConfig(BaseModel):
    """Everything that decides the text of a question. Recorded in every run manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    taxonomy: str
    """Taxonomy id (cub, inat_animal, inat_plant, imagenet_animal, imagenet_artifact, food)."""
    mode: Mode = "image"
    variant: int | str = 0
    """0..4, or a named row of the taxonomy's section ("gpt", "og_qwen_0")."""
    system: str | None = "auto"
    """A [system] key of the catalogue, "auto" (mode default), or None for the model's default."""
    suffix: str = "standard"
    taxonomy_cot: bool = False
    """iNat taxonomy-based CoT: only the system prompt changes."""
    taxonomy_in_context: bool = False
    """CUB taxonomy-in-context: the whole taxonomy dict in the system prompt (see context_position)."""
    ask_leaf: bool = False
    """Text mode: ask the leaf level too (GPT text scripts) instead of auto-filling it with the label."""
    option_order: OptionOrder = "hashed"
    seed: int = 0
    """Seed of the hashed option order."""
    image_first: bool = True
    """Image part before the text (vLLM/Qwen order); False = GPT order (text then image)."""
    detail: str | None = None
    """OpenAI image `detail` ("low" in the reference GPT runs); vLLM ignores it."""
    context_position: Literal["system", "user"] = "system"
    """Taxonomy in context: in the system prompt with no "\\n" before the suffix (Qwen), or in the user
    turn before the image, "Here is a taxonomy: {...}\\n<image>\\n{question}" (LLaVA-OV profiles)."""
    label_case: Literal["original", "lower"] = "original"
    """Text mode: the leaf label as in the file, or lower-cased (the LLaVA-OV text scripts)."""
    ask_none: bool = False
    """Ask levels whose truth is None (the reference text and GPT scripts; `--protocol reference` only);
    otherwise such levels are skipped, as the reference image scripts do."""
    request: Literal["chat", "completions"] = "chat"
    """chat messages, or one raw completion prompt (a base LLM without chat template, no system text)."""
    text_parts: bool = False
    """A text-only user turn as a list with one text part (the GPT text scripts) instead of a string."""

    @model_serializer(mode="wrap")
    def _compact(self, handler):
        # Fields added later are left out at their defaults: folders written before them keep their
        # fingerprint (a resume compares the recorded prompt settings as a whole).
        d = handler(self)
        for k, v in _LATER_DEFAULTS.items():
            if k in d and d[k] == v:
                del d[k]
        return d

    @field_validator("taxonomy")
    @classmethod
    def _known(cls, v: str) -> str:
        # a ValueError (not the KeyError get_info raises) becomes a ValidationError naming the field
        try:
            get_info(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v

    def system_text(self) -> str | None:
        cat = catalogue()["system"]
        key = self.system
        if self.taxonomy_in_context and self.context_position == "system":
            return cat["taxonomy_in_context"] + taxonomy_context(self.taxonomy)
        if key == "auto":
            if self.taxonomy_cot:
                key = "taxonomy_cot_plant" if self.taxonomy == "inat_plant" else "taxonomy_cot_animal"
            else:
                key = {"image": "qwen_expert", "text": "helpful", "binary": "binary"}[self.mode]
        if key is None or key == "none":
            return None
        if key not in cat:
            raise ValueError(f"unknown system prompt {key!r}; known: {', '.join(cat)}, none")
        return cat[key]

    def template(self) -> str:
        section = catalogue()["text" if self.mode == "text" else "image"].get(self.taxonomy)
        if section is None:
            raise ValueError(f"no {self.mode} prompts for taxonomy {self.taxonomy!r}")
        v = self.variant
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if v == "gpt":
            v = section["gpt"]
        if isinstance(v, int):
            if not 0 <= v < len(section["variants"]):
                raise ValueError(f"prompt variant {v} out of range 0..{len(section['variants']) - 1}")
            return section["variants"][v]
        if v not in section:
            raise ValueError(f"unknown prompt variant {v!r} for {self.mode}/{self.taxonomy}")
        return section[v]

    def suffix_text(self) -> str:
        quirk = self.taxonomy_in_context and self.context_position == "system"
        return catalogue()["suffix"]["no_newline" if quirk else self.suffix]

    def user_context(self) -> str | None:
        """Text of the user turn before the image (taxonomy in context in the user turn), else None."""
        if not (self.taxonomy_in_context and self.context_position == "user"):
            return None
        c = catalogue()["context"]
        return c["user_prefix"] + taxonomy_context(self.taxonomy) + c["before_image"]


_LATER_DEFAULTS = {"context_position": "system", "label_case": "original", "ask_none": False, "request": "chat",
                   "text_parts": False}


@lru_cache(maxsize=8)
def taxonomy_context(taxonomy: str) -> str:
    """The taxonomy dict as Python `str()` (as the reference put it into the system prompt)."""
    tax = load_taxonomy(taxonomy)
    return str(json.loads(tax.source.read_text(encoding="utf-8")))


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~0.8 us more to build, per question
class Question:
    """One request of a run (or an auto-filled level that is not asked)."""

    qid: str
    item_id: str
    level: int  # N of levelN
    index: int  # 0-based position of the level in the item (picks the rank word)
    options: tuple[str, ...]  # in letter order
    truth: str | None
    system: str | None
    text: str
    image: str | None  # image path (image and binary modes)
    scored: bool  # False for the taxonomy root
    auto: str | None = None  # text mode leaf: prediction filled with the label, not asked
    option: int | None = None  # binary mode: index (letter order) of the option in the statement
    context: str | None = None  # user text before the image (taxonomy in context in the user turn)
    _choices: dict[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def choices(self) -> dict[str, str]:
        """Letter -> option (built once: the parser and the result line both read it)."""
        if self._choices is None:
            self._choices = dict(zip(LETTERS, self.options))
        return self._choices


def make_qid(item_id: str, level: int, mode: str, variant: int | str, answer: str, option: int | None = None) -> str:
    key = f"{item_id}\x1f{level}\x1f{mode}\x1f{variant}\x1f{answer}\x1f{'' if option is None else option}"
    return hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def hashed_order(options: tuple[str, ...], item_id: str, level: int, seed: int) -> tuple[str, ...]:
    h = hashlib.blake2b(f"{item_id}\x1f{level}\x1f{seed}".encode(), digest_size=8).digest()
    out = list(options)
    random.Random(int.from_bytes(h, "big")).shuffle(out)
    return tuple(out)


def format_options(options: tuple[str, ...]) -> str:
    return "\n".join([f"{L}. {o}" for L, o in zip(LETTERS, options)])


class Renderer:
    """Turns items into questions for one PromptConfig. Stateful only for the reference shuffle
    replay, which must see every item in file order (resume re-reads from the start)."""

    def __init__(self, cfg: PromptConfig, answer: str = "generate"):
        self.cfg = cfg
        self.answer = answer
        self.info = get_info(cfg.taxonomy)
        # a raw completion has no system turn (the reference base-model scripts send none)
        self._system = None if cfg.request == "completions" else cfg.system_text()
        self._template = cfg.template() if cfg.mode != "binary" else None
        self._suffix = cfg.suffix_text()
        self._context = cfg.user_context()
        self._qprefix = catalogue()["context"]["question_prefix"] if self._context is not None else ""
        # Reference replay: one RNG seeded 42 for the whole stream. Text runs never shuffled.
        self._rng = random.Random(42) if cfg.option_order == "reference" and cfg.mode != "text" else None
        self.variant_key = cfg.variant if not cfg.taxonomy_in_context else f"{cfg.variant}+tic"
        if cfg.taxonomy_cot:
            self.variant_key = f"{self.variant_key}+tcot"
        if cfg.suffix != "standard":
            self.variant_key = f"{self.variant_key}+{cfg.suffix}"

    def _order(self, item: Item, n: int, options: tuple[str, ...]) -> tuple[str, ...]:
        if self._rng is not None:
            opts = list(options)
            self._rng.shuffle(opts)
            return tuple(opts)
        if self.cfg.option_order == "hashed":
            return hashed_order(options, item.id, n, self.cfg.seed)
        return options

    def _rank(self, index: int) -> str:
        r = self.info.ranks
        return r[min(index, len(r) - 1)] if r else ""

    def render(self, item: Item) -> list[Question]:
        cfg = self.cfg
        mode, ask_none, text_leaf = cfg.mode, cfg.ask_none, cfg.mode == "text" and not cfg.ask_leaf
        order = self._rng is not None or cfg.option_order == "hashed"
        out: list[Question] = []
        last = len(item.levels) - 1
        label = item.label.lower() if mode == "text" and cfg.label_case == "lower" else item.label
        for t, lv in enumerate(item.levels):
            if lv.truth is None and not ask_none:  # asks nothing and consumes no reference shuffle
                continue
            options = self._order(item, lv.n, lv.choices) if order else lv.choices
            qid = make_qid(item.id, lv.n, mode, self.variant_key, self.answer)
            scored = not lv.root
            if text_leaf and t == last:
                out.append(Question(qid, item.id, lv.n, t, options, lv.truth, None, "", None, scored,
                                    auto=label))
                continue
            if mode == "binary":
                cat = catalogue()["binary"]
                for k, opt in enumerate(options):
                    text = cat["statement"].format(subject=self.info.subject, rank=self._rank(t), option=opt) \
                        + "\n" + cat["question"]
                    qid_k = make_qid(item.id, lv.n, cfg.mode, self.variant_key, self.answer, k)
                    out.append(Question(qid_k, item.id, lv.n, t, options, lv.truth, self._system, text,
                                        item.image, scored, option=k))
                continue
            prompt = self._template.format(rank=self._rank(t), label=label)  # type: ignore[union-attr]
            text = self._qprefix + prompt + "\n" + format_options(options) + self._suffix
            image = item.image if mode == "image" else None
            out.append(Question(qid, item.id, lv.n, t, options, lv.truth, self._system, text, image, scored,
                                context=self._context))
        return out

    def stream(self, items) -> Iterator[tuple[Item, list[Question]]]:
        for item in items:
            yield item, self.render(item)


def build_messages(q: Question, image_url: str | None, cfg: PromptConfig, uuid: str | None = None) -> list[dict]:
    """OpenAI chat messages. Image first then text (vLLM/Qwen) unless cfg.image_first is False."""
    msgs: list[dict] = []
    if q.system is not None:
        msgs.append({"role": "system", "content": q.system})
    if q.image is None or image_url is None:
        text_only = (q.context or "") + q.text
        msgs.append({"role": "user", "content": [{"type": "text", "text": text_only}] if cfg.text_parts else text_only})
        return msgs
    img: dict = {"url": image_url}
    if cfg.detail:
        img["detail"] = cfg.detail
    part: dict = {"type": "image_url", "image_url": img}
    if uuid:
        part["uuid"] = uuid  # vLLM: stable multimodal cache id
    text = {"type": "text", "text": q.text}
    if q.context is not None:  # "Here is a taxonomy: {...}\n" <image> "\n{question}" (LLaVA-OV reference)
        content = [{"type": "text", "text": q.context}, part, text]
    else:
        content = [part, text] if cfg.image_first else [text, part]
    msgs.append({"role": "user", "content": content})
    return msgs


def build_prompt(q: Question) -> str:
    """The raw completion prompt of a question (a base LLM: no chat template, no system text)."""
    return catalogue()["completions"]["template"].format(question=(q.context or "") + q.text)
