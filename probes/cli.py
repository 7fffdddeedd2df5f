"""`harness probe ...`: extract hidden-state features (images or taxonomy sentences) and train probes."""

from __future__ import annotations

import csv
import sys
from dataclasses import asdict
from pathlib import Path

import orjson


def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _levels(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv_list(s))
    except ValueError:
        raise ValueError(f"--levels expects comma-separated level numbers, got {s!r}") from None


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint folder or hub id (local files only offline)")
    p.add_argument("--out", required=True, help="feature store folder (created, or resumed when it exists)")
    p.add_argument("--sites", type=_csv_list, default=None,
                   help="override the recipe's sites: vision, projector, llm.K (0..L, negative from the end), llm.all")
    p.add_argument("--pools", type=_csv_list, default=None,
                   help="override the recipe's pools: last, mean, img_last, img_mean")
    p.add_argument("--batch-size", type=int, default=1, help="inputs per forward (default 1, as the reference)")
    p.add_argument("--shard-size", type=int, default=1024, help="rows per shard file (a multiple of --batch-size)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--store-dtype", default="float16", choices=["float16", "float32"],
                   help="precision of the stored features (float32 when values exceed the float16 range)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many inputs (a later run continues)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable input (default: record and go on)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("probe", help="hidden-state features and linear probes (where is the hierarchy lost?)")
    sub = p.add_subparsers(dest="probe_command", metavar="SUBCOMMAND", required=True)

    e = sub.add_parser("extract", help="image features (vision encoder, projector, LLM layers) into a feature store")
    _add_model_args(e)
    e.add_argument("--data", required=True,
                   help="JSONL with image, label, split [, id, levelN] (e.g. data/probing/CUB200_all.jsonl)")
    e.add_argument("--taxonomy", default=None, help="taxonomy id or file: labels per level and level names")
    e.add_argument("--recipe", default="hierarchy-vision",
                   help="hierarchy-vision (default), hierarchy-llm, classification (see probes/recipes.toml)")
    e.add_argument("--max-side", type=int, default=None, help="Qwen size rule: longest-side cap (recipe default)")
    e.add_argument("--max-pixels", type=int, default=None, help="Qwen size rule: max pixels after the cap")
    e.add_argument("--image-root-map", action="append", default=[], metavar="OLD=NEW",
                   help="image path prefix rewrite (repeatable; the shipped files carry the authors' paths)")
    e.add_argument("--skip-unmatched", action="store_true", help="skip records whose label is not in the taxonomy")
    e.set_defaults(func=cmd_extract)

    t = sub.add_parser("text", help="text-probing features: a sentence per species and level, every layer")
    _add_model_args(t)
    t.add_argument("--taxonomy", required=True, help="taxonomy id (level names), e.g. cub or inat_plant")
    t.add_argument("--split", action="append", default=[], metavar="NAME=FILE",
                   help="species -> path file of a split (default for cub / inat_plant: the shipped "
                        "species-disjoint train/test files in data/probing)")
    t.add_argument("--recipe", default="text",
                   help="text-probing recipe of probes/recipes.toml (system prompt, sentence, sites, pools)")
    t.add_argument("--no-leaf", action="store_true", help="no species-level sentences (as the reference)")
    t.set_defaults(func=cmd_text)

    r = sub.add_parser("train", help="train a probe per level on stored features; probe HCA and per-level accuracy")
    r.add_argument("store", help="feature store folder (from `harness probe extract` / `text`)")
    r.add_argument("--out", required=True, help="results folder: one subfolder per feature")
    r.add_argument("--feature", action="append", default=[], metavar="KEY",
                   help="feature key or shell pattern (e.g. projector.mean, 'llm.*.mean'); repeatable")
    r.add_argument("--probe", choices=["linear", "mlp"], default="linear",
                   help="linear: nn.Linear(d, C) per level; mlp: Linear(d, d) -> ReLU -> Linear(d, C) (the reference's)")
    r.add_argument("--epochs", type=int, default=500, help="training epochs per level (the reference: 500)")
    r.add_argument("--lr", type=float, default=1e-4,
                   help="Adam learning rate (the hierarchy paper: 1e-4; the classification study: 1e-3)")
    r.add_argument("--batch-size", type=int, default=512, help="training rows per step, in stored order")
    r.add_argument("--select", choices=["val", "last", "reference"], default="val",
                   help="epoch selection: val (default), last, or reference (best TEST epoch, as the paper)")
    r.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training groups held out for validation by a stable hash (--select val)")
    r.add_argument("--seed", type=int, default=42, help="seed of the probe initialisation and the validation hold-out")
    r.add_argument("--levels", type=_levels, default=None, help="e.g. 1,2,3 (default: every probeable level)")
    r.add_argument("--train-split", default="train", help="store split the probes are trained (and validated) on")
    r.add_argument("--test-split", default="test", help="store split the probes are scored on (accuracy, probe HCA)")
    r.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG curves")
    r.add_argument("--json", action="store_true", help="print the results as JSON")
    r.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="describe a feature store")
    i.add_argument("store", help="feature store folder")
    i.set_defaults(func=cmd_info)


