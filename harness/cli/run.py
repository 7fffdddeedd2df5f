"""`harness run`: evaluate a model on an items file through the engine, resumably.

Writes DIR/results.jsonl (append-only), DIR/run.json (manifest, no secrets) and DIR/summary.json.
Running the same command again resumes: finished questions are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict

from harness import __version__
from harness.backends.http import Client, FatalError, RetryPolicy, redact_url
from harness.engine.core import Decoding, Engine
from harness.data.items import ItemError, ReadReport, detect_taxonomy, file_hash, read_items
from harness.engine.pricing import estimate_image_tokens, estimate_text_tokens, price_for
from harness.prompts.hierarchy import PromptConfig, Renderer, catalogue_hash
from harness.runs.results import ResultStore
from harness.metrics.readers import summarize_results
from harness.data.taxonomy import TAXONOMIES

EXIT_OK, EXIT_INPUT, EXIT_UNANSWERED, EXIT_FATAL = 0, 2, 3, 4

# GPT-4o protocol of the reference scripts (hierarchy-protocol.md section 2).
PRESETS: dict[str, dict] = {
    "gpt-4o": dict(variant="gpt", system="helpful", image_first=False, detail="low", option_order="file",
                   ask_leaf=True, max_tokens=5, temperature=0.2, seed=42),
}

# Settings that change answers: a resumed run must match them (concurrency, rate etc. may change).
FINGERPRINT = ("model", "data_sha256", "prompt", "answer", "parser", "max_tokens", "temperature", "seed",
               "max_side", "limit", "top_logprobs", "catalogue_sha256")


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    data: str
    data_sha256: str
    prompt: PromptConfig
    protocol: str
    answer: str
    parser: str
    max_tokens: int
    temperature: float
    seed: int | None
    top_logprobs: int
    max_side: int | None
    media: str
    limit: int | None
    catalogue_sha256: str


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="evaluate a model (endpoint or local) on an items file; resumable",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `harness run` (shared with `harness batch submit`)."""
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="OpenAI-compatible base URL (repeat for several servers). Without it, a local server is started for --model")
    g.add_argument("--model", help="served model name (may be omitted if the endpoint serves one model), or a local path / hub id without --endpoint")
    g.add_argument("--data", required=True, help="items JSONL (reference annotation format)")
    g.add_argument("--out", required=True, help="run folder (results.jsonl, run.json, summary.json)")
    g.add_argument("--taxonomy", choices=sorted(TAXONOMIES), help="default: from the items' `taxonomy` field or inferred from labels")
    g.add_argument("--limit", type=int, help="first N items only")
    g.add_argument("--image-root-map", action="append", default=[], metavar="OLD=NEW")
    g.add_argument("--strict", action="store_true", help="stop at the first invalid input line (default: skip it and report)")
    g = p.add_argument_group("protocol")
    g.add_argument("--mode", choices=["image", "text", "binary"], default="image")
    g.add_argument("--prompt-variant", default=None, help="0..4, or `gpt` (default: the --profile's variant, else 0)")
    g.add_argument("--profile", help="a servers/ profile name: the paper's prompt variant, system prompt and max tokens for that model")
    g.add_argument("--protocol", choices=["reference", "robust"], default="robust",
                   help="reference: seeded option shuffle replay + substring parser; robust: per-question hashed order + strict parser")
    g.add_argument("--preset", choices=sorted(PRESETS), help="reference settings of an API model (prompt, order, decoding)")
    g.add_argument("--answer", choices=["generate", "choice", "logprobs"], default="generate")
    g.add_argument("--system", default="auto", help="system prompt id from the catalogue, `auto` (profile or mode default), or `none` (model default)")
    g.add_argument("--suffix", default="standard", choices=["standard", "cot", "cot_qwen"])
    g.add_argument("--taxonomy-cot", action="store_true", help="iNat taxonomy-based CoT system prompt")
    g.add_argument("--taxonomy-in-context", action="store_true", help="CUB: the whole taxonomy in the system prompt")
    g.add_argument("--option-order", choices=["reference", "file", "hashed"], help="override the protocol's option order")
    g.add_argument("--parser", choices=["reference", "robust"], help="override the protocol's parser")
    g.add_argument("--gpt-order", action="store_true", help="text part before the image, detail low")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--top-logprobs", type=int, default=20)
    g = p.add_argument_group("transport")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=64)
    g.add_argument("--rps", type=float, help="requests per second limit")
    g.add_argument("--tpm", type=int, help="tokens per minute budget (estimated)")
    g.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    g.add_argument("--max-retries", type=int, default=8)
    g.add_argument("--media", choices=["base64", "file"], default="base64",
                   help="file: send file:// URLs (vLLM with --allowed-local-media-path)")
    g.add_argument("--max-side", type=int, help="resize images whose longest side is larger (reference: 1680)")
    g.add_argument("--cache", help="folder of a request-hash answer cache shared across runs")
    g.add_argument("--retry-errors", action="store_true", help="ask again the questions that failed before")
    g.add_argument("--max-cost", type=float, help="stop cleanly when the estimated cost reaches this many USD")
    g.add_argument("--price-in", type=float, help="USD per 1M prompt tokens (default: built-in table)")
    g.add_argument("--price-out", type=float, help="USD per 1M completion tokens")
    g.add_argument("--dry-run", action="store_true", help="count questions, tokens and cost; send nothing")
    g.add_argument("--quiet", action="store_true", help="no progress display")
    g.add_argument("--force", action="store_true", help="resume even if run.json settings differ")


