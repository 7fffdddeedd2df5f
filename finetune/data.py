"""SFT data from benchmark items: the questions `harness run` asks, with their answers, as chat examples.

The same items that are evaluated become training data: every level of every item is rendered by
`harness.prompts.hierarchy.Renderer` (image mode and text-only mode, the reference prompt catalogue), and the
assistant turn is the option's letter (or its text). Items are split into train and eval by a stable
hash of the species (the leaf label) or of the image, so a held-out item never leaks into training
and a split does not depend on file order or on which other items exist.

Two file formats:
  - ours (JSONL, one conversation a line): ``{"id", "image", "messages": [system?, user, assistant,
    ...], "item", "level", "mode", "truth", "answer"}``; ``image`` is null for text-only examples and
    belongs to the first user turn.
  - LLaVA conversation JSON (a list; hierarchy-protocol.md 1.4): ``{"id", "image"?, "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}``; a record
    without ``image`` is text-only. It has no system turn: the reference training fork adds
    "You are a helpful assistant.", and so does :func:`read_conversations` when reading one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from harness.data.items import LETTERS, Item, parse_root_map, read_items, remap
from harness.prompts.hierarchy import PromptConfig, Question, Renderer, catalogue

Mode = Literal["image", "text"]
Answer = Literal["letter", "option", "letter_option"]
SplitBy = Literal["species", "image", "none"]

IMAGE_TOKEN = "<image>"  # LLaVA conversation format placeholder
LLAVA_SYSTEM = "You are a helpful assistant."
# Option-text answers contradict the standard "answer with the letter" suffix; they get this one.
OPTION_SUFFIX = "\nAnswer with the option's text from the given choices directly."


@dataclass(frozen=True)
class Conversation:
    """One training example: an optional system prompt, one or more (user, assistant) turns, and an
    optional image shown in the first user turn. Loss is on the assistant turns only."""

    id: str
    turns: tuple[tuple[str, str], ...]
    image: str | None = None
    system: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def messages(self) -> list[dict]:
        """OpenAI-style chat messages with string content (the file format; the image is separate)."""
        out: list[dict] = [{"role": "system", "content": self.system}] if self.system is not None else []
        for user, assistant in self.turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out


class DataConfig(BaseModel):
    """How items become conversations. Recorded in the data manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    taxonomy: str
    modes: tuple[Mode, ...] = ("image", "text")
    image_variant: int | str = 0
    """Prompt variant of image questions (0..4); `--profile` picks the model's published one."""
    text_variant: int | str = 0
    system: str | None = "helpful"
    """System prompt key of the catalogue ("helpful" as in the reference training data, section 1.4),
    "auto" (the evaluation default of each mode), or None (no system turn)."""
    answer: Answer = "letter"
    seed: int = 0
    """Seed of the per-question hashed option order."""
    include_root: bool = False
    """Also train on the taxonomy root level (one option; never scored)."""
    ask_leaf: bool = False
    """Text mode: also ask the leaf level (the evaluation auto-fills it with the label)."""
    dedupe_text: bool = False
    """Text mode: one conversation per (species, level) instead of one per image (text questions
    depend on the label only, so the images of a species repeat them with other option orders)."""


def _prompt(cfg: DataConfig, mode: Mode) -> PromptConfig:
    return PromptConfig(
        taxonomy=cfg.taxonomy, mode=mode, variant=cfg.image_variant if mode == "image" else cfg.text_variant,
        system=cfg.system, ask_leaf=cfg.ask_leaf, option_order="hashed", seed=cfg.seed,
    )


def answer_text(q: Question, answer: Answer) -> str:
    """The assistant turn for a question: its truth's letter, the option text, or both ("B. text")."""
    truth = (q.truth or "").lower()
    try:
        k = next(i for i, o in enumerate(q.options) if o.lower() == truth)
    except StopIteration:
        raise ValueError(f"item {q.item_id!r} level{q.level}: truth {q.truth!r} is not among the options") from None
    letter, option = LETTERS[k], q.options[k]
    return {"letter": letter, "option": option, "letter_option": f"{letter}. {option}"}[answer]


