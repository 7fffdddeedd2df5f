"""Tiny random-weight VLMs built offline (byte-level BPE tokenizer, LLaVA, Qwen2-VL): for `harness demo` and tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process on a short built-in
corpus, the weights are random (seeded), and everything is written with ``save_pretrained`` into a
folder that ``transformers serve`` and vLLM (CPU) can load like any hub checkpoint. Each builder takes
well under a few seconds and writes < 2 MB.

- :func:`build_tiny_llava` - LLaVA (tiny CLIP vision tower 28x28 / patch 14, tiny llama). Works with
  or without torchvision (transformers then uses its PIL image processors). 4 image tokens a picture.
- :func:`build_tiny_qwen2vl` - Qwen2-VL (head_dim 64, mrope [8, 12, 12], 1-block vision tower,
  min/max pixels 28*28 / 56*56). Its processor needs torchvision (the patched CPU one, see
  ``.ci/patch_torchvision.py``): without it a ``RuntimeError`` is raised.

Both models use head_dim >= 32 (vLLM's CPU attention does not support 16). Outputs are random text,
but deterministic for a given build (fixed torch seed, deterministic tokenizer training).

The chat templates render system / user / assistant turns, accept string or list content, emit the
model's image placeholder where an ``image`` / ``image_url`` part stands (so an image listed before
the text is rendered before it), and support ``add_generation_prompt``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

SEED = 0

Family = Literal["llava", "qwen2vl"]

# A small corpus: enough merges for a ~400-token vocabulary with whole words for the things tests say.
_CORPUS = [
    "What is shown in this image? Answer with the letter of the correct option.",
    "A. bird B. cat C. dog D. fish",
    "Which genus does this animal belong to? Options: A, B, C, D.",
    "The answer is A. The answer is B. The answer is C. The answer is D.",
    "You are a helpful assistant that answers questions about pictures.",
    "species genus family order class phylum kingdom",
    "Describe the picture in one word. red green blue yellow black white",
    "Is this a photo of a plant, an animal, a fungus or an object?",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "user assistant system image text question option letter choose",
    "Sparrow, warbler, finch, oak, maple, mushroom, beetle, butterfly.",
]

_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Jinja chat templates. `content` may be a string or a list of parts; image parts (type "image" or
# "image_url") render the placeholder in place, text parts their text.
_LLAVA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- message['role'] | upper + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{- '<image>\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

_QWEN_TEMPLATE = (
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

    ``family`` is ``"llava"`` (``<s> </s> <unk> <pad> <image>``, "USER: ... ASSISTANT:" turns) or
    ``"qwen2vl"`` (``<|im_start|>`` ChatML turns, ``<|vision_start|><|image_pad|><|vision_end|>``).
    ``vocab_size`` counts the BPE vocabulary including the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "llava":
        specials, template = _LLAVA_SPECIALS, _LLAVA_TEMPLATE
    elif family == "qwen2vl":
        specials, template = _QWEN_SPECIALS, _QWEN_TEMPLATE
    else:
        raise ValueError(f"unknown tokenizer family {family!r} (llava or qwen2vl)")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)

    if family == "llava":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"},
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
    fast.chat_template = template
    fast.model_max_length = 1024
    return fast


def has_torchvision() -> bool:
    """True when torchvision imports (on CPU machines only after ``.ci/patch_torchvision.py``)."""
    try:
        if importlib.util.find_spec("torchvision") is None:
            return False
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def _seed() -> None:
    import torch

    torch.manual_seed(SEED)


def _save(model, processor, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # vLLM and `transformers serve` read the generation config; keep sampling defaults neutral.
    return out_dir


def build_tiny_llava(out_dir: Path) -> Path:
    """Write a tiny random LLaVA (CLIP 28x28/patch 14 + llama, head_dim 32) to ``out_dir``; return it.

    Image placeholder ``<image>``: 4 image tokens a picture (2x2 patches, CLS dropped).
    Works without torchvision.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer("llava")
    vocab = len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM's CPU attention needs >= 32
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=4,
        projector_hidden_act="gelu",
    )
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id

    image_processor = _clip_image_processor()
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    _seed()
    model = LlavaForConditionalGeneration(config).eval()
    _neutral_generation_config(model, tokenizer)
    out = _save(model, processor, out_dir)
    _fix_image_processor_type(out, "CLIPImageProcessor")
    _fix_llava_vision_tower_keys(out)
    return out


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
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer("qwen2vl")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
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
        chat_template=_QWEN_TEMPLATE,
    )
    _seed()
    model = Qwen2VLForConditionalGeneration(config).eval()
    _neutral_generation_config(model, tokenizer)
    return _save(model, processor, out_dir)


def _clip_image_processor():
    """CLIP image processor for 28x28 inputs: the torchvision one when usable, else the PIL one."""
    kwargs = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    if has_torchvision():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**kwargs)
    import transformers

    pil_cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil_cls is None:  # older transformers: CLIPImageProcessor is the PIL/numpy one
        pil_cls = transformers.CLIPImageProcessor
    return pil_cls(**kwargs)


def _fix_image_processor_type(out_dir: Path, name: str) -> None:
    """Record the backend-neutral class name, so any transformers (and vLLM's) picks its own backend."""
    import json

    path = Path(out_dir) / "preprocessor_config.json"
    if not path.exists():  # newer transformers may store it inside processor_config.json
        path = Path(out_dir) / "processor_config.json"
    data = json.loads(path.read_text())
    target = data.get("image_processor", data)
    if target.get("image_processor_type") != name:
        target["image_processor_type"] = name
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fix_llava_vision_tower_keys(out_dir: Path) -> None:
    """Store the CLIP tower as ``vision_tower.vision_model.*``, the hub layout of llava-hf checkpoints.

    Some transformers 5.x releases save it as ``vision_tower.embeddings...`` (no ``vision_model``),
    which vLLM's LLaVA loader rejects ("no module or parameter named 'vision_tower.embeddings'").
    transformers itself loads either layout.
    """
    from safetensors.torch import load_file, save_file

    for path in sorted(Path(out_dir).glob("*.safetensors")):
        tensors = load_file(path)
        renamed = {
            (
                "vision_tower.vision_model." + k[len("vision_tower.") :]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
                else k
            ): v
            for k, v in tensors.items()
        }
        if renamed.keys() != tensors.keys():
            save_file(renamed, path, metadata={"format": "pt"})


def _neutral_generation_config(model, tokenizer) -> None:
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.do_sample = False
