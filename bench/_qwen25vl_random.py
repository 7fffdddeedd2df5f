"""A random-weight Qwen2.5-VL written offline: the 7B's shape (`build(out, tiny=False)`) or a tiny one of
the same architecture (`tiny=True`), with a tokenizer and a processor that load with no network.

    python -m bench._qwen25vl_random OUT_DIR [--tiny]

Nothing is downloaded. The config is written by hand from Qwen2.5-VL-7B-Instruct's published shape:

- text: hidden 3584, 28 layers, 28 heads (head_dim 128), 4 KV heads, intermediate 18944, vocab 152064,
  RMSNorm eps 1e-6, rope theta 1e6 with mrope sections [16, 24, 24], 128k positions, untied lm_head;
- vision: depth 32, hidden 1280, 16 heads, intermediate 3420, out_hidden 3584, patch 14, temporal patch
  2, spatial merge 2, window attention (window 112 px, full attention in blocks 7, 15, 23, 31),
  tokens_per_second 2;
- processor: Qwen2VLImageProcessor with Qwen's defaults (min 3136, max 12845056 pixels), so an image of
  500x375 px becomes 18x13 = 234 image tokens, as with the real model.

The weights are never instantiated as a model: the parameter names and shapes come from the model built
on the meta device, and each tensor is drawn (normal, std 0.02; norms 1, biases 0; seeded) straight into
bf16 safetensors shards of <= 4 GiB, in the hub checkpoint's naming (`model.*`, `visual.*`, `lm_head`).
The 7B build writes ~16.6 GB and takes about a minute (the draws run on the GPU when torch sees one).

The tokenizer is a byte-level BPE (Qwen's special tokens, ChatML template with the
`<|vision_start|><|image_pad|><|vision_end|>` placeholder) trained on the benchmark's own text: the
shipped CUB hierarchy file and the prompt catalogue, so a question costs about as many text tokens as
with Qwen's 151k-token vocabulary. Its vocabulary is smaller than the model's 152064 rows (vLLM allows
that); the special tokens' ids are written into the config.

`tiny=True`: the same classes with hidden 128 (2 layers, 2 heads of 64, 1 KV head, mrope [8, 12, 12]),
a 4-block vision tower (hidden 64, 2 heads, window 112, full attention in blocks 1 and 3), fp32
weights, the same processor (a 500x375 image is 234 image tokens here too): runs on vLLM's CPU build.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 0

# Qwen's special tokens and a ChatML template whose image part renders Qwen's placeholder: the same as
# the test suite's tiny Qwen2-VL (one definition).
from tests.support.tiny_models import QWEN_SPECIALS as SPECIALS  # noqa: E402
from tests.support.tiny_models import QWEN_TEMPLATE as TEMPLATE  # noqa: E402

TEXT_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
VISION_7B = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
TEXT_TINY = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 64 (vLLM's CPU attention needs >= 32)
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "max_window_layers": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
}
VISION_TINY = {
    "depth": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "in_channels": 3,
    "out_hidden_size": 128,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1, 3],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}  # Qwen2.5-VL's preprocessor defaults
SHARD_BYTES = 4 << 30


def corpus() -> list[str]:
    """The benchmark's own text: every CUB label and option, and the prompt catalogue."""
    lines: list[str] = []
    cub = ROOT / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
    seen: set[str] = set()
    with open(cub, encoding="utf-8") as f:
        for raw in f:
            rec = json.loads(raw)
            for k, v in rec.items():
                vals = v if isinstance(v, list) else [v]
                for s in vals:
                    if isinstance(s, str) and k != "image" and s not in seen:
                        seen.add(s)
                        lines.append(s)
    prompts = ROOT / "harness" / "prompts" / "prompts.toml"
    lines += [ln for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines


def build_tokenizer(vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    from harness.demo_models import train_bpe

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(SPECIALS, vocab_size, corpus()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.chat_template = TEMPLATE
    fast.model_max_length = 131072
    return fast


def _hub_name(name: str) -> str:
    """transformers 5's module names -> the hub checkpoint's (what Qwen2.5-VL-7B-Instruct ships)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def _draw(name: str, shape, dtype, gen, device):
    import torch

    if len(shape) == 1 and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    t = torch.empty(shape, dtype=torch.float32 if dtype == torch.float32 else dtype, device=device)
    t.normal_(0.0, 0.02, generator=gen)
    return t.cpu()


def write_weights(config, out_dir: Path, dtype) -> int:
    """Draw every parameter of `config`'s model into safetensors shards; returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        meta = Qwen2_5_VLForConditionalGeneration(config)
    shapes = [(_hub_name(n), tuple(p.shape)) for n, p in meta.state_dict().items()]
    del meta
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(SEED)
    elem = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        if shards[-1] and size + n * elem > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n * elem
    total = sum(_numel(s) for _, s in shapes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {name: _draw(name, shape, dtype, gen, device).contiguous() for name, shape in shard}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in shard})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total * elem}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build(out_dir: str | Path, tiny: bool = False) -> Path:
    """Write the model folder (config, generation config, bf16/fp32 safetensors, tokenizer, processor)."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tokenizer = build_tokenizer(1024 if tiny else 8192)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(TEXT_TINY if tiny else TEXT_7B)
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    dtype = torch.float32 if tiny else torch.bfloat16
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION_TINY if tiny else VISION_7B),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = dtype
    config.text_config.dtype = dtype
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    config.save_pretrained(out)
    # Qwen's shipped generation config, on this tokenizer's ids (vLLM's generation_config "auto" reads it).
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                     eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=False,
                     repetition_penalty=1.05).save_pretrained(out)
    pix = PIXELS
    common = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pix, **common),
        video_processor=Qwen2VLVideoProcessor(**pix, **common),
        tokenizer=tokenizer,
        chat_template=TEMPLATE,
    )
    processor.save_pretrained(out)
    n = write_weights(config, out, dtype)
    meta = {"tiny": tiny, "parameters": n, "dtype": str(dtype).removeprefix("torch."),
            "tokenizer_vocab": len(tokenizer), "build_s": round(time.monotonic() - t0, 1)}
    (out / "bench_build.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def built(out_dir: str | Path, tiny: bool) -> bool:
    """The folder holds a complete build of this kind (written last: bench_build.json)."""
    p = Path(out_dir) / "bench_build.json"
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("tiny") == tiny
    except (OSError, ValueError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    out = build(a.out, a.tiny)
    print(json.loads((out / "bench_build.json").read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
