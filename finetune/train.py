"""LoRA supervised finetuning with the transformers Trainer (hierarchy-protocol.md section 8).

Defaults are the paper's recipe: LoRA r 64, alpha 64, dropout 0.2 on every Linear of the language
model; vision tower and projector frozen (`tune_projector` trains the projector too, as the
classification study did); AdamW lr 5e-5, weight decay 0.1 except biases and norms (the Trainer's
own decay rule), cosine schedule with 3% warmup, 1 epoch, bf16 where the GPU supports it, gradient
checkpointing, global batch 128 by accumulation, loss on assistant tokens only (finetune.encode).

The Trainer is the engine: checkpoints every `save_steps`, resume from the newest one by running the
same command again, multi-GPU by launching the same command under `torchrun` / `accelerate launch`
(DDP), ZeRO-2 with `deepspeed="zero2"` (or a DeepSpeed JSON file). No training loop is written here.

Output folder: `train.json` (settings + what happened), `checkpoint-N/` (Trainer), `log.jsonl`
(loss, learning rate, grad norm per logging step), `adapter/` (the final LoRA adapter, loadable by
peft and by vLLM `--enable-lora`, with `finetune.json` naming base model and training dtype).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from harness import __version__

# Settings that may change between a run and its resumption (they do not change what is learned).
_OPERATIONAL = {"out", "save_steps", "save_total_limit", "logging_steps", "num_workers", "force"}

ZERO2: dict = {
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "allgather_bucket_size": 5e8},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


class TrainConfig(BaseModel):
    """Everything a training run depends on (`train.json`)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    """Base model folder or hub id (loaded offline if cached)."""
    data: list[str]
    """SFT files: our JSONL (`harness finetune data`) or LLaVA conversation JSON."""
    out: str
    eval_data: list[str] = Field(default_factory=list)
    image_root_map: list[str] = Field(default_factory=list)
    limit: int | None = None
    """First N training conversations only."""
    lora_r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.2
    tune_projector: bool = False
    learning_rate: float = 5e-5
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    global_batch: int = 128
    per_device_batch: int = 16
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    max_length: int | None = None
    max_side: int | None = None
    """Cap the longest image side (the reference capped Qwen inputs at 1680)."""
    seed: int = 42
    deepspeed: str | None = None
    """"zero2" (built-in ZeRO-2 config) or a DeepSpeed JSON file."""
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    num_workers: int = 0


class TrainResult(BaseModel):
    out: str
    adapter: str
    steps: int
    examples: int
    epochs: float
    losses: list[float]
    """Training loss at each logging step."""
    train_seconds: float
    tokens_seen: int
    """Non-padding input tokens processed (all ranks)."""
    tokens_per_second: float
    resumed_from: str | None
    dtype: str


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(cfg: TrainConfig) -> dict:
    d = cfg.model_dump(mode="json")
    d = {k: v for k, v in d.items() if k not in _OPERATIONAL}
    d["data_sha256"] = [_sha256(p) for p in cfg.data]
    return d


def check_resume(out: Path, cfg: TrainConfig, force: bool = False) -> None:
    """Refuse to continue a run folder trained with other settings or data (unless `force`)."""
    manifest = out / "train.json"
    if not manifest.exists() or force:
        return
    old = orjson.loads(manifest.read_bytes()).get("fingerprint", {})
    new = _fingerprint(cfg)
    diff = [k for k in new if k in old and old[k] != new[k]]
    if diff:
        k = diff[0]
        raise ValueError(f"{manifest}: this folder holds a run with other settings ({k}: {old[k]!r} -> {new[k]!r}); "
                         "use another --out, or --force")


def grad_accumulation(global_batch: int, per_device: int, world: int) -> int:
    if global_batch % (per_device * world):
        raise ValueError(f"global batch {global_batch} is not a multiple of per-device batch {per_device} x "
                         f"{world} process(es)")
    return global_batch // (per_device * world)


def _deepspeed(spec: str | None):
    if spec is None:
        return None
    if spec == "zero2":
        return dict(ZERO2)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--deepspeed {spec}: neither `zero2` nor a DeepSpeed JSON file")
    return spec


def last_checkpoint(out: Path) -> Path | None:
    cks = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None


