"""`harness finetune ...`: data, train, merge, serve, compare. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="LoRA finetuning on the hierarchy items: data, train, merge, serve, compare")
    sub = p.add_subparsers(dest="finetune_command", metavar="SUBCOMMAND", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    d = sub.add_parser("data", formatter_class=fmt,
                       help="items -> train/eval split (items and SFT conversations, ours and LLaVA format)")
    d.add_argument("--data", required=True, help="items JSONL (reference annotation format)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--taxonomy", help="default: the items' `taxonomy` field, or inferred from the labels")
    d.add_argument("--modes", default="image,text", help="comma list of image, text")
    d.add_argument("--split-by", choices=["species", "image", "none"], default="species",
                   help="what train and eval must not share")
    d.add_argument("--eval-fraction", type=float, default=0.3, help="share of species (or images) held out")
    d.add_argument("--split-seed", type=int, default=0,
                   help="seed of the stable train/eval hash (another seed, another split)")
    d.add_argument("--answer", choices=["letter", "option", "letter_option"], default="letter",
                   help="assistant turn: the letter, the option text, or 'B. text'")
    d.add_argument("--prompt-variant", default=None, help="0..4 for both modes (default 0, or the --profile's)")
    d.add_argument("--profile", help="a servers/ profile: the model's published image and text prompt variants")
    d.add_argument("--system", default="helpful",
                   help="system prompt key (helpful = the reference training data), auto (evaluation default), or none")
    d.add_argument("--option-seed", type=int, default=0, help="seed of the hashed option order")
    d.add_argument("--include-root", action="store_true", help="also train on the taxonomy root level")
    d.add_argument("--dedupe-text", action="store_true",
                   help="text mode: one conversation per (species, level), not one per image")
    d.add_argument("--image-root-map", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite image paths in the SFT files (the split item files keep the original lines)")
    d.add_argument("--limit", type=int, help="first N items only")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", formatter_class=fmt, help="LoRA SFT with the transformers Trainer (resumable)")
    t.add_argument("--model", required=True, help="base model folder or hub id")
    t.add_argument("--data", required=True, nargs="+", help="SFT files (ours or LLaVA JSON)")
    t.add_argument("--out", required=True, help="run folder (checkpoints, adapter/, train.json, log.jsonl)")
    t.add_argument("--eval-data", nargs="*", default=[], help="SFT files for the eval loss")
    t.add_argument("--image-root-map", action="append", default=[], metavar="OLD=NEW",
                   help="image path prefix rewrite (repeatable)")
    t.add_argument("--limit", type=int, help="first N training conversations only")
    t.add_argument("--lora-r", type=int, default=64,
                   help="LoRA rank (adapters on every Linear of the language model)")
    t.add_argument("--lora-alpha", type=int, default=64, help="LoRA alpha: the update is scaled by alpha / r")
    t.add_argument("--lora-dropout", type=float, default=0.2, help="dropout on the LoRA branch's input")
    t.add_argument("--tune-projector", action="store_true", help="train the vision-language projector too")
    t.add_argument("--lr", type=float, default=5e-5, help="AdamW peak learning rate")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on biases and norms)")
    t.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up, as a share of the total steps")
    t.add_argument("--scheduler", default="cosine",
                   help="learning-rate schedule after warm-up (a transformers lr_scheduler_type: cosine, linear, "
                        "constant, ...)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (may be fractional)")
    t.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: run --epochs)")
    t.add_argument("--global-batch", type=int, default=128, help="examples per optimizer step, all devices")
    t.add_argument("--per-device-batch", type=int, default=16,
                   help="examples per forward on each device; gradient accumulation makes up --global-batch")
    t.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU that supports it, else fp32")
    t.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep activations instead of recomputing them (faster, more memory)")
    t.add_argument("--max-length", type=int,
                   help="stop at a conversation longer than this many tokens (never truncated: that would cut the "
                        "answer); default: no limit")
    t.add_argument("--max-side", type=int, help="cap the longest image side (reference Qwen: 1680)")
    t.add_argument("--seed", type=int, default=42, help="seed of the LoRA initialisation and the data order")
    t.add_argument("--deepspeed", help="`zero2` or a DeepSpeed JSON config")
    t.add_argument("--save-steps", type=int, default=500,
                   help="optimizer steps between checkpoints (checkpoint-N/; a rerun resumes from the newest)")
    t.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (older ones are deleted)")
    t.add_argument("--logging-steps", type=int, default=10, help="optimizer steps between log lines (log.jsonl)")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (image decoding)")
    t.add_argument("--force", action="store_true", help="resume even if train.json settings differ")
    t.add_argument("--quiet", action="store_true", help="no per-step log lines (log.jsonl still has them)")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("merge", formatter_class=fmt, help="merge an adapter into its base: a standalone model folder")
    m.add_argument("adapter", help="adapter folder (RUN/adapter)")
    m.add_argument("--out", required=True, help="folder of the merged model (weights, processor, generation config)")
    m.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the training dtype")
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("serve", help="vLLM with the base model's profile and the adapter added (--enable-lora)")
    s.add_argument("--adapter", required=True, help="adapter folder (RUN/adapter)")
    s.add_argument("--profile", required=True, help="the base model's serving profile")
    s.add_argument("--name", default="tuned", help="model name of the adapter in requests")
    s.add_argument("--model-path", help="serve a local copy of the base model")
    s.add_argument("--dry-run", action="store_true", help="print the vLLM command")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after `--`: more vLLM flags")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("compare", formatter_class=fmt,
                       help="visual and text HCA of base vs tuned (four runs and the deltas)")
    c.add_argument("--data", required=True, help="held-out items (items_eval.jsonl of `finetune data`)")
    c.add_argument("--out", required=True,
                   help="folder of the four runs (base-image, tuned-text, ...) and compare.md / compare.json")
    c.add_argument("--base-model", required=True, help="served name of the base model (or a local path)")
    c.add_argument("--tuned-model", required=True, help="served name of the adapter, or a merged model path")
    c.add_argument("--endpoint", action="append", default=[], help="server(s) for both models")
    c.add_argument("--tuned-endpoint", action="append", default=[], help="server(s) of the tuned model if different")
    c.add_argument("--modes", default="image,text", help="comma list of image, text: the modes compared")
    c.add_argument("run_args", nargs=argparse.REMAINDER, help="after `--`: options for every `harness run`")
    c.set_defaults(func=cmd_compare)


def _modes(spec: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in spec.split(",") if m.strip())
    bad = [m for m in modes if m not in ("image", "text")]
    if bad or not modes:
        raise ValueError(f"--modes {spec!r}: use image and/or text")
    return modes


def _taxonomy(args) -> str:
    from harness.data.items import detect_taxonomy

    return detect_taxonomy(args.data, args.taxonomy)


def _rest(values: list[str]) -> list[str]:
    return values[1:] if values[:1] == ["--"] else values


def cmd_data(args) -> int:
    import orjson

    from finetune.data import DataConfig, conversations_from_items, split_items_file, write_jsonl, write_llava
    from harness.data.items import file_hash, read_items

    src = Path(args.data)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such items file")
    modes = _modes(args.modes)
    tax = _taxonomy(args)
    variants = {m: args.prompt_variant if args.prompt_variant is not None else 0 for m in modes}
    if args.profile:
        from harness.serving.profiles import load_profile

        prof = load_profile(args.profile)
        if args.prompt_variant is None:
            variants = {m: prof.prompt_variant_for(tax, m) for m in modes}
    variants = {m: int(v) if isinstance(v, str) and v.isdigit() else v for m, v in variants.items()}
    system = None if args.system == "none" else args.system
    cfg = DataConfig(taxonomy=tax, modes=modes, image_variant=variants.get("image", 0),
                     text_variant=variants.get("text", 0), system=system, answer=args.answer,
                     seed=args.option_seed, include_root=args.include_root,
                     dedupe_text=args.dedupe_text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = src
    if args.limit:
        source = out / "items_all.jsonl"
        with src.open("rb") as f, source.open("wb") as g:
            g.writelines(islice((ln for ln in f if ln.strip()), args.limit))
    train_items, eval_items, rep = split_items_file(source, out, by=args.split_by, eval_fraction=args.eval_fraction,
                                                    seed=args.split_seed)
    counts: dict[str, int] = {}
    for side, path in (("train", train_items), ("eval", eval_items)):
        for mode in modes:
            one = cfg.model_copy(update={"modes": (mode,)})
            convs = list(conversations_from_items(read_items(path, root_map=args.image_root_map), one))
            counts[f"sft_{side}_{mode}.jsonl"] = write_jsonl(out / f"sft_{side}_{mode}.jsonl", convs)
            write_llava(out / f"llava_{side}_{mode}.json", convs)
    manifest = {"source": str(src), "source_sha256": file_hash(src), "limit": args.limit,
                "config": cfg.model_dump(mode="json"), "split": rep.model_dump(), "conversations": counts,
                "image_root_map": args.image_root_map}
    (out / "data.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    print(f"items: {rep.items['train']:,} train / {rep.items['eval']:,} eval "
          f"({rep.keys['train']:,} / {rep.keys['eval']:,} distinct {args.split_by}, none shared)")
    for name, n in counts.items():
        print(f"  {out / name}: {n:,} conversations (LLaVA format: {name.replace('sft_', 'llava_').replace('.jsonl', '.json')})")
    print(f"evaluate the held-out items with: harness run --data {eval_items} ...")
    return 0


def cmd_train(args) -> int:
    from finetune.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model, data=args.data, out=args.out, eval_data=args.eval_data, image_root_map=args.image_root_map,
        limit=args.limit, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        tune_projector=args.tune_projector, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, scheduler=args.scheduler, epochs=args.epochs, max_steps=args.max_steps,
        global_batch=args.global_batch, per_device_batch=args.per_device_batch, dtype=args.dtype,
        gradient_checkpointing=not args.no_gradient_checkpointing, max_length=args.max_length,
        max_side=args.max_side, seed=args.seed, deepspeed=args.deepspeed, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, logging_steps=args.logging_steps, num_workers=args.num_workers,
    )
    r = train(cfg, force=args.force, quiet=args.quiet)
    first, last = (r.losses[0], r.losses[-1]) if r.losses else (float("nan"), float("nan"))
    print(f"trained {r.steps} steps ({r.epochs:.2f} epochs, {r.examples:,} examples, {r.dtype})"
          + (f", resumed from {r.resumed_from}" if r.resumed_from else "")
          + f": loss {first:.4f} -> {last:.4f}; {r.tokens_seen:,} tokens in {r.train_seconds:.1f} s "
          f"({r.tokens_per_second:,.0f} tokens/s); adapter: {r.adapter}")
    return 0


def cmd_merge(args) -> int:
    from finetune.merge import dtype_of_folder, merge

    out = merge(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"merged model ({dtype_of_folder(out)}) written to {out}")
    return 0


def cmd_serve(args) -> int:
    """The base model's vLLM command (its serving profile, harness.serving) with the adapter's LoRA flags."""
    import os
    import shlex

    from finetune.serve import lora_args
    from harness.serving.command import default_launcher, vllm_available, vllm_command
    from harness.serving.profiles import API_KEY_ENV, ProfileError, load_profile

    try:
        prof = load_profile(args.profile)
    except ProfileError as e:
        print(f"harness finetune serve: {e}", file=sys.stderr)
        return 2
    if args.model_path and not Path(args.model_path).exists():
        print(f"harness finetune serve: --model-path {args.model_path}: no such folder", file=sys.stderr)
        return 2
    argv = vllm_command(prof, model=args.model_path, extra=[*lora_args(args.adapter, args.name), *_rest(args.vllm_args)],
                        launcher="cli" if args.dry_run else default_launcher())
    print(f"# the adapter answers as model {args.name!r}: harness run --model {args.name} ...", file=sys.stderr)
    key_set = bool(os.environ.get(API_KEY_ENV))
    if args.dry_run:
        print(shlex.join(argv))
        state = "set" if key_set else "NOT set: the server would accept requests without a key"
        print(f"# API key: read from ${API_KEY_ENV}, {state}", file=sys.stderr)
        return 0
    if not vllm_available():
        print("harness finetune serve: vLLM is not installed in this environment (pip install vllm on a GPU machine); "
              "to see the command: add --dry-run", file=sys.stderr)
        return 2
    if not key_set:
        print(f"harness finetune serve: warning: ${API_KEY_ENV} is not set; the server accepts requests without a key",
              file=sys.stderr)
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, dict(os.environ))  # replaced by vLLM: signals reach it directly
    return 0  # not reached


def _run_options(data: str, out: str, run_args: list[str]) -> tuple[dict, bool]:
    """The `harness run` options after `--` as RunSpec fields (parsed as `harness run` parses them),
    and whether `--quiet` was given."""
    from harness.cli.run import add_run_arguments, spec_from_args
    from harness.cli.spec_errors import validated

    p = argparse.ArgumentParser(prog="harness finetune compare ... --", add_help=False)
    add_run_arguments(p)
    ns = p.parse_args(["--data", data, "--out", out, *run_args])
    spec = validated(spec_from_args, ns)
    return spec.model_dump(mode="json", exclude={"out", "data", "model"}), bool(ns.quiet)


def cmd_compare(args) -> int:
    from finetune.compare import Side, compare, to_markdown_deltas
    from harness.cli.run import print_result

    base = Side("base", args.base_model, tuple(args.endpoint))
    tuned = Side("tuned", args.tuned_model, tuple(args.tuned_endpoint or args.endpoint))
    options, quiet = _run_options(args.data, args.out, _rest(args.run_args))
    res = compare(base, tuned, args.data, args.out, modes=_modes(args.modes), options=options, progress=not quiet,
                  on_result=lambda name, r: print_result(r))
    print(to_markdown_deltas(res["deltas"]), end="")
    if "text_gain_minus_visual_gain" in res:
        print(f"text HCA gain minus visual HCA gain: {res['text_gain_minus_visual_gain']:+.2f} points")
    print(f"-> {Path(args.out) / 'compare.md'}, {Path(args.out) / 'compare.json'}")
    for name, msg in res.get("errors", {}).items():
        print(f"harness finetune compare: {name}: {msg}", file=sys.stderr)
    bad = {k: v for k, v in res["exit_codes"].items() if v}
    if bad:
        print(f"harness finetune compare: runs with a non-zero exit: {bad}", file=sys.stderr)
        return max(bad.values())
    return 0
