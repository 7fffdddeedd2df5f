"""`harness classify ...`: VLMs as image classifiers (classification-protocol.md).

    harness classify run     generation: open world, closed world (K labels), N-way (thesis prompt)
    harness classify loglik  log-likelihood of every class name (vLLM prompt_logprobs)
    harness classify wikiqa  ImageWikiQA (with/without CoT; class-name and no-image controls)
    harness classify score   metrics of a run folder (scorers, synonyms, NLI / embedding mapping)
    harness classify freq    class-name frequency in a text corpus vs per-class accuracy (+ PNG)

Run folders hold results.jsonl (append-only, resumable), run.json (settings, no secrets) and
summary.json. Running the same command again resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from itertools import islice
from pathlib import Path

import orjson

EXIT_OK, EXIT_INPUT, EXIT_UNANSWERED, EXIT_FATAL = 0, 2, 3, 4


# ---------------------------------------------------------------- arguments

def _transport(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transport")
    g.add_argument("--endpoint", action="append", default=[], metavar="URL", required=True,
                   help="OpenAI-compatible base URL (repeat for several servers)")
    g.add_argument("--model", help="served model name (may be omitted when the endpoint serves one)")
    g.add_argument("--out", required=True, help="run folder (results.jsonl, run.json, summary.json)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    g.add_argument("--rps", type=float, help="requests per second limit")
    g.add_argument("--timeout", type=float, default=300.0)
    g.add_argument("--max-retries", type=int, default=8)
    g.add_argument("--media", choices=["base64", "file"], default="base64",
                   help="file: send file:// URLs (vLLM with --allowed-local-media-path)")
    g.add_argument("--max-side", type=int, help="resize images whose longest side is larger")
    g.add_argument("--image-root-map", action="append", default=[], metavar="OLD=NEW")
    g.add_argument("--limit", type=int, help="first N items (in the protocol's order)")
    g.add_argument("--retry-errors", action="store_true", help="ask again what failed before")
    g.add_argument("--force", action="store_true", help="resume even if run.json settings differ")
    g.add_argument("--dry-run", action="store_true", help="print the first requests (images elided); send nothing")
    g.add_argument("--quiet", action="store_true")


def _style_args(p: argparse.ArgumentParser, *, max_tokens: bool = True) -> None:
    g = p.add_argument_group("request")
    g.add_argument("--request", choices=["chat", "raw"], default="chat",
                   help="chat: the model's chat template; raw: the reference's raw prompt (--template)")
    g.add_argument("--template", help="raw template: llava15, llava16-mistral, llava16-vicuna, blip2")
    g.add_argument("--text-first", action="store_true", help="text before the image (the reference's API order)")
    if max_tokens:
        g.add_argument("--max-tokens", type=int)
        g.add_argument("--temperature", type=float, default=0.0)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="shipped: imagenet (needs --data), flowers, cars, caltech")
    g.add_argument("--data", help="image list JSONL (image, label, split)")
    g.add_argument("--classes", help="class list JSON")
    g.add_argument("--split", help="evaluation split (default: valid for imagenet, test otherwise; `all`)")
    g.add_argument("--first-synonym", action="store_true", help="class names: text before the first comma (thesis)")


def add_cli(sub) -> None:
    c = sub.add_parser("classify", help="VLMs as image classifiers: generation, log-likelihood, ImageWikiQA, scoring")
    cs = c.add_subparsers(dest="classify_command", metavar="SUBCOMMAND", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    r = cs.add_parser("run", help="classification by generation (open / closed world, N-way)", formatter_class=fmt)
    _dataset_args(r)
    g = r.add_argument_group("protocol")
    g.add_argument("--task", choices=["open", "closed", "nway"], default="open",
                   help="open: 'What type of object...'; closed: '... Choose one from \"...\"'; nway: the thesis prompt")
    g.add_argument("--k", help="label-set size (truth included) for closed / nway: 2, 5, 20, 100, ... or `all`")
    g.add_argument("--order", choices=["random", "fixed"], default="random", help="candidate order (fixed: class-list order, K = all)")
    g.add_argument("--wording", type=int, default=0, help="open-world wording 0..3 (0: the main one)")
    g.add_argument("--cot", action="store_true", help="chain of thought (\"Let's think step by step.\")")
    g.add_argument("--protocol", choices=["reference", "robust"], default="robust",
                   help="reference: the seed-1234 global candidate stream; robust: per-item hashed candidates")
    g.add_argument("--seed", type=int, default=1234)
    _style_args(r)
    _transport(r)
    r.set_defaults(func=cmd_run)

    ll = cs.add_parser("loglik", help="score every class name by its log-likelihood (vLLM prompt_logprobs)",
                       formatter_class=fmt)
    _dataset_args(ll)
    g = ll.add_argument_group("protocol")
    g.add_argument("--question", help="default: 'What type of object is in this photo?'")
    g.add_argument("--prefix", help="answer prefix the class follows (default: 'The photo features a'; blip2: 'A')")
    g.add_argument("--prior", action="store_true", help="also score every class without the image (the paper's image-free prior)")
    g.add_argument("--seed", type=int, default=1234, help="item order: the reference's seeded shuffle")
    g.add_argument("--method", choices=["trie", "prompt-logprobs"], default="trie",
                   help="trie: one prefix-cached request per node of the class-token trie (vLLM logprob_token_ids); "
                        "prompt-logprobs: one prompt_logprobs request per class (vLLM then skips the prefix cache)")
    g.add_argument("--group-workers", type=int, default=2, help="images in flight (each fans out over the classes)")
    _style_args(ll, max_tokens=False)
    _transport(ll)
    ll.set_defaults(func=cmd_loglik)

    w = cs.add_parser("wikiqa", help="ImageWikiQA (2,000 four-choice knowledge questions)", formatter_class=fmt)
    w.add_argument("--data", help="default: the shipped data/classification/imagewikiqa.jsonl")
    w.add_argument("--cot", action="store_true", help="append \"Let's think step by step.\"")
    w.add_argument("--control", choices=["none", "classname", "noimage"], default="none",
                   help="classname: 'this object' -> the class name, text only; noimage: the question without the image")
    _style_args(w)
    _transport(w)
    w.set_defaults(func=cmd_wikiqa)

    s = cs.add_parser("score", help="metrics of classify run folders", formatter_class=fmt)
    s.add_argument("runs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--synonyms", help="JSON {class: [synonyms]} or JSONL {class, synonyms}: extra names for the scorers")
    s.add_argument("--map", choices=["none", "nli", "embedding"], default="none",
                   help="map answers that are not a candidate into the label set (closed / N-way runs)")
    s.add_argument("--map-model", help="default: facebook/bart-large-mnli (nli), sentence-transformers/all-MiniLM-L6-v2 (embedding)")
    s.add_argument("--direct", choices=["none", "exact", "contained"], default="contained",
                   help="answers taken without mapping: exact = the answer is a candidate; contained = names exactly one")
    s.add_argument("--device", help="torch device of the mapper (cpu, cuda, ...)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_score)

    f = cs.add_parser("freq", help="class-name frequency in a corpus vs per-class accuracy", formatter_class=fmt)
    f.add_argument("--corpus", required=True, action="append", help="JSONL of texts (repeat: counts add up)")
    f.add_argument("--field", default="text", help="text field of corpus objects (string or list of strings)")
    f.add_argument("--run", help="a classify run folder: per-class accuracy from it (generation or loglik)")
    f.add_argument("--classes", help="class list JSON (default: the run's)")
    f.add_argument("--scorer", choices=["substring", "exact", "corrected"], default="substring",
                   help="per-class accuracy of generation runs (the reference: substring)")
    f.add_argument("--tokenizer", choices=["treebank", "nltk", "split"], default="treebank")
    f.add_argument("--out", help="write counts, correlations and bins as JSON here")
    f.add_argument("--plot", help="write the binned accuracy plot (PNG) here")
    f.set_defaults(func=cmd_freq)


# ---------------------------------------------------------------- shared run machinery

def _style(args, model: str, default_max_tokens: int):
    from harness.classification.prompts import raw_template
    from harness.classification.requests import Style

    template = raw_template(args.template) if args.template else None
    if args.request == "raw" and template is None:
        raise ValueError("--request raw needs --template (llava15, llava16-mistral, llava16-vicuna, blip2)")
    return Style(model=model, request=args.request, template=template, text_first=args.text_first,
                 max_tokens=getattr(args, "max_tokens", None) or default_max_tokens,
                 temperature=getattr(args, "temperature", 0.0))


def _sha(path) -> str:
    from harness.data.items import file_hash

    return file_hash(path)


def _execute(args, *, kind: str, make, group_workers: int | None = None) -> int:
    """Health check, settings, resume, loop, summary, manifest. `make(model)` -> (settings, task,
    groups(done), summarize(results_path) -> dict)."""
    from harness.classification.loop import Loop, check_resume, now, write_manifest
    from harness.backends.http import Client, FatalError, RetryPolicy
    from harness.runs.results import ResultStore
    from harness.cli.run import resolve_model

    out = Path(args.out)
    api_key = os.environ.get(args.api_key_env) or None
    transport = {"concurrency": args.concurrency, "rps": args.rps, "timeout": args.timeout,
                 "max_retries": args.max_retries, "media": args.media}

    async def main() -> int:
        client = Client(args.endpoint, api_key, timeout=args.timeout, connections=max(64, args.concurrency * 2),
                        key_env=args.api_key_env)
        async with client:
            model = args.model if args.dry_run and args.model else await resolve_model(client, args.model)
            settings, task, groups, summarize = make(model)
            if hasattr(task, "prepare"):
                await task.prepare(client)
            if args.dry_run:
                return _dry_run(task, groups(set()))
            check_resume(out, settings, args.force)
            out.mkdir(parents=True, exist_ok=True)
            store = ResultStore(out / "results.jsonl")
            done, _ = store.scan(retry_errors=args.retry_errors)
            started = now()
            write_manifest(out, kind=kind, settings=settings, endpoints=args.endpoint, api_key_env=args.api_key_env,
                           transport=transport, status="running", started=started)
            throttle = None
            if args.rps:
                from asyncio_throttle import Throttler
                throttle = Throttler(rate_limit=args.rps, period=1.0)
            loop = Loop(client=client, store=store, task=task, concurrency=args.concurrency,
                        group_workers=group_workers, media=args.media, max_side=args.max_side,
                        retry=RetryPolicy(max_retries=args.max_retries), throttle=throttle,
                        progress_every=None if args.quiet or not sys.stderr.isatty() else 5.0)
            with store:
                stats = await loop.run(groups(done))
            summary = summarize(out / "results.jsonl")
            (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
            errors = summary.get("n_errors", 0)
            status = "fatal" if stats.fatal else ("incomplete" if errors else "done")
            write_manifest(out, kind=kind, settings=settings, endpoints=args.endpoint, api_key_env=args.api_key_env,
                           transport=transport, status=status, stats=stats, started=started)
            s = stats.to_json()
            print(f"{stats.done + stats.failed:,} done ({stats.failed:,} failed) in {s['seconds']:.1f} s: "
                  f"{stats.requests:,} requests, {stats.retried:,} retries, {stats.prompt_tokens:,} prompt tokens "
                  f"-> {out}", file=sys.stderr)
            _print_summary(kind, summary)
            if stats.fatal:
                print(f"harness: error: {stats.fatal}", file=sys.stderr)
                return EXIT_FATAL
            if errors:
                print(f"{errors:,} item(s) failed; rerun with --retry-errors to ask them again", file=sys.stderr)
                return EXIT_UNANSWERED
            return EXIT_OK

    try:
        return asyncio.run(main())
    except FatalError as e:
        msg = str(e)
        if "chat template" in msg.lower() and "trust" in msg.lower():
            msg += " (--request raw sends the reference's prompt as the request's chat_template: start vLLM with --trust-request-chat-template)"
        print(f"harness: error: {msg}", file=sys.stderr)
        return EXIT_FATAL


def _dry_run(task, groups) -> int:
    from harness.engine.images import ImagePayload

    fake = ImagePayload("data:image/jpeg;base64,...", "uuid", 0, None)
    n = 0
    for g in groups:
        if n < 3:
            path, body = task.request(g, min(1, g.n - 1) if g.head else 0, fake if g.image else None)
            print(f"# {g.qid}  POST {path}" + (f"  ({g.n} requests in the group)" if g.n > 1 else ""))
            print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()[:4000])
        n += 1
    print(f"dry run: {n:,} items to ask")
    return EXIT_OK


def _fmt_acc(a: dict) -> str:
    return f"{a['accuracy']:.2f} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] ({a['correct']:,}/{a['n']:,})"


def _print_summary(kind: str, s: dict) -> None:
    p = print
    if kind == "generation":
        p(f"n {s['n']:,}  errors {s['n_errors']:,}")
        for k in ("substring", "exact", "corrected"):
            p(f"  {k:<10} {_fmt_acc(s[k])}")
        p(f"  corrected verdicts: {s['corrected_status']}")
        if "mapping" in s:
            m = s["mapping"]
            p(f"  label-set mapping ({m['mapper'] or 'no mapper'}, direct: {m['direct_rule']}): {m['how']}; "
              f"needed mapping {m['needed_mapping']:,}")
            p(f"  macro P {m['precision']:.4f}  R {m['recall']:.4f}  F1 {m['f1']:.4f}  accuracy {m['accuracy']:.4f}")
    elif kind == "loglik":
        p(f"n {s['n']:,} images x {s['n_classes']:,} classes  errors {s['n_errors']:,}  "
          f"misaligned {s.get('misaligned', 0):,}")
        for k in ("sum", "mean"):
            if k in s:
                p(f"  {k:<5} top-1 {s[k]['top1']:.2f}  top-5 {s[k]['top5']:.2f}")
        for k in ("sum_calibrated", "mean_calibrated", "sum_prior", "mean_prior"):
            if k in s:
                best = max(s[k].items(), key=lambda kv: kv[1]["top1"])
                p(f"  {k:<16} best alpha {best[0]}: top-1 {best[1]['top1']:.2f}  top-5 {best[1]['top5']:.2f}")
        if "cost_per_image" in s:
            c = s["cost_per_image"]
            p(f"  per image: {c['requests']:,.0f} requests here vs {c['reference_forwards']:,} forwards in the reference loop")
    elif kind == "wikiqa":
        p(f"n {s['n']:,}  errors {s['n_errors']:,}")
        r, b = s["reference"], s["robust"]
        p(f"  reference (MMMU) {_fmt_acc(r)}  random guesses {r['random_guesses']:,} ({r['random_right']:,} right)")
        p(f"  robust           {_fmt_acc(b)}  unparsed {b['unparsed']:,}")


# ---------------------------------------------------------------- commands

def _load_data(args):
    from harness.classification.datasets import load_classes, read_class_items, resolve

    ds = resolve(args.dataset, args.data, args.classes, args.split)
    classes = load_classes(ds.classes, first_synonym=args.first_synonym)
    items = read_class_items(ds.data, classes, split=ds.split, root_map=args.image_root_map,
                             first_synonym=args.first_synonym)  # type: ignore[arg-type]
    return ds, classes, items


def _parse_k(k: str | None, n_unique: int, n_all: int, task: str, order: str, protocol: str) -> int | None:
    if task == "open":
        if k is not None:
            raise ValueError("--k applies to --task closed / nway")
        return None
    if k is None or k == "all":
        return n_all if order == "fixed" and protocol == "reference" else n_unique
    try:
        return int(k)
    except ValueError:
        raise ValueError(f"--k must be an integer or `all`, got {k!r}") from None


def cmd_run(args) -> int:
    from harness.classification import generation as G
    from harness.classification.datasets import unique
    from harness.classification.prompts import catalogue, catalogue_hash

    ds, classes, items = _load_data(args)
    k = _parse_k(args.k, len(unique(classes)), len(classes), args.task, args.order, args.protocol)
    stream = "reference" if args.protocol == "reference" else "hashed"
    gcat = catalogue()["nway" if args.task == "nway" else "generation"]
    default_max = catalogue()["generation"]["max_tokens_cot"] if args.cot else gcat["max_tokens"]

    def make(model: str):
        style = _style(args, model, default_max)
        settings = {"model": model, "task": args.task, "dataset": ds.name, "data": str(ds.data),
                    "data_sha256": _sha(ds.data), "classes": str(ds.classes), "classes_sha256": _sha(ds.classes),
                    "split": ds.split, "k": k, "order": args.order, "protocol": args.protocol, "stream": stream,
                    "seed": args.seed, "wording": args.wording, "cot": args.cot, "request": args.request,
                    "template": args.template, "text_first": args.text_first, "max_tokens": style.max_tokens,
                    "temperature": style.temperature, "limit": args.limit, "first_synonym": args.first_synonym,
                    "catalogue_sha256": catalogue_hash()}
        task = G.GenerationTask(style, cot=args.cot, n_classes=len(unique(classes)))

        def groups(done: set[str]):
            qs = G.questions(items, classes, task=args.task, k=k, fixed_order=args.order == "fixed",
                             stream=stream, seed=args.seed, wording=args.wording)
            for q in islice(qs, args.limit):  # the whole stream is walked: the reference RNG stays in step
                g = task.group(q)
                if g.qid not in done:
                    yield g

        def summarize(path):
            return G.score_run(G.latest_records(path), classes)

        return settings, task, groups, summarize

    return _execute(args, kind="generation", make=make)


def cmd_loglik(args) -> int:
    from harness.classification import loglik as L
    from harness.classification.datasets import unique
    from harness.classification.generation import latest_records, qid_of
    from harness.classification.prompts import catalogue, catalogue_hash, raw_template, reference_order

    ds, classes, items = _load_data(args)
    uniq = unique(classes)
    cat = catalogue()["loglik"]
    template = raw_template(args.template) if args.template else None
    if args.request == "raw" and template is None:
        raise ValueError("--request raw needs --template (llava15, llava16-mistral, llava16-vicuna, blip2)")
    question = args.question or cat["question"]
    prefix = args.prefix or (template.loglik_default_prefix if template and template.loglik_default_prefix
                             and args.request == "raw" else cat["prefix"])

    def make(model: str):
        style = L.LoglikStyle(model=model, question=question, prefix=prefix, request=args.request, template=template,
                              text_first=args.text_first)
        settings = {"model": model, "dataset": ds.name, "data": str(ds.data), "data_sha256": _sha(ds.data),
                    "classes": str(ds.classes), "classes_sha256": _sha(ds.classes), "split": ds.split,
                    "question": question, "prefix": prefix, "method": args.method, "request": args.request,
                    "template": args.template,
                    "text_first": args.text_first, "seed": args.seed, "limit": args.limit,
                    "first_synonym": args.first_synonym, "catalogue_sha256": catalogue_hash()}
        task = L.LoglikTask(style, uniq, args.method)

        def groups(done: set[str]):
            if args.prior and L.PRIOR_QID not in done:
                yield task.group(L.PRIOR_QID, None, {"item": None, "label": None})
            order, _ = reference_order(items, args.seed)
            for it in islice(order, args.limit):
                qid = qid_of(it)
                if qid not in done:
                    yield task.group(qid, it.image, {"item": it.key, "line": it.line, "label": it.label})

        def summarize(path):
            return L.score_run(latest_records(path), uniq)

        return settings, task, groups, summarize

    return _execute(args, kind="loglik", make=make, group_workers=args.group_workers)


def cmd_wikiqa(args) -> int:
    from harness.classification import wikiqa as W
    from harness.classification.datasets import data_dir, read_wikiqa
    from harness.classification.generation import latest_records
    from harness.classification.prompts import catalogue, catalogue_hash

    data = Path(args.data) if args.data else data_dir() / "imagewikiqa.jsonl"
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such file")
    items = list(read_wikiqa(data, root_map=args.image_root_map))

    def make(model: str):
        style = _style(args, model, catalogue()["wikiqa"]["max_tokens"])
        settings = {"model": model, "data": str(data), "data_sha256": _sha(data), "cot": args.cot,
                    "control": args.control, "request": args.request, "template": args.template,
                    "text_first": args.text_first, "max_tokens": style.max_tokens, "temperature": style.temperature,
                    "limit": args.limit, "catalogue_sha256": catalogue_hash()}
        task = W.WikiQATask(style, cot=args.cot, control=args.control)

        def groups(done: set[str]):
            for it in islice(items, args.limit):
                g = task.group(it)
                if g.qid not in done:
                    yield g

        def summarize(path):
            return W.score_run(latest_records(path))

        return settings, task, groups, summarize

    return _execute(args, kind="wikiqa", make=make)


def _run_classes(manifest: dict, first_synonym: bool | None = None) -> list[str]:
    from harness.classification.datasets import load_classes

    st = manifest["settings"]
    return load_classes(st["classes"], first_synonym=st.get("first_synonym", False) if first_synonym is None else first_synonym)


def score_folder(run: str | Path, *, synonyms: str | None = None, mapper=None, direct: str = "contained") -> tuple[str, dict]:
    """(kind, metrics) of a run folder."""
    from harness.classification import generation as G
    from harness.classification import loglik as L
    from harness.classification import wikiqa as W
    from harness.classification.datasets import unique
    from harness.classification.loop import read_manifest
    from harness.classification.scoring import load_synonyms

    m = read_manifest(run)
    kind = m.get("kind")
    results = Path(run) / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"{results}: no results")
    records = G.latest_records(results)
    if kind == "generation":
        classes = _run_classes(m)
        syn = load_synonyms(synonyms, classes) if synonyms else None
        return kind, G.score_run(records, classes, synonyms=syn, mapper=mapper, direct_rule=direct)
    if kind == "loglik":
        return kind, L.score_run(records, unique(_run_classes(m)))
    if kind == "wikiqa":
        return kind, W.score_run(records)
    raise ValueError(f"{run}/run.json: unknown run kind {kind!r}")


def cmd_score(args) -> int:
    mapper = None
    if args.map != "none":
        from harness.classification.mapping import load_mapper

        mapper = load_mapper(args.map, args.map_model, args.device)
    results = []
    for run in args.runs:
        kind, s = score_folder(run, synonyms=args.synonyms, mapper=mapper, direct=args.direct)
        results.append({"run": str(run), "kind": kind} | s)
        if not args.json:
            print(f"== {run} ({kind})")
            _print_summary(kind, s)
    if args.json:
        sys.stdout.write(orjson.dumps(results[0] if len(results) == 1 else results,
                                      option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    return EXIT_OK


def cmd_freq(args) -> int:
    from harness.classification import frequency as F
    from harness.classification.generation import latest_records

    per_class = None
    classes: list[str] | None = None
    if args.run:
        from harness.classification.loop import read_manifest

        m = read_manifest(args.run)
        classes = _run_classes(m)
        records = latest_records(Path(args.run) / "results.jsonl")
        if m.get("kind") == "generation":
            from harness.classification.generation import score_run

            per_class = score_run(records, classes, per_class_scorer=args.scorer)["per_class"]
        elif m.get("kind") == "loglik":
            per_class = _loglik_per_class(records, list(dict.fromkeys(classes)))
        else:
            raise ValueError(f"{args.run}: per-class accuracy needs a generation or loglik run, not {m.get('kind')!r}")
    if args.classes:
        from harness.classification.datasets import load_classes

        classes = load_classes(args.classes)
    if classes is None:
        raise ValueError("give --run (per-class accuracy and its classes) or --classes")
    tok = F.get_tokenizer(args.tokenizer)
    counts: dict[str, int] = {}
    for corpus in args.corpus:
        for c, v in F.count_classes(F.read_corpus(corpus, args.field), classes, tok).items():
            counts[c] = counts.get(c, 0) + v
    out: dict = {"counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "tokenizer": args.tokenizer}
    top = list(out["counts"].items())[:10]
    print(f"{len(counts):,} classes; most frequent: " + ", ".join(f"{c} {n:,}" for c, n in top))
    if per_class is not None:
        out["correlation"] = F.correlate(counts, per_class)
        out["bins"] = F.binned(counts, per_class)
        cr = out["correlation"]
        if cr["spearman"] is not None:
            print(f"Spearman {cr['spearman']:.3f} (p {cr['spearman_p']:.2g})  Pearson {cr['pearson']:.3f} "
                  f"(p {cr['pearson_p']:.2g}) over {cr['n_classes']:,} classes")
        else:
            print(f"correlation undefined ({cr['n_classes']} classes, constant counts or accuracies)")
        for b in out["bins"]:
            if b["n_classes"]:
                print(f"  [{b['lo']}, {b['hi']}): {b['n_classes']:,} classes, accuracy {b['accuracy']:.3f}")
        if args.plot:
            print(f"plot -> {F.plot(out['bins'], args.plot, title=str(args.run))}")
    elif args.plot:
        raise ValueError("--plot needs --run (per-class accuracy)")
    if args.out:
        Path(args.out).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    return EXIT_OK


def _loglik_per_class(records: list[dict], classes: list[str]) -> dict[str, float]:
    """Per-class top-1 accuracy of the mean score (the reference's main log-likelihood score)."""
    import numpy as np

    from harness.classification.metrics import per_class_accuracy

    labels, hits = [], []
    for r in records:
        if r.get("qid") == "prior" or r.get("lp") is None:
            continue
        means = np.array([sum(t) / len(t) for t in r["lp"]])
        labels.append(r["label"])
        hits.append(classes[int(np.argmax(means))] == r["label"])
    return per_class_accuracy(labels, hits)
