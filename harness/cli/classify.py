"""`harness classify ...`: VLMs as image classifiers (classification-protocol.md).

    harness classify run     generation: open world, closed world (K labels), N-way (thesis prompt)
    harness classify loglik  log-likelihood of every class name (vLLM prompt_logprobs)
    harness classify wikiqa  ImageWikiQA (with/without CoT; class-name and no-image controls)
    harness classify score   metrics of a run folder (scorers, synonyms, NLI / embedding mapping)
    harness classify freq    class-name frequency in a text corpus vs per-class accuracy (+ PNG)

Run folders hold results.jsonl (append-only, resumable), run.json (the RunSpec and its settings, no
secrets) and summary.json. Running the same command again resumes. The run commands only turn their
arguments into a RunSpec (task kind classify / loglik / wikiqa) and run it with harness.runs.execute;
score and freq call harness.runs.classification.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from harness.runs.execute import execute
from harness.runs.spec import ClassifyTask, EndpointBackend, LoglikTask, RunSpec, WikiQATask

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
    g.add_argument("--shard", metavar="I/N", help="ask only shard I of N (by a hash of the item); N jobs share --out")
    g.add_argument("--retry-errors", action="store_true", help="ask again what failed before")
    g.add_argument("--force", action="store_true", help="resume even if run.json settings differ")
    g.add_argument("--dry-run", action="store_true", help="print the first requests (images elided); send nothing")
    g.add_argument("--quiet", action="store_true", help="no progress display")


def _style_args(p: argparse.ArgumentParser, *, max_tokens: bool = True) -> None:
    g = p.add_argument_group("request")
    g.add_argument("--request", choices=["chat", "raw"], default="chat",
                   help="chat: the model's chat template; raw: the reference's raw prompt (--template)")
    g.add_argument("--template", help="raw template: llava15, llava16-mistral, llava16-vicuna, blip2")
    g.add_argument("--text-first", action="store_true", help="text before the image (the reference's API order)")
    if max_tokens:
        g.add_argument("--max-tokens", type=int)
        g.add_argument("--temperature", type=float, default=None)


def _field_help(p: argparse.ArgumentParser, task) -> None:
    """Flags without help: the description of their field (the task's first: `--seed` is the task's)."""
    from harness.cli.spec_help import help_from_fields

    help_from_fields(p, task, RunSpec, EndpointBackend)


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
    g.add_argument("--preset", choices=["reference-api"], default=None)
    _style_args(r)
    _transport(r)
    _field_help(r, ClassifyTask)
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
    g.add_argument("--protocol", choices=["reference", "robust"], default="robust")
    _style_args(ll, max_tokens=False)
    _transport(ll)
    _field_help(ll, LoglikTask)
    ll.set_defaults(func=cmd_loglik)

    w = cs.add_parser("wikiqa", help="ImageWikiQA (2,000 four-choice knowledge questions)", formatter_class=fmt)
    w.add_argument("--data", help="default: the shipped data/classification/imagewikiqa.jsonl")
    w.add_argument("--cot", action="store_true", help="append \"Let's think step by step.\"")
    w.add_argument("--control", choices=["none", "classname", "noimage"], default="none",
                   help="classname: 'this object' -> the class name, text only; noimage: the question without the image")
    w.add_argument("--protocol", choices=["reference", "robust"], default="robust")
    w.add_argument("--preset", choices=["reference-api"], default=None)
    _style_args(w)
    _transport(w)
    _field_help(w, WikiQATask)
    w.set_defaults(func=cmd_wikiqa)

    s = cs.add_parser("score", help="metrics of classify run folders", formatter_class=fmt)
    s.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="classify, loglik or wikiqa run folders (each scored and printed in turn)")
    s.add_argument("--synonyms", help="JSON {class: [synonyms]} or JSONL {class, synonyms}: extra names for the scorers")
    s.add_argument("--map", choices=["none", "nli", "embedding"], default="none",
                   help="map answers that are not a candidate into the label set (closed / N-way runs)")
    s.add_argument("--map-model", help="default: facebook/bart-large-mnli (nli), sentence-transformers/all-MiniLM-L6-v2 (embedding)")
    s.add_argument("--direct", choices=["none", "exact", "contained"], default="contained",
                   help="answers taken without mapping: exact = the answer is a candidate; contained = names exactly one")
    s.add_argument("--device", help="torch device of the mapper (cpu, cuda, ...)")
    s.add_argument("--json", action="store_true", help="print the metrics as JSON (one object, a list for several runs)")
    s.set_defaults(func=cmd_score)

    f = cs.add_parser("freq", help="class-name frequency in a corpus vs per-class accuracy", formatter_class=fmt)
    f.add_argument("--corpus", required=True, action="append", help="JSONL of texts (repeat: counts add up)")
    f.add_argument("--field", default="text", help="text field of corpus objects (string or list of strings)")
    f.add_argument("--run", help="a classify run folder: per-class accuracy from it (generation or loglik)")
    f.add_argument("--classes", help="class list JSON (default: the run's)")
    f.add_argument("--scorer", choices=["substring", "exact", "corrected"], default="substring",
                   help="per-class accuracy of generation runs (the reference: substring)")
    f.add_argument("--tokenizer", choices=["treebank", "nltk", "split"], default="treebank",
                   help="how texts and class names are tokenized for matching: treebank (NLTK's Treebank rules, "
                        "restated in the package; the reference), nltk (NLTK itself, needs nltk), split (whitespace)")
    f.add_argument("--out", help="write counts, correlations and bins as JSON here")
    f.add_argument("--plot", help="write the binned accuracy plot (PNG) here")
    f.set_defaults(func=cmd_freq)


# ---------------------------------------------------------------- arguments -> RunSpec

_TRUST_HINT = (" (--request raw sends the reference's prompt as the request's chat_template: start vLLM with "
               "--trust-request-chat-template)")


def spec_from_args(args: argparse.Namespace, task: dict) -> RunSpec:
    """The RunSpec of a `harness classify run|loglik|wikiqa` command line."""
    backend = {"kind": "openai", "endpoints": args.endpoint, "api_key_env": args.api_key_env,
               "concurrency": args.concurrency, "rps": args.rps, "timeout": args.timeout,
               "max_retries": args.max_retries}
    style = {"request": args.request, "template": args.template, "text_first": args.text_first}
    fields = {"out": args.out, "data": args.data, "model": args.model, "backend": backend, "task": task | style,
              "max_tokens": getattr(args, "max_tokens", None), "temperature": getattr(args, "temperature", None),
              "limit": args.limit, "image_root_map": args.image_root_map, "media": args.media,
              "max_side": args.max_side, "retry_errors": args.retry_errors, "force": args.force,
              "shard": args.shard}
    return RunSpec.model_validate(fields)


def _data_fields(args) -> dict:
    return {"dataset": args.dataset, "classes": args.classes, "split": args.split, "first_synonym": args.first_synonym}


def _run(args, task: dict) -> int:
    from harness.cli.run import print_result
    from harness.cli.spec_errors import validated

    spec = validated(spec_from_args, args, task)
    r = execute(spec, dry_run=args.dry_run, progress=not args.quiet)
    if r.message and "chat template" in r.message.lower() and "trust" in r.message.lower():
        r.message += _TRUST_HINT
    return print_result(r)


def cmd_run(args) -> int:
    return _run(args, {"kind": "classify", **_data_fields(args), "task": args.task, "k": args.k,
                       "order": args.order, "wording": args.wording, "cot": args.cot, "protocol": args.protocol,
                       "seed": args.seed, "preset": args.preset})


def cmd_loglik(args) -> int:
    return _run(args, {"kind": "loglik", **_data_fields(args), "question": args.question, "prefix": args.prefix,
                       "prior": args.prior, "seed": args.seed, "method": args.method,
                       "group_workers": args.group_workers, "protocol": args.protocol})


def cmd_wikiqa(args) -> int:
    return _run(args, {"kind": "wikiqa", "cot": args.cot, "control": args.control, "protocol": args.protocol,
                       "preset": args.preset})


# ---------------------------------------------------------------- scoring commands

def cmd_score(args) -> int:
    from harness.runs.classification import score_folder, summary_lines

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
            print("\n".join(summary_lines(kind, s)))
    if args.json:
        sys.stdout.write(orjson.dumps(results[0] if len(results) == 1 else results,
                                      option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    return 0


def cmd_freq(args) -> int:
    from harness.classification import frequency as F

    per_class = None
    classes: list[str] | None = None
    if args.run:
        from harness.runs.classification import per_class as run_per_class

        classes, per_class = run_per_class(args.run, args.scorer)
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
    return 0
