"""Serving a LoRA adapter with vLLM next to its base model (`--enable-lora --lora-modules name=path`).

The base model's serving profile stays as it is; the LoRA flags are added to its `vllm serve`
command (`harness serve PROFILE -- <lora flags>`), so one server answers both the base model (its
usual names) and the adapter (`name`): `harness run --model tuned` evaluates the tuned model, and
`harness finetune compare` runs base and tuned against the same endpoint.
"""

from __future__ import annotations

import json
from pathlib import Path


def adapter_info(adapter_dir: str | Path) -> dict:
    """`finetune.json` written at the end of training, else what peft's adapter_config.json says."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a peft adapter folder)")
    info = json.loads((d / "finetune.json").read_text()) if (d / "finetune.json").is_file() else {}
    cfg = json.loads((d / "adapter_config.json").read_text())
    info.setdefault("base_model", cfg.get("base_model_name_or_path"))
    info.setdefault("lora_r", cfg.get("r"))
    return info


# --max-lora-rank values vLLM accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank `r`."""
    for k in VLLM_LORA_RANKS:
        if k >= r:
            return k
    raise ValueError(f"LoRA rank {r} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def lora_args(adapter_dir: str | Path, name: str = "tuned") -> list[str]:
    """vLLM flags that serve the adapter under `name` (validated: vLLM cannot serve every adapter)."""
    d = Path(adapter_dir).resolve()
    info = adapter_info(d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("modules_to_save"):
        raise ValueError(f"{d}: the adapter also trains {cfg['modules_to_save']} (--tune-projector); vLLM serves "
                         "LoRA weights only: merge it (`harness finetune merge`) and serve the merged folder")
    if not name or "=" in name or " " in name:
        raise ValueError(f"adapter name {name!r}: give a plain name such as `tuned`")
    return ["--enable-lora", "--lora-modules", f"{name}={d}", "--max-lora-rank", str(max_lora_rank(int(info["lora_r"])))]
