"""`harness run`: turn the command line into a RunSpec and run it (the lifecycle is harness.runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
import sys

from harness.data.taxonomy import TAXONOMIES
from harness.runs.execute import RunResult, execute
from harness.runs.hierarchy import PRESETS
from harness.runs.spec import RunSpec


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="evaluate a model (endpoint, local server or CLIP) on an items file; resumable",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `harness run` (shared with `harness batch submit`)."""
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--backend", default="openai", metavar="KIND[:MODEL]",
                   help="openai: OpenAI-compatible endpoints (vLLM, GPT-4o, any server); clip[:SPEC]: a local "
                        "CLIP/SigLIP scorer (SPEC: open_clip:ARCH/PRETRAINED, hf:ID_OR_PATH; or give --model)")
    g.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="OpenAI-compatible base URL (repeat for several servers; URL#dp=N: a data-parallel vLLM with N "
                        "engines, each item pinned to one). Without it, a local server is started for --model")
    g.add_argument("--model", help="served model name (may be omitted if the endpoint serves one model), or a local path / hub id without --endpoint")
    g.add_argument("--data", help="items JSONL (reference annotation format); required unless --spec")
    g.add_argument("--out", help="run folder (results.jsonl, run.json, summary.json); required unless --spec")
    g.add_argument("--taxonomy", choices=sorted(TAXONOMIES), help="default: from the items' `taxonomy` field or inferred from labels")
    g.add_argument("--limit", type=int, help="first N items only")
    g.add_argument("--image-root-map", action="append", default=[], metavar="OLD=NEW")
    g.add_argument("--strict", action="store_true", help="stop at the first invalid input line (default: skip it and report)")
    g.add_argument("--shard", metavar="I/N", help="ask only shard I of N (0 <= I < N, by a stable hash of the item id): "
                                                  "N jobs share --out, each with its own results file and lock")
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
    g.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight per endpoint (default: 256 per vLLM engine, 256*N for URL#dp=N)")
    g.add_argument("--unavailable-after", type=float, default=120.0, metavar="SECONDS",
                   help="stop (exit 5, resumable) when no endpoint has been healthy for this long")
    g.add_argument("--rps", type=float, help="requests per second limit")
    g.add_argument("--tpm", type=int, help="tokens per minute budget (estimated)")
    g.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    g.add_argument("--max-retries", type=int, default=8)
    g.add_argument("--server-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="--model without --endpoint: seconds the local server may take to start (first download, large model)")
    g.add_argument("--media", choices=["base64", "file"], default="base64",
                   help="file: send file:// URLs (vLLM with --allowed-local-media-path)")
    g.add_argument("--max-side", type=int, help="resize images whose longest side is larger (reference: 1680)")
    g.add_argument("--cache", help="folder of a request-hash answer cache shared across runs")
    g.add_argument("--retry-errors", action="store_true", help="ask again the questions that failed before")
    g.add_argument("--max-cost", type=float, help="stop cleanly when the estimated cost reaches this many USD")
    g.add_argument("--price-in", type=float, help="USD per 1M prompt tokens (default: built-in table)")
    g.add_argument("--price-out", type=float, help="USD per 1M completion tokens")
    g.add_argument("--dry-run", action="store_true", help="count questions, tokens and cost; send nothing")
    g.add_argument("--template", default="a photo of a {}.", help="CLIP backend: option text, `{}` for the option")
    g.add_argument("--device", default="auto", help="CLIP backend: auto (CUDA when available), cpu, cuda:1 ...")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="CLIP backend precision")
    g.add_argument("--batch-size", type=int, default=64, help="CLIP backend: images per encoder call")
    g.add_argument("--workers", type=int, default=None, help="CLIP backend: image decoding threads")
    g.add_argument("--spec", metavar="FILE", help="run a RunSpec file (TOML or JSON) instead of the flags above")
    g.add_argument("--quiet", action="store_true", help="no progress display")
    g.add_argument("--force", action="store_true", help="resume even if run.json settings differ")
    from harness.cli.spec_help import help_from_fields
    from harness.runs.spec import ClipBackend, EndpointBackend, HierarchyTask

    help_from_fields(p, RunSpec, HierarchyTask, EndpointBackend, ClipBackend)  # flags without help: the field's doc


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of a `harness run` command line (what the Python API runs)."""
    for flag in ("data", "out"):
        if not getattr(args, flag):
            raise ValueError(f"--{flag} is required (or give a RunSpec file with --spec)")
    kind, _, clip_model = args.backend.partition(":")
    if kind not in ("openai", "clip"):
        raise ValueError(f"--backend {args.backend!r}: expected openai or clip[:SPEC]")
    if kind == "clip":
        backend: dict = {"kind": "clip", "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
                         "workers": args.workers}
    else:
        backend = {"kind": "openai", "endpoints": args.endpoint, "api_key_env": args.api_key_env,
                   "concurrency": args.concurrency, "rps": args.rps, "tpm": args.tpm, "timeout": args.timeout,
                   "max_retries": args.max_retries, "server_timeout": args.server_timeout,
                   "unavailable_after": args.unavailable_after}
    task = {"kind": "hierarchy", "taxonomy": args.taxonomy, "mode": args.mode, "prompt_variant": args.prompt_variant,
            "profile": args.profile, "protocol": args.protocol, "preset": args.preset, "answer": args.answer,
            "system": args.system, "suffix": args.suffix, "taxonomy_cot": args.taxonomy_cot,
            "taxonomy_in_context": args.taxonomy_in_context, "option_order": args.option_order,
            "parser": args.parser, "gpt_order": args.gpt_order, "template": args.template}
    if kind == "clip":
        task["answer"] = "clip"
    fields = {"out": args.out, "data": args.data, "model": clip_model or args.model, "backend": backend, "task": task,
              "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
              "top_logprobs": args.top_logprobs, "limit": args.limit, "image_root_map": args.image_root_map,
              "strict": args.strict, "media": args.media, "max_side": args.max_side, "cache": args.cache,
              "retry_errors": args.retry_errors, "force": args.force, "max_cost": args.max_cost,
              "price_in": args.price_in, "price_out": args.price_out, "shard": getattr(args, "shard", None)}
    return RunSpec.model_validate(fields)


def load_spec(path: str) -> RunSpec:
    """A RunSpec file (.toml or .json), its errors naming --spec, the file and the field."""
    import tomllib

    from pydantic import ValidationError

    from harness.cli.spec_errors import flag_of

    if Path(path).suffix not in (".toml", ".json"):
        raise ValueError(f"--spec {path}: expected a .toml or .json RunSpec file")
    try:
        return RunSpec.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--spec {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--spec {path}: not valid TOML ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise ValueError(f"--spec {path}: not valid JSON ({err['msg']})") from None
        where = ".".join(str(x) for x in err["loc"] if x not in ("openai", "clip", "hierarchy", "classify",
                                                                 "loglik", "wikiqa")) or flag_of(())
        raise ValueError(f"--spec {path}: {where}: {err['msg'].removeprefix('Value error, ')}") from None


def print_result(r: RunResult) -> int:
    from rich.console import Console

    con = Console(stderr=True, highlight=False, soft_wrap=True)
    for line in r.lines:
        (print if r.status == "dry-run" else con.print)(line)
    if r.message:
        colour = "red" if r.status in ("fatal", "locked") else "yellow"
        label = ("error" if r.status in ("fatal", "locked") else "stopped" if r.status in ("stopped", "interrupted")
                 else "note")
        con.print(f"[{colour}]{label}[/]: {r.message}", markup=True)
    return int(r.exit_code)


def cmd_run(args) -> int:
    from harness.cli.spec_errors import validated

    spec = load_spec(args.spec) if args.spec else validated(spec_from_args, args)
    return print_result(execute(spec, dry_run=args.dry_run, progress=not args.quiet, quiet_server=args.quiet,
                                on_line=None if args.quiet else _stderr))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
