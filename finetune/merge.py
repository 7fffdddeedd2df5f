"""Merge a LoRA adapter into its base model: a standalone folder any server loads like the original.

The base is loaded in the dtype it was trained in (recorded in the adapter's `finetune.json`; bf16 for
the paper's run), the adapter applied and `merge_and_unload`ed, and the result saved in that same
dtype with the processor and generation config: a bf16 run never comes back as fp16 (or fp32) by
accident. `letter_logprobs` scores the answer letters the way `--answer logprobs` reads them, to
check that merged and base+adapter models agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from finetune.data import Conversation
from finetune.model import DTYPE_NAMES, DTYPES, load_model, load_processor
from finetune.serve import adapter_info


def load_tuned(adapter_dir: str | Path, base: str | None = None, dtype: str | None = None):
    """(base model + adapter as a peft model in eval mode, processor, dtype name)."""
    from peft import PeftModel

    info = adapter_info(adapter_dir)
    base = base or info.get("base_model")
    if not base:
        raise ValueError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
    name = dtype or info.get("dtype") or "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use bf16, fp16 or fp32")
    model = load_model(base, DTYPES[name])
    pm = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return pm, load_processor(base), name


def merge(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None, dtype: str | None = None) -> Path:
    """Write base + adapter, merged, to `out_dir` (weights in the training dtype, processor, generation config)."""
    pm, processor, name = load_tuned(adapter_dir, base, dtype)
    merged = pm.merge_and_unload()
    merged = merged.to(DTYPES[name])  # modules_to_save copies and LoRA deltas were fp32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    base_dir = Path(base or adapter_info(adapter_dir)["base_model"])
    if (base_dir / "generation_config.json").is_file():  # keep the base's decoding defaults verbatim
        shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
    if getattr(merged.config, "model_type", "") == "llava":
        _llava_hub_layout(out)
    (out / "finetune.json").write_text(json.dumps(
        {**adapter_info(adapter_dir), "merged_from": str(adapter_dir), "dtype": name}, indent=2) + "\n")
    return out


def _llava_hub_layout(out: Path) -> None:
    """Some transformers 5 releases save LLaVA's CLIP tower as `vision_tower.embeddings...`; vLLM's loader
    wants the hub layout `vision_tower.vision_model.*` (transformers loads either)."""
    from safetensors.torch import load_file, save_file

    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(path)
        renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
                   for k, v in tensors.items()}
        if renamed.keys() != tensors.keys():
            save_file(renamed, path, metadata={"format": "pt"})


@torch.no_grad()
def letter_logprobs(model, processor, conv: Conversation, letters: str = "ABCD", max_side: int | None = None) -> dict[str, float]:
    """Log-probabilities of each letter as the first answer token after the generation prompt
    (the first user turn of `conv`; its answer is ignored)."""
    from finetune.encode import Encoder

    enc = Encoder(processor, max_side=max_side)
    one = Conversation(conv.id, (conv.turns[0],), conv.image, conv.system)
    ctx = enc.segments(one)[0][0]
    from finetune.encode import load_image

    if one.image is not None:
        batch = processor(text=[ctx], images=[load_image(one.image, max_side)], return_tensors="pt",
                          add_special_tokens=False)
    elif enc.multimodal:
        batch = processor(text=[ctx], return_tensors="pt", add_special_tokens=False)
    else:
        batch = enc.tokenizer([ctx], return_tensors="pt", add_special_tokens=False)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if hasattr(v, "to") else v for k, v in batch.items()}
    logits = model(**batch).logits[0, -1].float()
    lp = torch.log_softmax(logits, -1)
    out = {}
    tok = enc.tokenizer
    # the letter as the template's assistant segment starts it (e.g. " A" after "ASSISTANT:")
    for L in letters:
        seg = enc.segments(Conversation(one.id, ((one.turns[0][0], L),), one.image, one.system))[1][0]
        ids = tok(seg, add_special_tokens=False)["input_ids"]
        out[L] = float(lp[ids[0]])
    return out


def dtype_of_folder(path: str | Path) -> str:
    """The dtype a saved model's config declares (bf16 / fp16 / fp32)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return DTYPE_NAMES[getattr(torch, name)] if name else "unknown"
