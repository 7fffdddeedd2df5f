"""The offline tiny-model builders (tests/support/tiny_models.py): loadable, deterministic, and their
chat templates render the image where the content list puts it."""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.support import tiny_models


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _messages(image_first: bool) -> list[dict]:
    parts = [{"type": "image"}, {"type": "text", "text": "Which bird?"}]
    return [
        {"role": "system", "content": "Answer with a letter."},
        {"role": "user", "content": parts if image_first else parts[::-1]},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Sure?"},
    ]


def test_llava_template_and_processor(tiny_llava_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    text = proc.apply_chat_template(_messages(True), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s>SYSTEM: Answer with a letter.\nUSER: <image>\nWhich bird?\nASSISTANT: A</s>\nUSER: Sure?\nASSISTANT:"
    )
    after = proc.apply_chat_template(_messages(False), add_generation_prompt=False, tokenize=False)
    assert after.index("Which bird?") < after.index("<image>")
    assert not after.endswith("ASSISTANT:")

    inputs = proc(images=[Image.new("RGB", (40, 30), (255, 0, 0))], text=[text], return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == 4  # 2x2 patches, CLS dropped
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_llava_build_is_deterministic(tiny_llava_dir, tmp_path):
    again = tiny_models.build_tiny_llava(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(again / name) == _digest(tiny_llava_dir / name), name


def test_qwen2vl_template_and_processor(tiny_qwen2vl_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    text = proc.apply_chat_template(_messages(True), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer with a letter.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which bird?<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = proc(images=[Image.new("RGB", (64, 64), (0, 255, 0))], text=[text], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 max: 4x4 patches -> 4 tokens
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir)
    tc = model.config.text_config
    assert tc.hidden_size // tc.num_attention_heads >= 32  # head_dim: vLLM's CPU attention needs >= 32
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