# ---------------------------------------------------------------------- extract


def _recipe(args):
    from probes.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    upd = {}
    if args.sites:
        upd["sites"] = tuple(args.sites)
    if args.pools:
        upd["pools"] = tuple(args.pools)
    for k in ("max_side", "max_pixels"):
        if getattr(args, k, None) is not None:
            upd[k] = getattr(args, k)
    return recipe.model_copy(update=upd) if upd else recipe


def _settings(args, ext, recipe, data: dict) -> dict:
    from probes.arch import expand_sites
    from probes.extract import feature_keys

    sites = expand_sites(recipe.sites, ext.n_layers)
    return {
        "model": str(args.model),
        "model_type": ext.model_type,
        "recipe": recipe.model_dump(),
        "sites": sites,
        "features": [f"{s}.{p}" for s, p in feature_keys(sites, recipe.pools)],
        "size_rule": asdict(ext.size_rule(recipe)),
        "dtype": str(ext.torch_dtype).replace("torch.", ""),
        "store_dtype": args.store_dtype,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        **data,
    }


def _run(args, ext, items, recipe, settings: dict, extra: dict) -> int:
    from harness import __version__
    from probes.extract import default_progress, run_extraction

    rep = run_extraction(
        ext, items, args.out, recipe, settings=settings, extra={**extra, "harness_version": __version__},
        batch_size=args.batch_size, shard_size=args.shard_size, store_dtype=args.store_dtype, limit=args.limit,
        strict=args.strict, progress=None if args.quiet else default_progress,
    )
    state = "complete" if rep.complete else "incomplete (run again to continue)"
    resumed = f", resumed after {rep.resumed_at} inputs" if rep.resumed_at else ""
    print(f"{args.out}: {rep.n_rows} rows, {rep.n_errors} unreadable inputs, {rep.n_new} new in {rep.seconds:.1f} s "
          f"({rep.rate:.2f} items/s){resumed}; {state}")
    if rep.n_errors:
        print(f"harness probe: {rep.n_errors} inputs could not be read: see {Path(args.out) / 'errors.jsonl'}",
              file=sys.stderr)
        return 1
    return 0


def cmd_extract(args) -> int:
    from harness.data.items import file_hash
    from probes.data import level_names, read_image_items, resolve_taxonomy
    from probes.extract import Extractor

    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such file")
    tax = resolve_taxonomy(args.taxonomy)
    recipe = _recipe(args)
    if recipe.sentence is not None:
        raise ValueError(f"recipe {recipe.name!r} is a text-probing recipe: use `harness probe text`")
    # validate the whole file before loading the model (a bad line 90,000 should not wait for it)
    depth = 0
    for it in read_image_items(data, taxonomy=tax, skip_unmatched=args.skip_unmatched):
        depth = max(depth, len(it.labels))
    ext = Extractor(args.model, device=args.device, dtype=args.dtype)
    # the data's identity is its hash (a resume from another folder or a moved file is fine)
    settings = _settings(args, ext, recipe, {
        "mode": "image", "data_sha256": file_hash(data),
        "taxonomy": str(tax.source.name) if tax else None, "skip_unmatched": args.skip_unmatched,
    })
    extra = {"data": str(data), "level_names": level_names(tax, depth), "image_root_map": list(args.image_root_map)}
    items = read_image_items(data, taxonomy=tax, root_map=args.image_root_map, skip_unmatched=args.skip_unmatched)
    return _run(args, ext, items, recipe, settings, extra)


_SHIPPED_SPLITS = {
    "cub": ("CUB200_train_taxonomy.json", "CUB200_test_taxonomy.json"),
    "inat_plant": ("Inat21_Plant_train_taxonomy.json", "Inat21_Plant_test_taxonomy.json"),
}


