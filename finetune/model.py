"""Loading a VLM (or an LLM) for training, and where LoRA goes: every Linear of the language model.

"The language model" is found structurally (`model.get_decoder()`), not by a list of layer names, so
the same code covers LLaVA, Qwen2-VL / Qwen2.5-VL and text-only models: LoRA wraps each `nn.Linear`
inside the decoder (q/k/v/o/gate/up/down of every layer) and nothing else: not the vision tower (whose
CLIP layers are also called q_proj/k_proj/...), not the projector, not `lm_head`, not the embeddings.
The targets are given to peft as one anchored regex, and the wrapped set is checked to equal the
computed set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Projector module names (last dotted components) of the supported families; searched outside the decoder.
PROJECTOR_NAMES = ("multi_modal_projector", "visual.merger", "mm_projector", "mlp1")


def resolve_dtype(name: str) -> torch.dtype:
    """"auto": bf16 on a GPU that supports it, else fp32 (CPU bf16 is slow and the reference used a GPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32") from None


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """AutoModelForImageTextToText, or AutoModelForCausalLM for a text-only model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    try:
        return AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype)
    except ValueError:  # "Unrecognized configuration class ... for AutoModelForImageTextToText"
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)


def load_processor(path: str):
    """The VLM processor (tokenizer + image processor), or the tokenizer of a text-only model."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path)
    except (ValueError, OSError, TypeError):
        proc = AutoTokenizer.from_pretrained(path)
    tok = getattr(proc, "tokenizer", proc)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return proc


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name
    raise ValueError("module not found in model")


def decoder_prefix(model: nn.Module) -> str:
    """Qualified name of the language model inside `model` (e.g. "model.language_model")."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        raise ValueError(f"{type(model).__name__}: cannot find its language model (get_decoder)")
    return _module_name(model, dec)


def language_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear inside the language model."""
    prefix = decoder_prefix(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")]


def target_regex(model: nn.Module) -> str:
    """One regex (peft full-matches it against module names) for exactly `language_linear_names`."""
    names = language_linear_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__}: no Linear layers in the language model")
    leaves = sorted({n.rsplit(".", 1)[1] for n in names})
    rx = re.escape(decoder_prefix(model)) + r"\..*\.(" + "|".join(map(re.escape, leaves)) + ")"
    matched = [n for n, _ in model.named_modules() if re.fullmatch(rx, n)]
    if matched != names:  # e.g. a non-Linear module with the same leaf name: list the names instead
        return "^(" + "|".join(map(re.escape, names)) + ")$"
    return rx


def projector_names(model: nn.Module) -> list[str]:
    """Qualified names of the vision-language projector module(s)."""
    prefix = decoder_prefix(model) + "."
    out = []
    for n, _ in model.named_modules():
        if n.startswith(prefix):
            continue
        if any(n == p or n.endswith("." + p) for p in PROJECTOR_NAMES):
            out.append(n)
    return out


@dataclass(frozen=True)
class LoraSettings:
    r: int = 64
    alpha: int = 64
    dropout: float = 0.2
    tune_projector: bool = False
    """Train the projector fully as well (saved with the adapter as peft `modules_to_save`; vLLM cannot
    serve such an adapter: merge it)."""


def apply_lora(model: nn.Module, s: LoraSettings):
    """Wrap `model` with peft LoRA on the language model's Linear layers; everything else frozen
    (the projector trainable when `s.tune_projector`)."""
    from peft import LoraConfig, get_peft_model

    names = language_linear_names(model)
    projector = projector_names(model) if s.tune_projector else []
    if s.tune_projector and not projector:
        raise ValueError(f"{type(model).__name__}: --tune-projector, but no projector module found "
                         f"(looked for {', '.join(PROJECTOR_NAMES)})")
    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, bias="none",
                     target_modules=target_regex(model), modules_to_save=projector or None)
    pm = get_peft_model(model, cfg)
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                     if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), nn.Linear))
    if wrapped != sorted(names):
        raise AssertionError(f"LoRA wrapped {len(wrapped)} modules, expected {len(names)}")
    return pm


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts by part: lora, projector, other (other must be 0)."""
    out = {"lora": 0, "projector": 0, "other": 0, "total": 0}
    for n, p in model.named_parameters():
        out["total"] += p.numel()
        if not p.requires_grad:
            continue
        key = "lora" if ".lora_" in n else "projector" if "modules_to_save" in n else "other"
        out[key] += p.numel()
    return out
