"""OpenAI Batch API for large API runs: `harness batch submit` / `harness batch collect`.

The same questions, bodies and result lines as `harness run` (same settings, qids, parser), sent as
batch files (half price on OpenAI, 24 h window). Submit writes request files of at most 50,000 lines,
uploads them and creates batches, recording their ids in DIR/batches.json; collect downloads what has
finished and appends result lines, so both commands can be repeated: questions already answered or
waiting in a live batch are not sent again, and questions of a failed or expired batch are sent
again by the next submit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import aiohttp
import orjson

from harness.backends.http import FatalError, RetryableError, classify
from harness.engine.core import Decoding, Engine
from harness.engine.images import encode_image
from harness.data.items import ReadReport
from harness.runs.results import ResultStore, record
from harness.metrics.readers import summarize_results

MAX_LINES = 50_000  # OpenAI's per-batch request limit
MAX_BYTES = 190 * 1024 * 1024  # under the 200 MB file limit
LIVE = {"validating", "in_progress", "finalizing", "cancelling"}


def add_cli(sub) -> None:
    from harness.cli.run import add_run_arguments

    p = sub.add_parser("batch", help="OpenAI Batch API: submit a run as batch files, collect the answers")
    bsub = p.add_subparsers(dest="batch_command", metavar="SUBCOMMAND", required=True)
    s = bsub.add_parser("submit", help="render, upload and create batches (same options as `harness run`)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(s)
    s.set_defaults(func=cmd_submit)
    c = bsub.add_parser("collect", help="download finished batches into DIR/results.jsonl")
    c.add_argument("out", metavar="DIR")
    c.add_argument("--wait", action="store_true", help="poll until every batch has ended")
    c.add_argument("--poll", type=float, default=30.0, help="seconds between polls with --wait")
    c.add_argument("--api-key-env", default=None, help="default: the one recorded at submit")
    c.set_defaults(func=cmd_collect)


def _load_batches(out: Path) -> list[dict]:
    f = out / "batches.json"
    return orjson.loads(f.read_bytes()) if f.exists() else []


def _save_batches(out: Path, batches: list[dict]) -> None:
    tmp = out / "batches.json.tmp"
    tmp.write_bytes(orjson.dumps(batches, option=orjson.OPT_INDENT_2))
    os.replace(tmp, out / "batches.json")


async def _request(session: aiohttp.ClientSession, method: str, url: str, **kw) -> bytes:
    for attempt in range(6):
        try:
            async with session.request(method, url, **kw) as r:
                data = await r.read()
                if r.status == 200:
                    return data
                err = classify(r.status, data, r.headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            err = RetryableError(f"{type(e).__name__}")
        if isinstance(err, FatalError):
            raise err
        await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt))
    raise FatalError(f"{method} {url.split('?')[0]}: gave up after retries ({err})")


def _engine(settings, model: str) -> Engine:
    dec = Decoding(model=model, answer=settings.answer, max_tokens=settings.max_tokens,
                   temperature=settings.temperature, seed=settings.seed, top_logprobs=settings.top_logprobs,
                   parser=settings.parser)
    return Engine(client=None, store=None, prompt=settings.prompt, decoding=dec,  # type: ignore[arg-type]
                  media=settings.media, max_side=settings.max_side)


def _questions(args, settings, done: set[str]):
    from harness.cli.run import _work

    report = ReadReport()
    yield from _work(args, settings, done, report)


async def _submit(args) -> int:
    from harness.cli.run import build_settings, check_resume, write_manifest

    if not args.endpoint or not args.model:
        raise ValueError("batch submit needs --endpoint (e.g. https://api.openai.com/v1) and --model")
    out = Path(args.out)
    settings = build_settings(args, args.model)
    check_resume(out, settings, args.force)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / "results.jsonl")
    done, _ = store.scan(retry_errors=args.retry_errors)
    batches = _load_batches(out)
    pending = set()
    for b in batches:
        if not b.get("collected") and b.get("status") not in ("failed", "expired", "cancelled"):
            pending |= set(orjson.loads((out / b["request_file"]).with_suffix(".ids.json").read_bytes()))
    engine = _engine(settings, args.model)
    write_manifest(out, settings, args.endpoint, args, "batch-submitted", started=None)
    files: list[tuple[Path, list[str]]] = []
    buf: list[bytes] = []
    ids: list[str] = []
    size = 0
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def flush() -> None:
        nonlocal buf, ids, size
        if buf:
            (out / "batch").mkdir(exist_ok=True)
            f = out / "batch" / f"requests-{stamp}-{len(files):03d}.jsonl"
            k = 1
            while f.exists():  # two submits within the same second
                f = out / "batch" / f"requests-{stamp}-{len(files):03d}-{k}.jsonl"
                k += 1
            f.write_bytes(b"".join(buf))
            f.with_suffix(".ids.json").write_bytes(orjson.dumps(ids))
            files.append((f, ids))
        buf, ids, size = [], [], 0

    n_auto = 0
    with store:
        for item, qs in _questions(args, settings, done | pending):
            image = None
            for q in qs:
                if q.auto is not None:
                    store.append(record(q, letter=None, raw=None, error=None))
                    n_auto += 1
                    continue
                if q.image and image is None:
                    image = encode_image(item.image, media="base64", max_side=settings.max_side)
                line = orjson.dumps({"custom_id": q.qid, "method": "POST", "url": "/v1/chat/completions",
                                     "body": engine.body(q, image if q.image else None)}) + b"\n"
                if len(buf) >= MAX_LINES or size + len(line) > MAX_BYTES:
                    flush()
                buf.append(line)
                ids.append(q.qid)
                size += len(line)
        flush()
    if args.dry_run:
        print(f"batch dry run: {sum(len(i) for _, i in files):,} requests in {len(files)} file(s) under {out / 'batch'}; nothing uploaded")
        return 0
    key = os.environ.get(args.api_key_env)
    base = args.endpoint[0].rstrip("/")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for f, qids in files:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", f.read_bytes(), filename=f.name, content_type="application/jsonl")
            up = orjson.loads(await _request(session, "POST", f"{base}/files", data=form))
            created = orjson.loads(await _request(
                session, "POST", f"{base}/batches",
                data=orjson.dumps({"input_file_id": up["id"], "endpoint": "/v1/chat/completions",
                                   "completion_window": "24h", "metadata": {"harness_run": out.name}}),
                headers={"Content-Type": "application/json"}))
            batches.append({"id": created["id"], "input_file_id": up["id"], "request_file": str(f.relative_to(out)),
                            "n": len(qids), "status": created.get("status", "validating"), "collected": False,
                            "endpoint": base, "api_key_env": args.api_key_env})
            _save_batches(out, batches)
            print(f"batch {created['id']}: {len(qids):,} requests ({f.name})")
    print(f"{sum(len(i) for _, i in files):,} requests submitted in {len(files)} batch(es), {n_auto:,} auto-filled; "
          f"`harness batch collect {out}` downloads the answers")
    return 0


async def _collect(args) -> int:
    from harness.cli.run import RunSettings

    out = Path(args.out)
    manifest = orjson.loads((out / "run.json").read_bytes())
    settings = RunSettings(**manifest["settings"])
    batches = _load_batches(out)
    if not batches:
        raise FileNotFoundError(f"{out / 'batches.json'}: no batches submitted here")
    engine = _engine(settings, settings.model)
    env = args.api_key_env or batches[0].get("api_key_env") or "OPENAI_API_KEY"
    key = os.environ.get(env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    store = ResultStore(out / "results.jsonl")
    done, _ = store.scan(retry_errors=True)  # answered ones; a failed line may be answered by a later batch
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        while True:
            for b in batches:
                if b.get("collected") or b["status"] in ("failed", "expired", "cancelled"):
                    continue
                info = orjson.loads(await _request(session, "GET", f"{b['endpoint']}/batches/{b['id']}"))
                b["status"] = info.get("status", b["status"])
                b["request_counts"] = info.get("request_counts")
                if b["status"] != "completed":
                    continue
                answers: dict[str, dict] = {}
                for fid in (info.get("output_file_id"), info.get("error_file_id")):
                    if fid:
                        data = await _request(session, "GET", f"{b['endpoint']}/files/{fid}/content")
                        for line in data.splitlines():
                            if line.strip():
                                rec = orjson.loads(line)
                                answers[rec["custom_id"]] = rec
                wanted = set(orjson.loads((out / b["request_file"]).with_suffix(".ids.json").read_bytes()))
                with store:
                    for _, qs in _questions(argparse.Namespace(**_run_args(out, settings)), settings, done):
                        for q in qs:
                            if q.qid not in wanted or q.qid in done:
                                continue
                            store.append(_answer_record(engine, q, answers.get(q.qid)))
                            done.add(q.qid)
                b["collected"] = True
                _save_batches(out, batches)
                print(f"batch {b['id']}: collected {len(answers):,} of {b['n']:,}")
            _save_batches(out, batches)
            live = [b for b in batches if not b.get("collected") and b["status"] in LIVE]
            if not live or not args.wait:
                break
            await asyncio.sleep(args.poll)
    if (out / "results.jsonl").exists():
        s = summarize_results(out / "results.jsonl")
        (out / "summary.json").write_bytes(orjson.dumps(s.to_json(), option=orjson.OPT_INDENT_2))
    states = {b["id"]: ("collected" if b.get("collected") else b["status"]) for b in batches}
    print("batches: " + ", ".join(f"{k} {v}" for k, v in states.items()))
    return 0 if all(v == "collected" for v in states.values()) else 3


def _answer_record(engine: Engine, q, rec: dict | None) -> dict:
    if rec is None:
        return record(q, letter=None, raw=None, error="batch: no answer in the output file")
    resp = rec.get("response") or {}
    if rec.get("error") or resp.get("status_code") != 200:
        err = rec.get("error") or (resp.get("body") or {}).get("error") or resp.get("status_code")
        return record(q, letter=None, raw=None, error=f"batch: {str(err)[:200]}")
    try:
        ans = engine.interpret(q, resp["body"])
    except (RetryableError, FatalError) as e:
        return record(q, letter=None, raw=None, error=f"batch: {e}")
    letter, raw = ans.pop("letter"), ans.pop("raw")
    return record(q, letter=letter, raw=raw, error=None, batch=True, **ans)


def _run_args(out: Path, settings) -> dict:
    """What `_work` reads to re-render the questions (qids do not depend on where images live)."""
    return {"data": settings.data, "limit": settings.limit, "image_root_map": [], "strict": False}


def cmd_submit(args) -> int:
    try:
        return asyncio.run(_submit(args))
    except FatalError as e:
        print(f"harness: error: {e}")
        return 4


def cmd_collect(args) -> int:
    try:
        return asyncio.run(_collect(args))
    except FatalError as e:
        print(f"harness: error: {e}")
        return 4


