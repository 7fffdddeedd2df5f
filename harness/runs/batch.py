"""OpenAI Batch API for large API runs: `harness batch submit` / `harness batch collect`.

The same questions, bodies and result lines as `harness run` (same settings, qids, parser), sent as
batch files (half price on OpenAI, 24 h window). Submit writes request files of at most 50,000 lines,
uploads them and creates batches, recording their ids in DIR/batches.json; collect downloads what has
finished and appends result lines, so both commands can be repeated: questions already answered or
waiting in a live batch are not sent again, and questions of a failed or expired batch are sent
again by the next submit.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import orjson

from harness.backends.http import FatalError, RetryableError, classify
from harness.backends.images import encode_image
from harness.engine.core import Group
from harness.runs.folder import RunFolder, now
from harness.runs.hierarchy import HierarchyExperiment
from harness.runs.spec import EndpointBackend, RunSpec
from harness.tasks.hierarchy import record

MAX_LINES = 50_000  # OpenAI's per-batch request limit
MAX_BYTES = 190 * 1024 * 1024  # under the 200 MB file limit
LIVE = {"validating", "in_progress", "finalizing", "cancelling"}


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
        except (TimeoutError, aiohttp.ClientError) as e:
            err = RetryableError(f"{type(e).__name__}")
        if isinstance(err, FatalError):
            raise err
        await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt))
    raise FatalError(f"{method} {url.split('?')[0]}: gave up after retries ({err})")


async def submit(spec: RunSpec, *, dry_run: bool = False) -> int:
    """Render the spec's questions into batch files, upload them and create batches (repeatable), as
    the run folder's one writer (its lock, as `harness run` takes it)."""
    if spec.shard is not None:
        raise ValueError("--shard: a Batch API run is not sharded (the provider runs the batches)")
    folder = RunFolder(spec.out)
    folder.prepare()
    with folder.lock():
        return await _submit(spec, dry_run=dry_run)


async def _submit(spec: RunSpec, *, dry_run: bool = False) -> int:
    """Render the spec's questions into batch files, upload them and create batches (repeatable)."""
    backend = spec.backend
    if not isinstance(backend, EndpointBackend) or not backend.endpoints or not spec.model:
        raise ValueError("batch submit needs --endpoint (e.g. https://api.openai.com/v1) and --model")
    folder = RunFolder(spec.out)
    out = folder.path
    exp = HierarchyExperiment(spec, spec.model)
    folder.check(exp.kind, exp.settings, spec.force)
    folder.prepare()
    store = folder.store()
    done = folder.done(spec.retry_errors)
    batches = _load_batches(out)
    pending = set()
    for b in batches:
        if not b.get("collected") and b.get("status") not in ("failed", "expired", "cancelled"):
            pending |= set(orjson.loads((out / b["request_file"]).with_suffix(".ids.json").read_bytes()))
    folder.write_manifest(kind=exp.kind, spec=spec, settings=exp.settings, status="batch-submitted", started=now())
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
        for item, qs in exp.work(done | pending):
            image = None
            for q in qs:
                if q.auto is not None:
                    store.append(record(q, letter=None, raw=None, error=None))
                    n_auto += 1
                    continue
                if q.image and image is None:
                    image = encode_image(item.image, media="base64", max_side=spec.max_side)
                line = orjson.dumps({"custom_id": q.qid, "method": "POST", "url": "/v1/chat/completions",
                                     "body": exp.task.body(q, image if q.image else None)}) + b"\n"
                if len(buf) >= MAX_LINES or size + len(line) > MAX_BYTES:
                    flush()
                buf.append(line)
                ids.append(q.qid)
                size += len(line)
        flush()
    if dry_run:
        print(f"batch dry run: {sum(len(i) for _, i in files):,} requests in {len(files)} file(s) under {out / 'batch'}; nothing uploaded")
        return 0
    key = os.environ.get(backend.api_key_env)
    base = backend.endpoints[0].rstrip("/")
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
                            "endpoint": base, "api_key_env": backend.api_key_env})
            _save_batches(out, batches)
            print(f"batch {created['id']}: {len(qids):,} requests ({f.name})")
    print(f"{sum(len(i) for _, i in files):,} requests submitted in {len(files)} batch(es), {n_auto:,} auto-filled; "
          f"`harness batch collect {out}` downloads the answers")
    return 0


async def collect(out: str | Path, *, wait: bool = False, poll: float = 30.0, api_key_env: str | None = None) -> int:
    """Download finished batches into results.jsonl (repeatable), as the folder's one writer."""
    folder = RunFolder(out)
    if not folder.path.is_dir():
        raise FileNotFoundError(f"{folder.path}: no such run folder")
    with folder.lock():
        return await _collect(out, wait=wait, poll=poll, api_key_env=api_key_env)


async def _collect(out: str | Path, *, wait: bool = False, poll: float = 30.0, api_key_env: str | None = None) -> int:
    """Download finished batches into results.jsonl (repeatable); 0 when every batch is collected."""
    folder = RunFolder(out)
    out = folder.path
    manifest = folder.read_manifest()
    if manifest is None or "spec" not in manifest:
        raise FileNotFoundError(f"{folder.manifest_path}: no run submitted here")
    # qids do not depend on where images live: re-render without the image mapping
    spec = RunSpec.model_validate(manifest["spec"]).model_copy(update={"image_root_map": [], "strict": False})
    batches = _load_batches(out)
    if not batches:
        raise FileNotFoundError(f"{out / 'batches.json'}: no batches submitted here")
    exp = HierarchyExperiment(spec, manifest["settings"]["model"])
    env = api_key_env or batches[0].get("api_key_env") or "OPENAI_API_KEY"
    key = os.environ.get(env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    store = folder.store()
    done = folder.done(retry_errors=True)  # answered ones; a failed line may be answered by a later batch
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
                    for _, qs in exp.work(done):
                        for q in qs:
                            if q.qid not in wanted or q.qid in done:
                                continue
                            store.append(_answer_record(exp.task, q, answers.get(q.qid)))
                            done.add(q.qid)
                b["collected"] = True
                _save_batches(out, batches)
                print(f"batch {b['id']}: collected {len(answers):,} of {b['n']:,}")
            _save_batches(out, batches)
            live = [b for b in batches if not b.get("collected") and b["status"] in LIVE]
            if not live or not wait:
                break
            await asyncio.sleep(poll)
    if folder.results.exists():
        folder.write_summary(exp.summarize(folder.results))
    states = {b["id"]: ("collected" if b.get("collected") else b["status"]) for b in batches}
    print("batches: " + ", ".join(f"{k} {v}" for k, v in states.items()))
    return 0 if all(v == "collected" for v in states.values()) else 3


def _answer_record(task, q, rec: dict | None) -> dict:
    if rec is None:
        return record(q, letter=None, raw=None, error="batch: no answer in the output file")
    resp = rec.get("response") or {}
    if rec.get("error") or resp.get("status_code") != 200:
        err = rec.get("error") or (resp.get("body") or {}).get("error") or resp.get("status_code")
        return record(q, letter=None, raw=None, error=f"batch: {str(err)[:200]}")
    try:
        ans = task.interpret(Group(q.qid, 1, q), 0, resp["body"])
    except (RetryableError, FatalError) as e:
        return record(q, letter=None, raw=None, error=f"batch: {e}")
    letter, raw = ans.pop("letter"), ans.pop("raw")
    return record(q, letter=letter, raw=raw, error=None, batch=True, **ans)