def conversations_from_items(items: Iterable[Item], cfg: DataConfig) -> Iterator[Conversation]:
    """One single-turn conversation per asked level of every item, image mode first, then text mode
    (per item, so an item's examples stay together)."""
    renderers = {m: Renderer(_prompt(cfg, m)) for m in cfg.modes}
    standard_suffix = catalogue()["suffix"]["standard"]
    seen_text: set[tuple[str, int]] = set()
    for item in items:
        for mode, renderer in renderers.items():
            for q in renderer.render(item):
                if q.auto is not None or (not q.scored and not cfg.include_root) or q.truth is None:
                    continue
                if mode == "text" and cfg.dedupe_text:
                    key = (item.label.strip().lower(), q.level)
                    if key in seen_text:
                        continue
                    seen_text.add(key)
                text = q.text
                if cfg.answer == "option" and text.endswith(standard_suffix):
                    text = text[: -len(standard_suffix)] + OPTION_SUFFIX
                yield Conversation(
                    id=f"{q.qid}",
                    turns=((text, answer_text(q, cfg.answer)),),
                    image=q.image,
                    system=q.system,
                    meta={"item": item.id, "level": q.level, "mode": mode, "truth": q.truth},
                )


# -- splits ------------------------------------------------------------------------------------------


def split_key(item: Item, by: SplitBy) -> str:
    """What must not be shared by train and eval: the species (leaf label, case-folded) or the image."""
    if by == "species":
        return item.label.strip().lower()
    if by == "image":
        return item.image
    return ""


