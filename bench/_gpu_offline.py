"""The offline half of bench/gpu_serving.py: vLLM's `LLM.generate` on the harness's own requests.

Runs in the vLLM environment (imports vllm, PIL; nothing from this repository):

    VLLM_PYTHON bench/_gpu_offline.py JOB.json OUT.json

JOB.json: {"serve_args": [MODEL, "--dtype", ...], "warmup": [BODY, ...], "timed": [BODY, ...]}, where
a BODY is a chat-completions request body exactly as `harness run` sent it (captured at a stub). The
engine is built from the same argv as `vllm serve` (parsed by vLLM's own argument parser; the server-only
flags --host, --port, --api-key are dropped). Each body becomes a prompt rendered by the model's chat
template plus its image(s), decoded from the data URLs to PIL *before* the clock starts, and
SamplingParams from the body (on top of the model's generation config, as the server does with
generation_config "auto"). The warm-up bodies run first (other items: nothing they leave in the prefix
cache helps the timed ones), then the timed ones in one `LLM.generate` call, in the order the harness
sent them. OUT.json: wall seconds, token counts, the prefix-cache counters over the timed call, the
engine's scheduler limits, and each answer's text.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import sys
import time
import urllib.parse
from pathlib import Path

SERVER_ONLY = {"--host": 1, "--port": 1, "--api-key": 1, "--uvicorn-log-level": 1}


def engine_kwargs(serve_args: list[str]) -> dict:
    """`vllm serve` argv -> LLM(**kwargs): parsed by vLLM's parser, only what differs from the defaults."""
    from vllm.engine.arg_utils import EngineArgs

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]

    model, rest = serve_args[0], list(serve_args[1:])
    argv: list[str] = []
    i = 0
    while i < len(rest):
        a = rest[i]
        name = a.split("=", 1)[0]
        if name in SERVER_ONLY:
            i += 1 if "=" in a else 1 + SERVER_ONLY[name]
            continue
        if name == "--served-model-name":  # nargs="+": skip its values
            i += 1
            while i < len(rest) and not rest[i].startswith("--"):
                i += 1
            continue
        argv.append(a)
        i += 1
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    ns, unknown = parser.parse_known_args(["--model", model, *argv])
    if unknown:
        print(f"offline: ignoring server-only arguments {unknown}", file=sys.stderr)
    ea = EngineArgs.from_cli_args(ns)
    base = EngineArgs(model=model)
    kw = {}
    for f in dataclasses.fields(EngineArgs):
        v = getattr(ea, f.name)
        if f.name != "model" and v != getattr(base, f.name):
            kw[f.name] = v
    return kw


def load_image(url: str, cache: dict):
    from PIL import Image

    im = cache.get(url)
    if im is None:
        if url.startswith("data:"):
            raw = base64.b64decode(url.split(",", 1)[1])
            im = Image.open(io.BytesIO(raw))
        elif url.startswith("file://"):
            im = Image.open(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        else:
            raise ValueError(f"offline: cannot load image URL {url[:60]!r} (data: and file: only)")
        im = im.convert("RGB")
        im.load()
        cache[url] = im
    return im


def sampling(body: dict, default, SamplingParams):
    """The body's decoding fields on top of the generation-config defaults (what the server does)."""
    p = SamplingParams() if default is None else default.clone()
    fields = {
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
    }
    for k, v in fields.items():
        if v is not None:
            setattr(p, k, v)
    if body.get("logprobs"):
        p.logprobs = int(body.get("top_logprobs") or 0)
    so = body.get("structured_outputs") or ({"choice": body["guided_choice"]} if body.get("guided_choice") else None)
    if so:
        from vllm.sampling_params import StructuredOutputsParams

        p.structured_outputs = StructuredOutputsParams(**so)
    return p


def prompts(bodies: list[dict], tokenizer, cache: dict) -> list[dict]:
    out = []
    for body in bodies:
        images, uuids = [], []
        msgs = []
        for m in body["messages"]:
            content = m["content"]
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        images.append(load_image(part["image_url"]["url"], cache))
                        uuids.append(part.get("uuid"))
            msgs.append(m)
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p: dict = {"prompt": text}
        if images:
            p["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            if all(uuids):  # the harness names each image (the server then skips hashing its pixels)
                p["multi_modal_uuids"] = {"image": uuids if len(uuids) > 1 else uuids[0]}
        out.append(p)
    return out


def counters(llm) -> dict[str, float]:
    """Prefix-cache and token counters of the engine (LLM.get_metrics; needs disable_log_stats=False)."""
    want = ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens",
            "mm_cache_queries", "mm_cache_hits")
    got = dict.fromkeys(want, 0.0)
    try:
        metrics = llm.get_metrics()
    except Exception as e:  # noqa: BLE001 - a vLLM without the API: counters unknown
        print(f"offline: no engine metrics ({e})", file=sys.stderr)
        return {k: float("nan") for k in want}
    for m in metrics:
        name = m.name.removeprefix("vllm:").removesuffix("_total")
        if name in got and hasattr(m, "value"):
            got[name] += float(m.value)
    return got


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out_path = Path(sys.argv[2])
    from vllm import LLM, SamplingParams

    kw = engine_kwargs(job["serve_args"])
    kw["disable_log_stats"] = False
    t0 = time.perf_counter()
    llm = LLM(model=job["serve_args"][0], **kw)
    load_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    try:
        default = llm.get_default_sampling_params()
    except Exception:  # noqa: BLE001
        default = None
    cache: dict = {}
    warm = prompts(job["warmup"], tok, cache)
    timed = prompts(job["timed"], tok, cache)
    warm_sp = [sampling(b, default, SamplingParams) for b in job["warmup"]]
    timed_sp = [sampling(b, default, SamplingParams) for b in job["timed"]]
    if warm:
        llm.generate(warm, warm_sp, use_tqdm=False)
    c0 = counters(llm)
    t0 = time.perf_counter()
    outs = llm.generate(timed, timed_sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    c1 = counters(llm)
    sched = llm.llm_engine.vllm_config.scheduler_config
    cache_cfg = llm.llm_engine.vllm_config.cache_config
    res = {
        "questions": len(outs),
        "wall_s": wall,
        "load_s": load_s,
        "prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outs),
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "counters": {k: c1[k] - c0[k] for k in c1},
        "engine_kwargs": {k: repr(v) for k, v in kw.items()},
        "max_num_seqs": getattr(sched, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
        "block_size": getattr(cache_cfg, "block_size", None),
        "prefix_caching": getattr(cache_cfg, "enable_prefix_caching", None),
        "answers": [o.outputs[0].text for o in outs],
    }
    out_path.write_text(json.dumps(res), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
