"""Tiny random-weight CLIP / SigLIP models built offline, for tests, benchmarks and demos.

Nothing is downloaded. The transformers models get a byte-level BPE tokenizer trained in-process on
the CUB taxonomy names (every text tokenizes, distinct names give distinct tokens) wrapped as a
`PreTrainedTokenizerFast`, so `AutoTokenizer` loads it from the folder like a hub checkpoint:
  - CLIP: `<|startoftext|> ... <|endoftext|>`, pooled at the end token (config eos_token_id);
  - SigLIP: `... </s>`, padded with `<pad>` to `max_length` 16 and pooled at the last position.
The open_clip model is a `local-dir:` folder (open_clip_config.json + open_clip_model.safetensors)
with a 1-layer ViT and text tower; it uses open_clip's own BPE tokenizer (shipped in the package).
Weights are seeded: the same call gives the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

SEED = 0
CONTEXT = 16
IMAGE = 32

OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _corpus() -> list[str]:
    from harness.data.taxonomy import load_taxonomy

    names = sorted({n for path in load_taxonomy("cub").paths.values() for n in path})
    return ["a photo of a"] + names + [n.lower() for n in names]


def build_tokenizer(kind: Literal["clip", "siglip"], vocab_size: int = 600):
    """A byte-level BPE `PreTrainedTokenizerFast` with CLIP's or SigLIP's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>"] if kind == "clip" else ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", ids["<|startoftext|>"]), ("<|endoftext|>", ids["<|endoftext|>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", model_max_length=CONTEXT)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=CONTEXT)


def build_tiny_hf(out_dir: str | Path, kind: Literal["clip", "siglip"] = "siglip") -> Path:
    """A transformers CLIPModel or SiglipModel (1 layer, width 32, 32x32 images) with tokenizer and
    image processor, saved into `out_dir` (loadable with `hf:out_dir` or the plain folder path)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(kind)
    vocab = len(tok)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(SEED)
    if kind == "clip":
        eos = tok.eos_token_id
        cfg = CLIPConfig(
            text_config=dict(tower, vocab_size=vocab, max_position_embeddings=CONTEXT, bos_token_id=tok.bos_token_id,
                             eos_token_id=eos, pad_token_id=eos),
            vision_config=dict(tower, image_size=IMAGE, patch_size=8), projection_dim=16)
        model = CLIPModel(cfg)
        proc = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    elif kind == "siglip":
        cfg = SiglipConfig(
            text_config=dict(tower, vocab_size=vocab, max_position_embeddings=CONTEXT, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=None),
            vision_config=dict(tower, image_size=IMAGE, patch_size=8))
        model = SiglipModel(cfg)
        proc = SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    else:
        raise ValueError(f"unknown kind {kind!r} (clip or siglip)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
        model.save_pretrained(out)
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_tiny_open_clip(out_dir: str | Path) -> Path:
    """A tiny open_clip model as a `local-dir:` folder (load with `open_clip:local-dir:out_dir` or the
    plain folder path)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = open_clip.CLIP(**OPEN_CLIP_CONFIG)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CONFIG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    return out