def _peek_taxonomy(args) -> str:
    return detect_taxonomy(args.data, args.taxonomy)


def build_settings(args, model: str) -> RunSettings:
    """Command line + preset + profile -> the settings that decide every answer (explicit flags win)."""
    preset = dict(PRESETS.get(args.preset or "", {}))
    taxonomy = _peek_taxonomy(args)
    if args.profile:  # per-model protocol of the paper (servers/*.toml)
        from harness.serving.profiles import load_profile

        prof = load_profile(args.profile)
        pmode = "text" if args.mode == "text" else "image"
        if args.prompt_variant is None:
            preset["variant"] = prof.prompt_variant_for(taxonomy, pmode)
        preset.setdefault("system", prof.system_prompt_key(pmode))
        preset.setdefault("max_tokens", prof.max_tokens_for(taxonomy, pmode))
    reference = args.protocol == "reference"
    order = args.option_order or preset.get("option_order") or ("reference" if reference else "hashed")
    variant: int | str = args.prompt_variant if args.prompt_variant is not None else preset.get("variant", 0)
    if isinstance(variant, str) and variant.isdigit():
        variant = int(variant)
    system = preset.get("system", "auto") if args.system == "auto" else (None if args.system == "none" else args.system)
    prompt = PromptConfig(
        taxonomy=taxonomy, mode=args.mode, variant=variant, system=system,
        suffix=args.suffix, taxonomy_cot=args.taxonomy_cot, taxonomy_in_context=args.taxonomy_in_context,
        ask_leaf=preset.get("ask_leaf", False), option_order=order,
        image_first=not (args.gpt_order or preset.get("image_first") is False),
        detail="low" if (args.gpt_order or preset.get("detail")) else None,
    )
    max_tokens = args.max_tokens or preset.get("max_tokens") or (5 if args.answer == "choice" else 10)
    temperature = args.temperature if args.temperature is not None else preset.get("temperature", 0.0)
    seed = args.seed if args.seed is not None else preset.get("seed")
    return RunSettings(
        model=model, data=str(args.data), data_sha256=file_hash(args.data), prompt=prompt,
        protocol=args.protocol, answer=args.answer,
        parser=args.parser or ("reference" if reference else "robust"),
        max_tokens=max_tokens, temperature=temperature, seed=seed, top_logprobs=args.top_logprobs,
        max_side=args.max_side, media=args.media, limit=args.limit, catalogue_sha256=catalogue_hash(),
    )


def check_resume(out: Path, settings: RunSettings, force: bool) -> None:
    manifest = out / "run.json"
    if not manifest.exists() or force:
        return
    old = orjson.loads(manifest.read_bytes()).get("settings", {})
    new = settings.model_dump(mode="json")
    diff = [k for k in FINGERPRINT if k in old and old[k] != new[k]]
    if diff:
        k = diff[0]
        raise ValueError(f"{manifest}: this folder holds a run with other settings ({k}: {old[k]!r} -> {new[k]!r}). "
                         "Use another --out, or --force to resume anyway.")


def write_manifest(out: Path, settings: RunSettings, endpoints: list[str], args, status: str, stats=None,
                   started: str | None = None) -> None:
    m = {
        "harness_version": __version__,
        "status": status,
        "started": started,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "endpoints": [redact_url(e) for e in endpoints],
        "api_key_env": args.api_key_env,  # the name of the variable, never its value
        "settings": settings.model_dump(mode="json"),
        "transport": {"concurrency": args.concurrency, "rps": args.rps, "tpm": args.tpm, "timeout": args.timeout,
                      "max_retries": args.max_retries, "media": args.media},
        "python": platform.python_version(),
        "command": [a for a in sys.argv[:1]] + ["run", "..."],
    }
    if stats is not None:
        m["stats"] = {k: v for k, v in vars(stats).items() if k != "started"}
    tmp = out / "run.json.tmp"
    tmp.write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2))
    os.replace(tmp, out / "run.json")


