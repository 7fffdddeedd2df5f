"""Where LoRA goes (every Linear of the language model, nothing else), what trains, and the optimizer's
weight-decay groups."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from torch import nn

from finetune.model import (
    LoraSettings,
    apply_lora,
    language_linear_names,
    load_model,
    projector_names,
    trainable_summary,
)

LM_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FAMILIES = {"ft_llava_dir": ("model.multi_modal_projector", "model.vision_tower"),
            "ft_qwen_dir": ("model.visual.merger", "model.visual")}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_wraps_exactly_the_language_model_linears(family, request):
    model = load_model(str(request.getfixturevalue(family)))
    names = language_linear_names(model)
    assert len(names) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert {n.rsplit(".", 1)[1] for n in names} == LM_LEAVES
    assert all(n.startswith("model.language_model.layers.") for n in names)
    projector, vision = FAMILIES[family]
    assert projector_names(model) == [projector]
    pm = apply_lora(model, LoraSettings(r=8, alpha=8, dropout=0.2))
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(names)
    # vision tower (LLaVA's CLIP layers are also called q_proj/k_proj/v_proj), projector, lm_head untouched
    assert not any(w.startswith((vision + ".", projector + ".", "lm_head")) for w in wrapped)
    s = trainable_summary(pm)
    assert s["lora"] > 0 and s["projector"] == 0 and s["other"] == 0
    if family == "ft_llava_dir":  # llama q_proj 64 -> 64 at rank 8: A 8x64 + B 64x8; dropout 0.2
        q = pm.get_submodule("base_model.model.model.language_model.layers.0.self_attn.q_proj")
        assert sum(p.numel() for n, p in q.named_parameters() if "lora_" in n) == 8 * (64 + 64)
        assert q.lora_dropout["default"].p == 0.2

def test_tune_projector_trains_the_projector_too(ft_llava_dir):
    pm = apply_lora(load_model(str(ft_llava_dir)), LoraSettings(r=8, alpha=8, tune_projector=True))
    s = trainable_summary(pm)
    proj = load_model(str(ft_llava_dir)).model.multi_modal_projector
    assert s["projector"] == sum(p.numel() for p in proj.parameters()) and s["other"] == 0
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n or "lm_head" in n or "embed_tokens" in n for n in trainable)


def test_optimizer_decays_weights_but_not_biases_or_norms(ft_llava_dir, tmp_path):
    """The Trainer's AdamW groups: weight decay 0.1 on LoRA and projector weights, 0 on biases/norms."""
    from transformers import Trainer, TrainingArguments

    pm = apply_lora(load_model(str(ft_llava_dir)), LoraSettings(r=8, alpha=8, tune_projector=True))
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, learning_rate=5e-5, report_to="none",
                             optim="adamw_torch")
    opt = Trainer(model=pm, args=args).create_optimizer()
    names = {id(p): n for n, p in pm.named_parameters()}
    groups = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert set(groups) == {0.1, 0.0}
    assert all(".lora_" in n or n.endswith(".weight") for n in groups[0.1])
    assert not any(n.endswith(".bias") for n in groups[0.1])
    assert groups[0.0] and all(n.endswith(".bias") for n in groups[0.0])  # the projector's biases
    assert sum(len(v) for v in groups.values()) == sum(1 for p in pm.parameters() if p.requires_grad)
    assert type(opt).__name__ == "AdamW" and opt.defaults["lr"] == 5e-5


def test_norm_weights_would_not_be_decayed(ft_llava_dir, tmp_path):
    """If norms were trainable (they are not under LoRA), the Trainer's rule would still exempt them."""
    from transformers import Trainer, TrainingArguments

    model = load_model(str(ft_llava_dir))
    decay = set(Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
                .get_decay_parameter_names(model))
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()]
    assert norms and not any(n + ".weight" in decay for n in norms)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in decay
