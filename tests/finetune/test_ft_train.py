"""LoRA training with the Trainer: the loss falls, checkpoints resume, settings are the paper's."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

pytest.importorskip("peft")

import torch
from tests.finetune.ft_support import short_run
from transformers import TrainerCallback

from finetune.train import ZERO2, TrainConfig, build, grad_accumulation


@pytest.mark.parametrize("run", ["llava_run", "qwen_run"])
def test_loss_falls_on_a_small_set_in_a_few_steps(run, request):
    r = request.getfixturevalue(run)
    assert r.steps == 6 and len(r.losses) == 6 and r.examples == 12
    assert max(r.losses[-2:]) < r.losses[0] - 0.5, r.losses  # 12 conversations, 3 epochs, lr 5e-3
    assert r.tokens_seen > 12 * 3 * 20 and r.tokens_per_second > 0 and r.dtype == "fp32"
    out, adapter = Path(r.out), Path(r.adapter)
    manifest = json.loads((out / "train.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["lora_r"] == 64
    assert len((out / "log.jsonl").read_text().splitlines()) >= 6
    info = json.loads((adapter / "finetune.json").read_text())
    assert info["dtype"] == "fp32" and info["lora_r"] == 64 and info["steps"] == 6
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["bias"]) == (64, 64, 0.2, "none")


class StopAt(TrainerCallback):
    """Simulates a crash right after checkpoint `step` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/adapter_model.safetensors")


def test_interrupted_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
        ft_llava_dir, ft_sft, tmp_path):
    kw = {"max_steps": 4, "save_steps": 2, "global_batch": 4, "per_device_batch": 2, "limit": 8}
    whole = short_run(ft_llava_dir, ft_sft, tmp_path / "whole", **kw)
    from finetune.train import TrainConfig, train

    cfg = TrainConfig(model=str(ft_llava_dir), data=[str(ft_sft)], out=str(tmp_path / "cut"), learning_rate=5e-3,
                      warmup_ratio=0.0, logging_steps=1, dtype="fp32", **kw)
    first = train(cfg, callbacks=[StopAt(2)])
    assert first.steps == 2 and json.loads((tmp_path / "cut" / "train.json").read_text())["status"] == "stopped"
    second = train(cfg)
    assert second.resumed_from.endswith("checkpoint-2") and second.steps == 4
    a, b = _adapter(whole.adapter), _adapter(second.adapter)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert second.losses == pytest.approx(whole.losses, rel=1e-5)  # the log history is restored too
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="learning_rate"):
        train(cfg.model_copy(update={"learning_rate": 1e-4}))


def test_training_arguments_follow_the_paper(ft_llava_dir, ft_sft, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    trainer, _, dtype = build(TrainConfig(model=str(ft_llava_dir), data=[str(ft_sft)], out=str(tmp_path)))
    a = trainer.args
    assert (a.learning_rate, a.weight_decay, a.warmup_steps, str(a.lr_scheduler_type)) == (5e-5, 0.1, 0.03, "SchedulerType.COSINE")
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.num_train_epochs) == (16, 8, 1.0)
    assert getattr(a, "activation_checkpointing", None) or a.gradient_checkpointing
    assert not a.fp16 and a.bf16 == (dtype == "bf16") and a.optim == "adamw_torch"
    assert trainer.model.peft_config["default"].r == 64 and a.remove_unused_columns is False
    # 3% warmup of the total steps, then cosine to 0
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == 0 and lrs[3] == pytest.approx(5e-5) and max(lrs) == pytest.approx(5e-5)
    assert lrs[50] == pytest.approx(5e-5 * 0.5 * (1 + torch.cos(torch.tensor(47 / 97 * torch.pi)).item()), rel=1e-3)


def test_global_batch_by_accumulation_and_deepspeed_config():
    assert grad_accumulation(128, 16, 4) == 2  # the paper: 16/device x 4 GPUs x 2
    assert grad_accumulation(128, 16, 1) == 8
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accumulation(128, 48, 1)
    assert ZERO2["zero_optimization"]["stage"] == 2 and ZERO2["gradient_accumulation_steps"] == "auto"
    assert orjson.loads(orjson.dumps(ZERO2)) == ZERO2


def test_missing_data_is_reported(tmp_path):
    from finetune.train import train

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train(TrainConfig(model="m", data=[str(tmp_path / "nope.jsonl")], out=str(tmp_path / "o")))
