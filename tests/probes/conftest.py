"""Fixtures for the probes tests: tiny random VLMs (built once per session), loaded extractors, images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="probes need torch (pip install -e '.[probe]' torch==2.13.0)")
pytest.importorskip("transformers", reason="probes need transformers")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from tests.support.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("probe-llava"))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    from tests.support.tiny_models import build_tiny_qwen2vl, has_torchvision

    if not has_torchvision():
        pytest.skip("tiny Qwen2-VL needs an importable torchvision (see .ci/patch_torchvision.py)")
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("probe-qwen2vl"))


@pytest.fixture(scope="session")
def llava_ext(tiny_llava):
    from probes.extract import Extractor

    return Extractor(tiny_llava, device="cpu")


@pytest.fixture(scope="session")
def qwen_ext(tiny_qwen):
    from probes.extract import Extractor

    return Extractor(tiny_qwen, device="cpu")


@pytest.fixture(params=["llava", "qwen2vl"])
def ext(request):
    """Each tiny architecture in turn."""
    return request.getfixturevalue("llava_ext" if request.param == "llava" else "qwen_ext")


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Random RGB PNGs of the given (width, height) sizes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="session")
def make_images():
    """write_images as a fixture (test modules need not import conftest)."""
    return write_images


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """12 random images of varied sizes (Qwen then gives 1 to 4 image tokens each)."""
    sizes = [(30, 30), (60, 40), (40, 70), (56, 56), (100, 30), (28, 50)] * 2
    return write_images(tmp_path_factory.mktemp("probe-images"), sizes)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors on a shared 2-core machine: several intra-op threads spin against each other (a probe
    test took 80 s with 2 threads, 7 s with 1). Restored after each test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_tiny_qwen25vl(out: Path) -> Path:
    """A tiny random Qwen2.5-VL (the study's model family): 2 vision blocks with window attention
    (window 56 px = 2x2 merged tokens, block 1 full attention), so a 112x112 image spans 4 windows and
    the vision blocks run in window order, not raster order."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from tests.support.tiny_models import QWEN_SPECIALS, QWEN_TEMPLATE, build_tokenizer

    tok = build_tokenizer("qwen2vl")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    special = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    cfg = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                     **special},
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **special)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    pix = {"min_pixels": 28 * 28, "max_pixels": 112 * 112}
    common = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pix, **common),
                            video_processor=Qwen2VLVideoProcessor(**pix, **common), tokenizer=tok,
                            chat_template=QWEN_TEMPLATE)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen25_ext(tmp_path_factory):
    from tests.support.tiny_models import has_torchvision
    from probes.extract import Extractor

    if not has_torchvision():
        pytest.skip("tiny Qwen2.5-VL needs an importable torchvision (see .ci/patch_torchvision.py)")
    return Extractor(build_tiny_qwen25vl(tmp_path_factory.mktemp("probe-qwen25vl")), device="cpu")