def _accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or bool(getattr(torch, "xpu", None) and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


def _checkpointing(args_cls, on: bool) -> dict:
    """Gradient checkpointing flags under their current name (transformers 5.x renamed them
    `activation_checkpointing*`; 4.x knows only `gradient_checkpointing*`)."""
    import dataclasses

    name = "activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(args_cls)} \
        else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}}


def build(cfg: TrainConfig, callbacks=None, quiet: bool = False):
    """(trainer, processor, dtype name): model wrapped with LoRA, datasets, TrainingArguments."""
    import torch
    from transformers import Trainer, TrainingArguments

    from finetune.data import read_conversations
    from finetune.encode import Collator, Encoder, SFTDataset
    from finetune.model import (
        DTYPE_NAMES,
        LoraSettings,
        apply_lora,
        load_model,
        load_processor,
        resolve_dtype,
    )

    dtype = resolve_dtype(cfg.dtype)
    convs = [c for p in cfg.data for c in read_conversations(p, root_map=cfg.image_root_map)]
    if cfg.limit:
        convs = convs[: cfg.limit]
    if not convs:
        raise ValueError(f"{', '.join(cfg.data)}: no training conversations")
    evals = [c for p in cfg.eval_data for c in read_conversations(p, root_map=cfg.image_root_map)]
    processor = load_processor(cfg.model)
    encoder = Encoder(processor, max_length=cfg.max_length, max_side=cfg.max_side)
    encoder.encode(convs[0])  # fail fast (template, image, length) before loading weights onto devices
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's A matrices are drawn from the global RNG when the model is wrapped
    model = load_model(cfg.model, dtype)
    model.config.use_cache = False
    model = apply_lora(model, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.tune_projector))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(
        output_dir=cfg.out,
        per_device_train_batch_size=cfg.per_device_batch,
        per_device_eval_batch_size=cfg.per_device_batch,
        gradient_accumulation_steps=grad_accumulation(cfg.global_batch, cfg.per_device_batch, world),
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        optim="adamw_torch",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **_checkpointing(TrainingArguments, cfg.gradient_checkpointing),
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not _accelerator(),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if evals else "no",
        eval_steps=cfg.save_steps if evals else None,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        seed=cfg.seed,
        data_seed=cfg.seed,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        deepspeed=_deepspeed(cfg.deepspeed),
        disable_tqdm=True,
    )
    tok = getattr(processor, "tokenizer", processor)
    trainer = Trainer(
        model=model, args=args,
        train_dataset=SFTDataset(convs, encoder),
        eval_dataset=SFTDataset(evals, encoder) if evals else None,
        data_collator=Collator(tok.pad_token_id),
        callbacks=callbacks,
    )
    if quiet:  # no per-step log lines on stdout (the log history is still kept and written)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer, processor, DTYPE_NAMES[dtype]


def _write_manifest(out: Path, cfg: TrainConfig, status: str, extra: dict | None = None) -> None:
    m = {"harness_version": __version__, "status": status, "config": cfg.model_dump(mode="json"),
         "fingerprint": _fingerprint(cfg), **(extra or {})}
    tmp = out / "train.json.tmp"
    tmp.write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2))
    os.replace(tmp, out / "train.json")


def train(cfg: TrainConfig, *, force: bool = False, callbacks=None, quiet: bool = False) -> TrainResult:
    """Train (or resume from the newest checkpoint) and save the adapter to `out/adapter`.
    `callbacks`: extra transformers TrainerCallbacks; `quiet`: no per-step log lines on stdout."""
    for p in cfg.data + cfg.eval_data:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such SFT data file")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(out, cfg, force)
    trainer, _, dtype_name = build(cfg, callbacks, quiet)
    resume = last_checkpoint(out)
    main = trainer.is_world_process_zero()
    if main:
        _write_manifest(out, cfg, "running", {"dtype": dtype_name, "resumed_from": str(resume) if resume else None})
    t0 = time.monotonic()
    out_metrics = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - t0
    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    history = trainer.state.log_history
    losses = [float(h["loss"]) for h in history if "loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    result = TrainResult(
        out=str(out), adapter=str(adapter), steps=trainer.state.global_step, examples=len(trainer.train_dataset),
        epochs=float(trainer.state.epoch or 0.0), losses=losses,
        train_seconds=float(out_metrics.metrics.get("train_runtime", seconds)), tokens_seen=tokens,
        tokens_per_second=tokens / max(float(out_metrics.metrics.get("train_runtime", seconds)), 1e-9),
        resumed_from=str(resume) if resume else None, dtype=dtype_name,
    )
    if main:
        (adapter / "finetune.json").write_text(json.dumps(
            {"base_model": cfg.model, "dtype": dtype_name, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
             "lora_dropout": cfg.lora_dropout, "tune_projector": cfg.tune_projector, "steps": result.steps,
             "harness_version": __version__}, indent=2) + "\n")
        with (out / "log.jsonl").open("wb") as f:
            for h in history:
                f.write(orjson.dumps(h) + b"\n")
        status = "done" if trainer.state.global_step >= trainer.state.max_steps else "stopped"
        _write_manifest(out, cfg, status, {"dtype": dtype_name, "result": result.model_dump(mode="json")})
    return result