def cmd_text(args) -> int:
    from harness.data.items import file_hash
    from harness.data.taxonomy import load_taxonomy
    from probes.data import level_names, load_split_taxonomy, shipped_probing_file, text_items
    from probes.extract import Extractor

    tax = load_taxonomy(args.taxonomy)
    splits: dict[str, Path] = {}
    for s in args.split:
        name, sep, file = s.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--split expects NAME=FILE, got {s!r}")
        splits[name] = Path(file)
    if not splits:
        if args.taxonomy not in _SHIPPED_SPLITS:
            raise ValueError(f"--split NAME=FILE is required for taxonomy {args.taxonomy!r} "
                             f"(shipped splits exist for {', '.join(_SHIPPED_SPLITS)})")
        tr, te = _SHIPPED_SPLITS[args.taxonomy]
        splits = {"train": shipped_probing_file(tr), "test": shipped_probing_file(te)}
    depth = 0
    for name, file in splits.items():
        if not file.is_file():
            raise FileNotFoundError(f"--split {name}={file}: no such file")
        depth = max([depth] + [len(p) for p in load_split_taxonomy(file).values()])
    recipe = _recipe(args)
    if recipe.sentence is None:
        raise ValueError(f"recipe {recipe.name!r} has no `sentence`: text probing needs one (e.g. --recipe text)")
    names = level_names(tax, depth)
    ext = Extractor(args.model, device=args.device, dtype=args.dtype)
    settings = _settings(args, ext, recipe, {
        "mode": "text", "splits_sha256": {k: file_hash(v) for k, v in splits.items()},
        "taxonomy": args.taxonomy, "leaf": not args.no_leaf, "level_names": names,
    })
    items = text_items(splits, recipe.sentence, names, leaf=not args.no_leaf)
    return _run(args, ext, items, recipe, settings, {"level_names": names, "splits": {k: str(v) for k, v in splits.items()}})


# ---------------------------------------------------------------------- train


def cmd_train(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from probes.store import FeatureStore
    from probes.train import ProbeConfig, plot_sweep, train_probes

    store = FeatureStore(args.store)
    if args.feature:
        features = store.match(args.feature)
    elif len(store.keys) == 1:
        features = store.keys
    else:
        raise ValueError(f"{args.store}: several features ({', '.join(store.keys)}); choose with --feature")
    cfg = ProbeConfig(
        probe=args.probe, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, select=args.select,
        val_fraction=args.val_fraction, seed=args.seed, levels=args.levels, device=args.device,
        train_split=args.train_split, test_split=args.test_split,
    )
    out = Path(args.out)
    rows = []
    for feat in features:
        run = train_probes(store, feat, out / feat, cfg, plots=not args.no_plots)
        s = run.summary
        rows.append({"feature": feat, "n_items": s.n_items, "hca": round(s.hca, 4), "leaf_acc": round(s.leaf_acc, 4),
                     "per_level": {k: round(v, 4) for k, v in s.per_level.items()},
                     "skipped": {str(r.level): r.skipped for r in run.levels if r.skipped}})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_bytes(orjson.dumps({"select": cfg.select, "config": cfg.model_dump(), "rows": rows},
                                                  option=orjson.OPT_INDENT_2) + b"\n")
    levels = sorted({k for r in rows for k in r["per_level"]}, key=int)
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["feature", "n_items", "hca", "leaf_acc"] + [f"level{lv}" for lv in levels])
        for r in rows:
            w.writerow([r["feature"], r["n_items"], r["hca"], r["leaf_acc"]] + [r["per_level"].get(lv, "") for lv in levels])
    if len(rows) > 1 and not args.no_plots:
        plot_sweep(rows, out / "sweep.png")
    if args.json:
        sys.stdout.write(orjson.dumps(rows if len(rows) > 1 else rows[0], option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    names = store.level_names
    table = Table(title=f"probes on {args.store} (select: {cfg.select})")
    for c in ["feature", "n", "HCA"] + [names[int(lv) - 1] if int(lv) <= len(names) else f"level {lv}" for lv in levels]:
        table.add_column(c, justify="left" if c == "feature" else "right")
    for r in rows:
        table.add_row(r["feature"], str(r["n_items"]), f"{r['hca']:.2f}",
                      *[f"{r['per_level'][lv]:.2f}" if lv in r["per_level"] else "-" for lv in levels])
    Console().print(table)
    for r in rows:
        for lv, why in r["skipped"].items():
            print(f"{r['feature']}: level {lv} not probed: {why}")
    print(f"results in {out}/<feature>/ (probe.json, levels.csv, curves.csv, results.jsonl: `harness report` reads it)")
    return 0


def cmd_info(args) -> int:
    from probes.store import FeatureStore

    st = FeatureStore(args.store)
    m = st.manifest
    s = m.get("settings", {})
    print(f"{st.root}: {m.get('n_rows', 0)} rows in {len(st.shards)} shards, {m.get('n_errors', 0)} unreadable inputs, "
          f"{'complete' if m.get('complete') else 'incomplete'}")
    print(f"model {s.get('model')} ({s.get('model_type')}), mode {s.get('mode')}, recipe {s.get('recipe', {}).get('name')}")
    print(f"levels: {', '.join(st.level_names)}")
    for k in st.keys:
        print(f"  {k}: {m['dims'][k]}-d {m.get('store_dtype')}")
    return 0
