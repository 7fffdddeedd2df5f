"""Merging: the standalone model gives the same A-D log-probs as base + adapter, in the training dtype."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

import torch
from tests.finetune.ft_support import short_run
from safetensors.torch import load_file

from finetune.data import read_conversations
from finetune.merge import dtype_of_folder, letter_logprobs, load_tuned, merge
from finetune.model import load_model, load_processor


def _first(sft, mode):
    return next(c for c in read_conversations(sft) if c.meta["mode"] == mode)


@pytest.mark.parametrize("run, family", [("llava_run", "ft_llava_dir"), ("qwen_run", "ft_qwen_dir")])
def test_merged_model_and_base_plus_adapter_agree(run, family, request, ft_sft, tmp_path):
    r, base_dir = request.getfixturevalue(run), request.getfixturevalue(family)
    out = merge(r.adapter, tmp_path / "merged")
    assert dtype_of_folder(out) == "fp32"
    tuned, proc, _ = load_tuned(r.adapter)
    merged = load_model(str(out)).eval()
    base = load_model(str(base_dir)).eval()
    merged_proc = load_processor(str(out))
    for mode in ("image", "text"):
        conv = _first(ft_sft, mode)
        a = letter_logprobs(tuned, proc, conv)
        b = letter_logprobs(merged, merged_proc, conv)
        c = letter_logprobs(base, proc, conv)
        assert list(a) == list("ABCD")
        for L in a:
            assert b[L] == pytest.approx(a[L], abs=1e-4), (mode, a, b)
        assert max(abs(a[L] - c[L]) for L in a) > 1e-3  # the adapter does change the answer distribution
    # no LoRA modules left; same tensor names as the base checkpoint (what servers load)
    keys = set(load_file(out / "model.safetensors"))
    assert not any("lora_" in k for k in keys) and keys == set(load_file(base_dir / "model.safetensors"))
    info = json.loads((out / "finetune.json").read_text())
    assert info["merged_from"] == r.adapter and info["base_model"] == str(base_dir)


def test_bf16_training_merges_into_bf16_not_fp16(ft_llava_dir, ft_sft, tmp_path):
    r = short_run(ft_llava_dir, ft_sft, tmp_path / "run", dtype="bf16", max_steps=1, limit=4, global_batch=4,
                  per_device_batch=4)
    assert r.dtype == "bf16"
    out = merge(r.adapter, tmp_path / "merged")
    assert dtype_of_folder(out) == "bf16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    tuned, proc, name = load_tuned(r.adapter)
    assert name == "bf16"
    merged = load_model(str(out), torch.bfloat16).eval()
    conv = _first(ft_sft, "image")
    a, b = letter_logprobs(tuned, proc, conv), letter_logprobs(merged, load_processor(str(out)), conv)
    for L in a:
        assert b[L] == pytest.approx(a[L], abs=0.1)  # bf16 rounding of the merged weights
    # another dtype only when asked for
    assert dtype_of_folder(merge(r.adapter, tmp_path / "fp32", dtype="fp32")) == "fp32"


def test_merge_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge(tmp_path, tmp_path / "out")


def test_cli_train_then_merge(ft_llava_dir, ft_sft, tmp_path, capsys):
    from harness.cli import main

    run = tmp_path / "run"
    assert main(["finetune", "train", "--model", str(ft_llava_dir), "--data", str(ft_sft), "--out", str(run),
                 "--max-steps", "2", "--global-batch", "4", "--per-device-batch", "2", "--limit", "8",
                 "--lora-r", "16", "--lora-alpha", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "fp32" in out and str(run / "adapter") in out
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert main(["finetune", "merge", str(run / "adapter"), "--out", str(tmp_path / "m")]) == 0
    assert "merged model (fp32)" in capsys.readouterr().out
    # the same command again resumes the finished run: no step is repeated
    assert main(["finetune", "train", "--model", str(ft_llava_dir), "--data", str(ft_sft), "--out", str(run),
                 "--max-steps", "2", "--global-batch", "4", "--per-device-batch", "2", "--limit", "8",
                 "--lora-r", "16", "--lora-alpha", "32", "--quiet"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["finetune", "train", "--model", str(ft_llava_dir), "--data", str(ft_sft), "--out", str(run),
                 "--max-steps", "2", "--lora-r", "8", "--global-batch", "4", "--per-device-batch", "2"]) == 2
    assert "other settings" in capsys.readouterr().err