def _work(args, settings: RunSettings, done: set[str], report: ReadReport):
    items = read_items(args.data, root_map=args.image_root_map, strict=args.strict, report=report)
    if args.limit:
        items = islice(items, args.limit)
    renderer = Renderer(settings.prompt, answer=settings.answer)
    total = 0
    for item in items:
        qs = [q for q in renderer.render(item) if q.qid not in done]  # render all: keeps the reference shuffle stream
        if qs:
            total += len(qs)
            yield item, qs


def dry_run(args, settings: RunSettings, done: set[str]) -> int:
    from rich.console import Console

    from harness.engine.images import encode_image  # noqa: F401  (size read below uses PIL lazily)

    report = ReadReport()
    n_q = n_auto = text_tokens = image_tokens = 0
    distinct: set[str] = set()
    for item, qs in _work(args, settings, done, report):
        size = None
        if any(q.image for q in qs):
            with contextlib.suppress(Exception):
                from PIL import Image
                with Image.open(item.image) as im:
                    size = im.size
        for q in qs:
            if q.auto is not None:
                n_auto += 1
                continue
            n_q += 1
            distinct.add(q.text if q.image is None else q.qid)
            text_tokens += estimate_text_tokens((q.system or "") + q.text) + 4
            if q.image:
                image_tokens += estimate_image_tokens(size, settings.prompt.detail)
    prices = price_for(settings.model, args.price_in, args.price_out)
    out_tokens = n_q * (1 if settings.answer == "logprobs" else settings.max_tokens)
    est = ((text_tokens + image_tokens) * prices[0] + out_tokens * prices[1]) / 1e6
    con = Console()
    con.print(f"[bold]dry run[/]: {n_q:,} questions to ask ({len(distinct):,} distinct requests), "
              f"{n_auto:,} auto-filled, {len(done):,} already done")
    con.print(f"estimated prompt tokens {text_tokens + image_tokens:,} (text {text_tokens:,}, images {image_tokens:,}); "
              f"completion tokens <= {out_tokens:,}")
    con.print(f"estimated cost: ${est:,.2f} at ${prices[0]}/{prices[1]} per 1M tokens in/out ({settings.model})")
    for e in report.errors[:20]:
        con.print(f"[red]invalid input[/]: {e}")
    return EXIT_INPUT if report.errors else EXIT_OK


class _Progress:
    """A few redraws a second from a ticker, never per request."""

    def __init__(self, engine: Engine, quiet: bool):
        self.engine, self.quiet = engine, quiet
        self._task = None

    async def __aenter__(self):
        if self.quiet or not sys.stderr.isatty() and not os.environ.get("HARNESS_PROGRESS"):
            self.quiet = True
            return self
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
        self.progress.start()
        self.tid = self.progress.add_task("questions", total=None, info="")
        self._task = asyncio.create_task(self._tick())
        return self

    async def _tick(self):
        while True:
            s = self.engine.stats
            dt = max(1e-6, time.monotonic() - s.started)
            done = s.answered + s.failed
            info = (f"{done / dt:,.0f} q/s  ok {s.answered:,}  failed {s.failed:,}  retried {s.retried:,}  "
                    f"cached {s.cached:,}  items {s.items:,}" + (f"  ${s.cost:,.2f}" if s.cost else ""))
            self.progress.update(self.tid, completed=done, info=info)
            await asyncio.sleep(0.25)

    async def __aexit__(self, *exc):
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await self._tick_once()
            self.progress.stop()

    async def _tick_once(self):
        s = self.engine.stats
        self.progress.update(self.tid, completed=s.answered + s.failed)


async def resolve_model(client: Client, model: str | None) -> str:
    """Health-check the endpoints; the served model when --model is omitted and there is just one."""
    served = await client.health()
    if model:
        if served and model not in served:
            raise FatalError(f"model {model!r} is not served here; the endpoint serves: {', '.join(served)}")
        return model
    if len(served) == 1:
        return served[0]
    raise FatalError(f"--model is required: the endpoint serves {len(served)} models ({', '.join(served) or 'none listed'})")


