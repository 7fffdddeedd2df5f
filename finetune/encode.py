"""Conversations -> token ids and labels, with the loss on the assistant tokens only.

The masks come from the model's own chat template, not from token arithmetic: for each assistant
turn, the template is rendered up to the generation prompt (what a server renders before the model
answers) and with the answer; the assistant segment is the difference, without the whitespace the
template puts between turns (the model stops at its end-of-turn token and never generates it).
Context segments are tokenized through the processor (which expands the image placeholder), the
assistant segments on their own, and the ids are concatenated. So the training context is byte for
byte the prompt `harness run` sends, the labelled tokens are exactly what the model must generate
after it (answer + end-of-turn token), and every other token (system, question, image tokens,
template tags) is masked with -100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finetune.data import Conversation

IGNORE = -100
# Processor outputs that are per image (concatenated along dim 0 in a batch), never per token.
_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "video_grid_thw", "image_sizes", "pixel_values_videos")


class EncodeError(ValueError):
    pass


def load_image(path: str, max_side: int | None = None):
    """RGB PIL image; longest side capped at `max_side` like harness.backends.images (LANCZOS, int truncation)."""
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read image {path}: {e}") from None
    im = im.convert("RGB")
    w, h = im.size
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        im = im.resize((max_side, int(h * s)) if w >= h else (int(w * s), max_side), Image.LANCZOS)
    return im


class Encoder:
    """Encodes conversations for one model's processor (a VLM processor, or a plain tokenizer)."""

    def __init__(self, processor, *, max_length: int | None = None, max_side: int | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.multimodal = hasattr(processor, "image_processor")
        self.max_length = max_length
        self.max_side = max_side
        if self.tokenizer.pad_token_id is None:
            raise EncodeError("the tokenizer has no pad token; set one (e.g. the eos token) before training")

    # -- rendering ---------------------------------------------------------------------------------

    def _content(self, text: str, image: bool = False):
        if not self.multimodal:  # text tokenizers' templates expect string content
            return text
        return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]

    def messages(self, conv: Conversation, n_turns: int, with_answer: bool) -> list[dict]:
        """HF chat messages for the first `n_turns` turns; the last answer only if `with_answer`."""
        msgs: list[dict] = []
        if conv.system is not None:
            msgs.append({"role": "system", "content": self._content(conv.system)})
        for k, (user, assistant) in enumerate(conv.turns[:n_turns]):
            msgs.append({"role": "user", "content": self._content(user, image=k == 0 and conv.image is not None)})
            if k < n_turns - 1 or with_answer:
                msgs.append({"role": "assistant", "content": self._content(assistant)})
        return msgs

    def _render(self, msgs: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, conv: Conversation) -> list[tuple[str, bool]]:
        """[(text, is_assistant)], alternating context and assistant segments, whose concatenation is
        the rendered conversation (minus the separator after the last turn)."""
        segs: list[tuple[str, bool]] = []
        consumed = ""
        for k in range(1, len(conv.turns) + 1):
            ctx = self._render(self.messages(conv, k, False), True)
            full = self._render(self.messages(conv, k, True), False)
            if not ctx.startswith(consumed):
                raise EncodeError(f"{conv.id}: the chat template renders turn {k} so that earlier turns change; "
                                  "cannot mask assistant tokens")
            if not full.startswith(ctx):
                raise EncodeError(
                    f"{conv.id}: the chat template's generation prompt is not a prefix of the rendered answer "
                    f"({ctx[-40:]!r} vs {full[len(ctx) - 40:len(ctx) + 20]!r}); cannot mask assistant tokens")
            answer = full[len(ctx):].rstrip()
            if conv.turns[k - 1][1].strip() not in answer:
                raise EncodeError(f"{conv.id}: the chat template dropped the answer of turn {k}")
            segs += [(ctx[len(consumed):], False), (answer, True)]
            consumed = ctx + answer
        return segs

    # -- tokenizing --------------------------------------------------------------------------------

    def encode(self, conv: Conversation) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels (1-D), per-token processor extras (1-D) and media tensors
        (pixel_values, image_grid_thw, ...; first dim = images or patches)."""
        segs = self.segments(conv)
        first, _ = segs[0]
        if conv.image is not None:
            if not self.multimodal:
                raise EncodeError(f"{conv.id}: has an image but the model has no image processor")
            image = load_image(conv.image, self.max_side)
            enc = self.processor(text=[first], images=[image], return_tensors="pt", add_special_tokens=False)
        elif self.multimodal:
            enc = self.processor(text=[first], return_tensors="pt", add_special_tokens=False)
        else:
            enc = self.tokenizer([first], return_tensors="pt", add_special_tokens=False)
        ids = [enc["input_ids"][0]]
        labels = [torch.full_like(ids[0], IGNORE)]
        for text, is_answer in segs[1:]:
            t = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if is_answer and t.numel() == 0:
                raise EncodeError(f"{conv.id}: an assistant turn has no tokens")
            ids.append(t)
            labels.append(t.clone() if is_answer else torch.full_like(t, IGNORE))
        input_ids = torch.cat(ids)
        n0, n = ids[0].numel(), input_ids.numel()
        if self.max_length and n > self.max_length:
            raise EncodeError(f"{conv.id}: {n} tokens > max length {self.max_length} (truncating would cut the answer)")
        out = {"input_ids": input_ids, "attention_mask": torch.ones(n, dtype=torch.long), "labels": torch.cat(labels)}
        for key, v in enc.items():
            if key in ("input_ids", "attention_mask"):
                continue
            v = torch.as_tensor(v)
            if key not in _MEDIA_KEYS and v.dim() == 2 and v.shape == (1, n0):  # per token: extend with 0
                out[key] = torch.cat([v[0], torch.zeros(n - n0, dtype=v.dtype)])
            else:
                out[key] = v
        return out


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad per-token tensors (input_ids with `pad_id`, labels with -100, the rest with 0);
    concatenate media tensors of the examples that have them, in order."""
    n = max(e["input_ids"].numel() for e in examples)
    keys = dict.fromkeys(k for e in examples for k in e)
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [e[key] for e in examples if key in e]
        if key in ("input_ids", "attention_mask", "labels") or (present[0].dim() == 1 and key not in _MEDIA_KEYS):
            fill = pad_id if key == "input_ids" else IGNORE if key == "labels" else 0
            rows = []
            for e in examples:
                v = e.get(key)
                if v is None:
                    v = torch.zeros(e["input_ids"].numel(), dtype=present[0].dtype)
                rows.append(torch.cat([v, torch.full((n - v.numel(),), fill, dtype=v.dtype)]))
            batch[key] = torch.stack(rows)
        else:
            batch[key] = torch.cat(present, dim=0)
    return batch


class SFTDataset(torch.utils.data.Dataset):
    """Encodes lazily (in DataLoader workers when there are some)."""

    def __init__(self, conversations: Sequence[Conversation], encoder: Encoder):
        self.conversations = list(conversations)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.encoder.encode(self.conversations[i])


class Collator:
    """Picklable collate function (DataLoader workers)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples):
        return collate(examples, self.pad_id)
