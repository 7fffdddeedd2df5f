"""The model of `harness demo`: a tiny random-weight LLaVA built offline, so the demo needs no download.

The tokenizer is a byte-level BPE trained in-process on a short built-in corpus, the weights are
random (seeded), and everything is written with ``save_pretrained`` into a folder that ``transformers
serve`` and vLLM (CPU) can load like any hub checkpoint, in well under a few seconds and < 2 MB.
:func:`build_tiny_llava`: a tiny CLIP vision tower (28x28 / patch 14) and a tiny llama, head_dim 32
(vLLM's CPU attention does not support 16); 4 image tokens a picture; works with or without
torchvision. Its outputs are random text, but deterministic for a given build.

The chat template renders system / user / assistant turns, accepts string or list content, emits
``<image>`` where an ``image`` / ``image_url`` part stands, and supports ``add_generation_prompt``.
The tests' other tiny models (Qwen2-VL, a Qwen2-VL tokenizer) are in ``tests/support/tiny_models.py``,
built on :func:`train_bpe` and :func:`neutral_generation_config` from here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SEED = 0

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

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Jinja chat template. `content` may be a string or a list of parts; image parts (type "image" or
# "image_url") render the placeholder in place, text parts their text.
LLAVA_TEMPLATE = (
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

def train_bpe(specials: list[str], vocab_size: int = 400, corpus: list[str] | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` (default: the built-in one;
    deterministic), with ``specials`` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer=trainer)
    return tok


def build_llava_tokenizer(vocab_size: int = 400):
    """The demo LLaVA's ``PreTrainedTokenizerFast``: ``<s> </s> <unk> <pad> <image>``, "USER: ...
    ASSISTANT:" turns; ``vocab_size`` counts the BPE vocabulary including the special tokens."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(LLAVA_SPECIALS, vocab_size),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = LLAVA_TEMPLATE
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

    tokenizer = build_llava_tokenizer()
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
        chat_template=LLAVA_TEMPLATE,
    )
    _seed()
    model = LlavaForConditionalGeneration(config).eval()
    neutral_generation_config(model, tokenizer)
    out = _save(model, processor, out_dir)
    _fix_image_processor_type(out, "CLIPImageProcessor")
    _fix_llava_vision_tower_keys(out)
    return out


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


def neutral_generation_config(model, tokenizer) -> None:
    """Greedy decoding and the tokenizer's special ids in the saved generation config."""
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.do_sample = False