async def _run_async(args, endpoints: list[str]) -> int:
    from aiolimiter import AsyncLimiter
    from asyncio_throttle import Throttler
    from rich.console import Console

    con = Console(stderr=True)
    out = Path(args.out)
    if args.answer == "choice" and any("api.openai.com" in e for e in endpoints):
        raise FatalError("`--answer choice` needs vLLM's structured_outputs, which the OpenAI API does not have; "
                         "use `--answer logprobs` (top_logprobs) or `--answer generate`")
    api_key = os.environ.get(args.api_key_env) or None
    client = Client(endpoints, api_key, timeout=args.timeout, connections=max(64, args.concurrency * 2),
                    key_env=args.api_key_env)  # messages name the variable, never the key
    async with client:
        if args.dry_run and args.model:
            model = args.model
        else:
            model = await resolve_model(client, args.model)
        settings = build_settings(args, model)
        check_resume(out, settings, args.force)
        out.mkdir(parents=True, exist_ok=True)
        store = ResultStore(out / "results.jsonl")
        done, _ = store.scan(retry_errors=args.retry_errors)
        if args.dry_run:
            return dry_run(args, settings, done)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_manifest(out, settings, endpoints, args, "running", started=started)
        cache = None
        if args.cache:
            from harness.engine.cache import RequestCache
            cache = RequestCache(args.cache)
        dec = Decoding(model=model, answer=settings.answer, max_tokens=settings.max_tokens,
                       temperature=settings.temperature, seed=settings.seed, top_logprobs=settings.top_logprobs,
                       parser=settings.parser)
        engine = Engine(
            client=client, store=store, prompt=settings.prompt, decoding=dec, concurrency=args.concurrency,
            media=args.media, max_side=args.max_side, retry=RetryPolicy(max_retries=args.max_retries),
            throttle=Throttler(rate_limit=args.rps, period=1.0) if args.rps else None,
            token_limiter=AsyncLimiter(args.tpm, 60) if args.tpm else None, cache=cache,
            prices=price_for(model, args.price_in, args.price_out), max_cost=args.max_cost,
            dedupe=settings.prompt.mode == "text",
        )
        report = ReadReport()
        status = "incomplete"
        try:
            with store:
                async with _Progress(engine, args.quiet):
                    try:
                        stats = await engine.run(_work(args, settings, done, report))
                    except ItemError as e:  # --strict: stop at the bad line, keep what was written
                        engine.stats.fatal = str(e)
                        stats = engine.stats
        finally:
            if cache is not None:
                cache.close()
        summary = summarize_results(out / "results.jsonl") if (out / "results.jsonl").exists() else None
        if summary is not None:
            (out / "summary.json").write_bytes(orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2))
        unanswered = summary.n_errors if summary else 0
        status = "fatal" if stats.fatal else "stopped" if stats.stopped else ("incomplete" if unanswered else "done")
        write_manifest(out, settings, endpoints, args, status, stats, started)
        dt = time.monotonic() - stats.started
        n = stats.answered + stats.failed
        con.print(f"{n:,} questions in {dt:,.1f} s ({n / max(dt, 1e-9):,.0f}/s): {stats.answered:,} answered, "
                  f"{stats.failed:,} failed, {stats.cached:,} from cache/dedupe, {stats.retried:,} retries, "
                  f"{stats.images_encoded:,} images encoded for {stats.items:,} items"
                  + (f", ${stats.cost:,.4f}" if stats.cost else ""))
        for e in report.errors[:20]:
            con.print(f"[red]invalid input, skipped[/]: {e}")
        if summary is not None and summary.n_items:
            con.print(f"HCA {summary.hca:.2f} [{summary.hca_ci[0]:.2f}, {summary.hca_ci[1]:.2f}]  "
                      f"leaf {summary.leaf_acc:.2f}  unanswered {summary.n_unanswered:,}  -> {out / 'summary.json'}")
        if stats.fatal:
            con.print(f"[red]stopped[/]: {stats.fatal}")
            return EXIT_INPUT if isinstance(stats.fatal, str) and stats.fatal.startswith(str(args.data)) else EXIT_FATAL
        if stats.stopped:
            con.print(f"[yellow]stopped[/]: {stats.stopped}; run the same command again to continue")
            return EXIT_UNANSWERED
        if unanswered:
            con.print(f"[yellow]{unanswered:,} question(s) failed[/]; rerun with --retry-errors to ask them again")
            return EXIT_UNANSWERED
        return EXIT_INPUT if report.errors else EXIT_OK


def cmd_run(args) -> int:
    try:
        import uvloop  # optional: a faster event loop where installed
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.endpoint:
        return _run_local_or_remote(args, runner, args.endpoint)
    if not args.model:
        raise ValueError("give --endpoint URL, or --model PATH_OR_HUB_ID to start a local server")
    from harness.serving.launcher import local_server

    with local_server(args.model, quiet=args.quiet) as (url, served):
        args.model = served
        return _run_local_or_remote(args, runner, [url])


def _run_local_or_remote(args, runner, endpoints) -> int:
    try:
        return runner(_run_async(args, endpoints))
    except FatalError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return EXIT_FATAL
