"""Fixtures of the finetune tests: tiny random VLMs, a few CUB items with stand-in images, SFT files,
and one short LoRA training run per model family shared by the tests that need a trained adapter."""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.support` importable under plain `pytest` too
    sys.path.insert(0, str(REPO))

from tests.finetune.ft_support import AUTHORS_PREFIX, CUB, N_ITEMS, short_run

_threads: list[int] = []


def pytest_runtest_setup(item):
    """One torch thread while these tests run: on a shared 2-core machine two OpenMP threads spin against
    other processes and make the tiny models ~5x slower. Restored after each test."""
    try:
        import torch
    except ImportError:
        return
    _threads.append(torch.get_num_threads())
    torch.set_num_threads(1)


def pytest_runtest_teardown(item, nextitem):
    if _threads:
        import torch

        torch.set_num_threads(_threads.pop())


def _need_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")


@pytest.fixture(scope="session")
def ft_llava_dir(tmp_path_factory) -> Path:
    _need_torch()
    from tests.support.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ft-llava"))


@pytest.fixture(scope="session")
def ft_qwen_dir(tmp_path_factory) -> Path:
    _need_torch()
    from tests.support.tiny_models import build_tiny_qwen2vl, has_torchvision

    if not has_torchvision():
        pytest.skip("tiny Qwen2-VL needs an importable torchvision (see .ci/patch_torchvision.py)")
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("ft-qwen2vl"))


@pytest.fixture(scope="session")
def ft_items(tmp_path_factory) -> tuple[Path, Path]:
    """(items file with the first N_ITEMS CUB lines, image root holding their stand-in images)."""
    from harness.demo import draw_images

    d = tmp_path_factory.mktemp("ft-items")
    items = d / "items.jsonl"
    with CUB.open("rb") as f:
        items.write_bytes(b"".join(islice(f, N_ITEMS)))
    root = d / "images"
    draw_images(items, root, N_ITEMS)
    return items, root


@pytest.fixture(scope="session")
def ft_sft(ft_items, tmp_path_factory) -> Path:
    """SFT JSONL: the image and text conversations of the items (images remapped to the stand-ins)."""
    from finetune.data import DataConfig, conversations_from_items, write_jsonl
    from harness.data.items import read_items

    items, root = ft_items
    out = tmp_path_factory.mktemp("ft-sft") / "sft.jsonl"
    convs = conversations_from_items(read_items(items, root_map=[f"{AUTHORS_PREFIX}={root}"]), DataConfig(taxonomy="cub"))
    write_jsonl(out, convs)
    return out


@pytest.fixture(scope="session")
def llava_run(ft_llava_dir, ft_sft, tmp_path_factory):
    return short_run(ft_llava_dir, ft_sft, tmp_path_factory.mktemp("ft-llava-run"))


@pytest.fixture(scope="session")
def qwen_run(ft_qwen_dir, ft_sft, tmp_path_factory):
    return short_run(ft_qwen_dir, ft_sft, tmp_path_factory.mktemp("ft-qwen-run"))