def split_of(item: Item, by: SplitBy, eval_fraction: float, seed: int = 0) -> Literal["train", "eval"]:
    """A stable hash of (seed, key) against `eval_fraction`: the same key always lands on the same side,
    whatever else is in the file (so the split survives added items and never depends on order)."""
    if by == "none" or eval_fraction <= 0:
        return "train"
    h = hashlib.blake2b(f"{seed}\x1f{split_key(item, by)}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(h, "big") / 2**64 < eval_fraction else "train"


class SplitReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: SplitBy
    eval_fraction: float
    seed: int
    items: dict[str, int] = Field(default_factory=dict)
    keys: dict[str, int] = Field(default_factory=dict)
    """Distinct split keys (species or images) per side."""
    shared_keys: int = 0
    """Keys on both sides: 0 by construction (checked, not assumed)."""


def split_items_file(
    path: str | Path, out_dir: str | Path, *, by: SplitBy = "species", eval_fraction: float = 0.3, seed: int = 0,
    root_map: Iterable[str] = (), strict: bool = True,
) -> tuple[Path, Path, SplitReport]:
    """Copy each line of an items JSONL into `items_train.jsonl` or `items_eval.jsonl` (bytes kept as
    they are, so `harness run --data items_eval.jsonl` evaluates exactly the held-out items)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / "items_train.jsonl", "eval": out / "items_eval.jsonl"}
    rep = SplitReport(by=by, eval_fraction=eval_fraction, seed=seed, items={"train": 0, "eval": 0})
    keys: dict[str, set[str]] = {"train": set(), "eval": set()}
    raw_lines = Path(path).read_bytes().split(b"\n")  # as file iteration numbers lines
    with files["train"].open("wb") as ftr, files["eval"].open("wb") as fev:
        sinks = {"train": ftr, "eval": fev}
        for item in read_items(path, root_map=list(root_map), strict=strict):
            side = split_of(item, by, eval_fraction, seed)
            sinks[side].write(raw_lines[item.line - 1].rstrip(b"\r") + b"\n")
            rep.items[side] += 1
            keys[side].add(split_key(item, by))
    rep.keys = {k: len(v) for k, v in keys.items()}
    rep.shared_keys = len(keys["train"] & keys["eval"]) if by != "none" else 0
    if rep.shared_keys:  # cannot happen with a pure function of the key; a guard against future edits
        raise AssertionError(f"{rep.shared_keys} split keys on both sides")
    return files["train"], files["eval"], rep


# -- files -------------------------------------------------------------------------------------------


def to_record(c: Conversation) -> dict:
    """Our JSONL record."""
    return {"id": c.id, "image": c.image, "messages": c.messages(), **c.meta,
            **({"answer": c.turns[0][1]} if len(c.turns) == 1 else {})}


def to_llava(c: Conversation) -> dict:
    """LLaVA conversation format (section 1.4): the image placeholder opens the first human turn."""
    conv = []
    for k, (user, assistant) in enumerate(c.turns):
        value = f"{IMAGE_TOKEN}\n{user}" if (k == 0 and c.image is not None) else user
        conv += [{"from": "human", "value": value}, {"from": "gpt", "value": assistant}]
    rec: dict = {"id": c.id}
    if c.image is not None:
        rec["image"] = c.image
    rec["conversations"] = conv
    return rec


def write_jsonl(path: str | Path, convs: Iterable[Conversation]) -> int:
    n = 0
    with Path(path).open("wb") as f:
        for c in convs:
            f.write(orjson.dumps(to_record(c)) + b"\n")
            n += 1
    return n


def write_llava(path: str | Path, convs: Iterable[Conversation]) -> int:
    """A JSON list, one record a line (what LLaVA-style training code `json.load`s)."""
    n = 0
    with Path(path).open("wb") as f:
        f.write(b"[")
        for c in convs:
            f.write((b",\n" if n else b"\n") + orjson.dumps(to_llava(c)))
            n += 1
        f.write(b"\n]\n")
    return n


class DataError(ValueError):
    """A bad SFT record; the message names file, record and field."""

    def __init__(self, file: str | Path, where: int, field: str | None, message: str):
        loc = f"{file}:{where}" + (f": field {field!r}" if field else "")
        super().__init__(f"{loc}: {message}")


def _from_messages(rec: dict, file: Path, where: int, root_map) -> Conversation:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(file, where, "messages", "must be a non-empty list")
    system = None
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise DataError(file, where, f"messages[{k}]", "must be {role: system|user|assistant, content: string}")
    if msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    turns = _pairs([(m["role"], m["content"]) for m in msgs], ("user", "assistant"), file, where, "messages")
    image = rec.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(file, where, "image", "must be a string path or null")
    meta = {k: rec[k] for k in ("item", "level", "mode", "truth") if k in rec}
    return Conversation(str(rec.get("id", where)), turns, remap(image, root_map) if image else None, system, meta)


def _from_llava(rec: dict, file: Path, where: int, root_map, system: str | None) -> Conversation:
    conv = rec["conversations"]
    if not isinstance(conv, list) or not conv:
        raise DataError(file, where, "conversations", "must be a non-empty list")
    for k, m in enumerate(conv):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str) or m.get("from") not in (
                "human", "gpt", "system"):
            raise DataError(file, where, f"conversations[{k}]", "must be {from: human|gpt, value: string}")
    if conv[0]["from"] == "system":
        system, conv = conv[0]["value"], conv[1:]
    turns = _pairs([(m["from"], m["value"]) for m in conv], ("human", "gpt"), file, where, "conversations")
    image = rec.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(file, where, "image", "must be a string path (LLaVA lists of images are not supported)")
    first = turns[0][0]
    if image is not None:
        if IMAGE_TOKEN not in first:
            raise DataError(file, where, "conversations[0]", f"has an image but no {IMAGE_TOKEN} placeholder")
        first = first.replace(IMAGE_TOKEN + "\n", "", 1) if (IMAGE_TOKEN + "\n") in first else first.replace(IMAGE_TOKEN, "", 1)
        turns = ((first, turns[0][1]),) + turns[1:]
    if any(IMAGE_TOKEN in u for u, _ in turns):
        raise DataError(file, where, "conversations", f"{IMAGE_TOKEN} placeholder without an image, or more than one")
    return Conversation(str(rec.get("id", where)), turns, remap(image, root_map) if image else None, system)


def _pairs(seq: list[tuple[str, str]], roles: tuple[str, str], file, where, fname) -> tuple[tuple[str, str], ...]:
    if len(seq) % 2 or not seq:
        raise DataError(file, where, fname, f"turns must alternate {roles[0]}/{roles[1]} and end with {roles[1]}")
    out = []
    for k in range(0, len(seq), 2):
        (r1, u), (r2, a) = seq[k], seq[k + 1]
        if (r1, r2) != roles:
            raise DataError(file, where, f"{fname}[{k}]", f"turns must alternate {roles[0]}/{roles[1]}, got {r1}/{r2}")
        out.append((u, a))
    return tuple(out)


def read_conversations(path: str | Path, *, root_map: Iterable[str] = (),
                       llava_system: str | None = LLAVA_SYSTEM) -> list[Conversation]:
    """Read our JSONL or a LLaVA conversation JSON list (detected from the first byte)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such SFT data file")
    rm = parse_root_map(root_map)
    data = p.read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            recs = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise DataError(p, 0, None, f"invalid JSON: {e}") from None
        numbered = list(enumerate(recs))  # record index (0-based) for messages
    else:
        numbered = []
        for lineno, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                numbered.append((lineno, orjson.loads(raw)))
            except orjson.JSONDecodeError as e:
                raise DataError(p, lineno, None, f"invalid JSON: {e}") from None
    out = []
    for where, rec in numbered:
        if not isinstance(rec, dict):
            raise DataError(p, where, None, "expected a JSON object")
        if "messages" in rec:
            out.append(_from_messages(rec, p, where, rm))
        elif "conversations" in rec:
            out.append(_from_llava(rec, p, where, rm, llava_system))
        else:
            raise DataError(p, where, "messages", "missing (need `messages`, or `conversations` in LLaVA format)")
    return out
