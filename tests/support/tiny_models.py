"""Tiny random-weight VLMs built offline, for tests and benchmarks: the demo's LLaVA
(:mod:`harness.demo_models`) and a Qwen2-VL, with tokenizers of either family.

- :func:`build_tiny_llava` - the demo's LLaVA (tiny CLIP vision tower 28x28 / patch 14, tiny llama).
- :func:`build_tiny_qwen2vl` - Qwen2-VL (head_dim 64, mrope [8, 12, 12], 1-block vision tower,
  min/max pixels 28*28 / 56*56). Its processor needs torchvision (the patched CPU one, see
  ``.ci/patch_torchvision.py``): without it a ``RuntimeError`` is raised.
- :func:`build_tokenizer` - the byte-level BPE tokenizer of either family.

Both models use head_dim >= 32 (vLLM's CPU attention does not support 16); weights are seeded and
the tokenizer training deterministic, so a build is reproducible. The chat templates emit the
model's image placeholder where an ``image`` / ``image_url`` part stands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from harness.demo_models import (
    SEED,
    build_llava_tokenizer,
    build_tiny_llava,
    has_torchvision,
    neutral_generation_config,
    train_bpe,
)

__all__ = ["QWEN_SPECIALS", "QWEN_TEMPLATE", "SEED", "build_tiny_llava", "build_tiny_qwen2vl", "build_tokenizer",
           "has_torchvision"]

Family = Literal["llava", "qwen2vl"]

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)



def build_tokenizer(family: Family = "llava", vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``family``'s special tokens and chat template.

    ``family`` is ``"llava"`` (the demo's: ``<s> </s> <unk> <pad> <image>``, "USER: ... ASSISTANT:"
    turns) or ``"qwen2vl"`` (``<|im_start|>`` ChatML turns, ``<|vision_start|><|image_pad|><|vision_end|>``).
    ``vocab_size`` counts the BPE vocabulary including the special tokens.
    """
    if family == "llava":
        return build_llava_tokenizer(vocab_size)
    if family != "qwen2vl":
        raise ValueError(f"unknown tokenizer family {family!r} (llava or qwen2vl)")
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(QWEN_SPECIALS, vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.chat_template = QWEN_TEMPLATE
    fast.model_max_length = 1024
    return fast


def build_tiny_qwen2vl(out_dir: Path) -> Path:
    """Write a tiny random Qwen2-VL (hidden 128, 2 heads, mrope [8,12,12]) to ``out_dir``; return it.

    Image placeholder ``<|vision_start|><|image_pad|><|vision_end|>``; images are resized to between
    28x28 and 56x56 pixels (1 to 4 image tokens). Raises ``RuntimeError`` when torchvision is not
    importable (Qwen2-VL's video processor needs it; see ``.ci/patch_torchvision.py``).
    """
    if not has_torchvision():
        raise RuntimeError(
            "build_tiny_qwen2vl needs an importable torchvision (Qwen2-VL's video processor uses it); "
            "install torchvision==0.28.0 and run `python .ci/patch_torchvision.py` on CPU machines"
        )
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer("qwen2vl")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,  # head_dim 64 (vLLM CPU needs >= 32)
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 64,
            "hidden_size": 128,  # = text hidden size (output of the merger)
            "num_heads": 2,
            "mlp_ratio": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]

    pix = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}
    common = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pix, **common),
        video_processor=Qwen2VLVideoProcessor(**pix, **common),
        tokenizer=tokenizer,
        chat_template=QWEN_TEMPLATE,
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).eval()
    neutral_generation_config(model, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
