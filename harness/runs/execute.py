"""The one run lifecycle: RunSpec -> backend -> settings -> folder check -> engine -> summary -> manifest.

Every run kind (hierarchy image/text/binary over endpoints or CLIP, classification, log-likelihood,
ImageWikiQA) goes through :func:`execute`; they differ only in their *experiment* (settings, units,
task, summary), built by :func:`experiment_for`.

Around every kind, once: the folder lock (a second writer refuses, exit 6), `shard` (only the units
whose item hashes to shard I of N are asked; the folder's other results files count as done), and
SIGTERM / SIGINT (the engine stops taking new work, the answers in flight are written, run.json says
`interrupted`, exit 7; a second signal stops without waiting for the answers in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.backends.http import Client, FatalError, RetryPolicy, endpoint_concurrency, redact_url
from harness.data.items import ItemError
from harness.engine.core import Engine, Unit
from harness.engine.progress import Progress
from harness.runs.experiments import experiment_for
from harness.runs.folder import ExitCode, FolderLock, RunFolder, RunLocked, command_line, now
from harness.runs.preflight import Preflight, preflight
from harness.runs.report import completeness, run_status
from harness.runs.spec import ClipBackend, EndpointBackend, HierarchyTask, RunSpec, parse_shard


@dataclass
class RunResult:
    """What `harness.run` returns."""

    out: Path
    status: str  # done, incomplete, stopped, interrupted, unavailable, fatal, locked, dry-run
    exit_code: ExitCode
    summary: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    message: str | None = None  # why the run stopped, when it did
    lines: list[str] = field(default_factory=list)  # what the run reported, for a console


def item_key(unit: Unit) -> str:
    """The item a unit asks about, what `--shard` hashes: the unit's key (the item id of hierarchy and
    CLIP questions, the image key as written in the file of classification items), never a line number,
    so an item keeps its shard when the file grows."""
    if unit.key is not None:
        return str(unit.key)
    return unit.groups[0].qid if unit.groups else ""  # the image-free log-likelihood prior: its qid


def shard_of(key: str, n: int) -> int:
    """The shard (0..n-1) of an item key: a stable hash (blake2b), the same on every machine and run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % n


def shard_units(units: Iterable[Unit], shard: tuple[int, int]) -> Iterator[Unit]:
    i, n = shard
    return (u for u in units if shard_of(item_key(u), n) == i)


def _check_inputs(spec: RunSpec) -> None:
    """Input errors before anything starts (a server, a model load): one line naming the flag."""
    if spec.data is not None:
        p = Path(spec.data)
        if not p.exists():
            raise FileNotFoundError(f"--data {p}: no such file")
        if not p.is_file():
            raise ValueError(f"--data {p}: not a file")
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")


def _backend(spec: RunSpec, endpoints: list[str]):
    b = spec.backend
    if isinstance(b, ClipBackend):
        from harness.backends.clip import ClipScorer

        return ClipScorer(spec.model or "", device=b.device, dtype=b.dtype, batch_size=b.batch_size,
                          workers=b.workers, text_batch=b.text_batch)
    assert isinstance(b, EndpointBackend)
    api_key = os.environ.get(b.api_key_env) or None
    total = sum(endpoint_concurrency(u, b.concurrency) for u in endpoints)
    return Client(endpoints, api_key, timeout=b.timeout, connections=max(64, total * 2),
                  key_env=b.api_key_env,  # messages name the variable, never the key
                  concurrency=b.concurrency, unavailable_after=b.unavailable_after)


async def resolve_model(backend, model: str | None) -> str:
    """Health-check the backend; the served model when `model` is omitted and there is just one."""
    served = await backend.health()
    if model:
        if served and model not in served:
            raise FatalError(f"model {model!r} is not served here; the endpoint serves: {', '.join(served)}")
        return model
    if len(served) == 1:
        return served[0]
    raise FatalError(f"--model is required: the endpoint serves {len(served)} models "
                     f"({', '.join(served) or 'none listed'})")


def _redacted(spec: RunSpec) -> RunSpec:
    """The spec as recorded: endpoint credentials (user:pass@host) cut out of the URLs."""
    if isinstance(spec.backend, EndpointBackend) and spec.backend.endpoints:
        b = spec.backend.model_copy(update={"endpoints": [redact_url(u) for u in spec.backend.endpoints]})
        return spec.model_copy(update={"backend": b})
    return spec


def _install_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[int], None]) -> list[tuple[int, Any]]:
    """SIGTERM and SIGINT -> handler(signum) on the loop (main thread only); the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return []
    out = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, handler, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        out.append((sig, prev))
    return out


def _remove_signals(loop: asyncio.AbstractEventLoop, installed: list[tuple[int, Any]]) -> None:
    for sig, prev in installed:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(TypeError, ValueError):
            signal.signal(sig, prev)  # what the caller had (asyncio would leave the default)


def _preflight(spec: RunSpec, model: str, done: set[str], *, count: bool = True) -> Preflight | None:
    """Count the work left and sample the images on a separate experiment (a seeded stream is not
    consumed); None for kinds whose questions need the server first (log-likelihood tries).
    `count=False`: the image sample only (before a server is started or an endpoint asked)."""
    exp = experiment_for(spec, model)
    if getattr(exp, "kind", None) == "loglik":
        return None
    units = exp.units(done)
    if spec.shard is not None:
        units = shard_units(units, parse_shard(spec.shard))
    source = None if spec.data else f"--dataset {getattr(spec.task, 'dataset', None)}"
    return preflight(exp, done, units=units, root_map=spec.image_root_map, data=spec.data, source=source,
                     count=count)


def _dry_run(spec: RunSpec, folder: RunFolder) -> RunResult:
    """What a run would do, with no server, model or connection: counts, cost, one rendered request."""
    from harness.runs.show import sample_request

    model = spec.model or "(the served model)"
    exp = experiment_for(spec, model)
    done = folder.done(repair=False)  # another process may be writing: read only
    lines: list[str] = []
    code = ExitCode.OK
    try:
        pf = _preflight(spec, model, done)
        if pf is not None:
            lines += pf.lines
    except ValueError as e:
        lines.append(f"error: {e}")
        code = ExitCode.INPUT
    lines += exp.dry_run(done)
    lines += sample_request(exp, done, spec)
    lines += [f"invalid input: {e}" for e in exp.report.errors[:20]]
    return RunResult(folder.path, "dry-run", ExitCode.INPUT if exp.report.errors else code, lines=lines)


async def _execute(spec: RunSpec, endpoints: list[str], *, dry_run: bool, progress: bool,
                   on_engine: Callable[[Engine], Any] | None, lock: FolderLock | None = None,
                   on_line: Callable[[str], Any] | None = None) -> RunResult:
    folder = RunFolder(spec.out, spec.shard)
    if dry_run:
        if endpoints and not spec.model and isinstance(spec.backend, EndpointBackend):
            async with _backend(spec, endpoints) as b:  # the served model's name (GET /v1/models, no question)
                spec = spec.model_copy(update={"model": await resolve_model(b, None)})
        return _dry_run(spec, folder)
    backend = _backend(spec, endpoints)
    if isinstance(spec.backend, EndpointBackend) and isinstance(spec.task, HierarchyTask) \
            and spec.task.answer == "choice" and any("api.openai.com" in e for e in endpoints):
        raise FatalError("`--answer choice` needs vLLM's structured_outputs, which the OpenAI API does not have; "
                         "use `--answer logprobs` (top_logprobs) or `--answer generate`")
    async with backend:
        model = await resolve_model(backend, spec.model)
        exp = experiment_for(spec, model)
        if hasattr(exp, "prepare"):
            await exp.prepare(backend)
        folder.prepare()
        done = folder.done(spec.retry_errors)  # every results file of the folder: all shards
        # preflight, before anything is recorded: a forgotten --image-root-map stops here (exit 2)
        pf = _preflight(spec, model, done)
        started = now()
        recorded = _redacted(spec.model_copy(update={"model": model}))  # the served model, not a guess
        extra = {"endpoints": [redact_url(e) for e in endpoints], "command": command_line()}
        if isinstance(spec.backend, EndpointBackend):
            extra["api_key_env"] = spec.backend.api_key_env  # the name of the variable, never its value
        # the settings check against run.json (every shard's) and the first manifest, as one step
        folder.claim(kind=exp.kind, settings=exp.settings, force=spec.force, spec=recorded, status="running",
                     started=started, **extra)
        if on_line is not None and pf is not None:
            for line in pf.lines:
                on_line(line)
            left = f"{pf.to_ask:,} question(s) to ask" + (f" for {pf.items:,} items" if pf.items else "")
            if done and not pf.to_ask:
                on_line(f"all {len(done):,} questions already done: nothing to ask (--retry-errors asks failed ones)")
            else:
                on_line(f"{len(done):,} already done, {left}" if done else left[0].upper() + left[1:])
        b = spec.backend
        cache = None
        if spec.cache:
            from harness.engine.cache import RequestCache

            cache = RequestCache(spec.cache)
        throttle = token_limiter = None
        if isinstance(b, EndpointBackend) and b.rps:
            from asyncio_throttle import Throttler

            throttle = Throttler(rate_limit=b.rps, period=1.0)
        if isinstance(b, EndpointBackend) and b.tpm:
            from aiolimiter import AsyncLimiter

            token_limiter = AsyncLimiter(b.tpm, 60)
        clip = isinstance(b, ClipBackend)
        # a CLIP scorer fills a batch from the questions in flight: 4 levels an image, so 8 per batch slot
        # endpoints: per-endpoint concurrency summed; with several, twice that many engine workers (the
        # client caps each endpoint at its share): a worker waiting on a busy endpoint starves no other
        concurrency = b.batch_size * 8 if clip else sum(endpoint_concurrency(u, b.concurrency) for u in endpoints) \
            * (2 if len(endpoints) > 1 else 1)
        engine = Engine(
            backend, exp.task, (store := folder.store()).append, concurrency=concurrency,
            group_workers=exp.group_workers, media=spec.media, max_side=getattr(exp, "max_side", spec.max_side),
            retry=RetryPolicy(max_retries=b.max_retries) if isinstance(b, EndpointBackend) else RetryPolicy(0),
            throttle=throttle, token_limiter=token_limiter, cache=cache, dedupe=exp.dedupe,
            prices=exp.prices, max_cost=spec.max_cost,
            prefetch=max(8, b.batch_size) if clip else 8,
            image_workers=getattr(backend, "image_workers", 4) if clip else 4)
        if on_engine is not None:
            on_engine(engine)
        units = exp.units(done)
        if folder.shard is not None:
            units = shard_units(units, folder.shard)
        loop = asyncio.get_running_loop()
        interrupted: list[str] = []
        run_task: asyncio.Future | None = None

        def on_signal(sig: int) -> None:
            if interrupted:  # a second signal: stop without waiting for the answers in flight
                if run_task is not None:
                    run_task.cancel()
                return
            interrupted.append(signal.Signals(sig).name)
            engine.stop(f"interrupted by {interrupted[0]}")  # queued work is dropped, in-flight answers kept

        installed = _install_signals(loop, on_signal)
        try:
            with store:
                async with Progress(engine.stats, progress, total=pf.to_ask if pf else None,
                                    done_before=len(done)):
                    try:
                        run_task = asyncio.ensure_future(engine.run(units))
                        stats = await run_task
                    except ItemError as e:  # strict: stop at the bad line; what was written is kept
                        engine.stats.fatal = str(e)
                        stats = engine.stats
                    except asyncio.CancelledError:
                        task = asyncio.current_task()
                        if not interrupted or (task is not None and task.cancelling()):
                            raise
                        stats = engine.stats  # the second signal: the answers written so far are kept
        finally:
            _remove_signals(loop, installed)
            if cache is not None:
                cache.close()
        # this writer's status: its own failures and what it left (a shard: not the other shards')
        own = exp.summarize(folder.results if folder.shard is not None else folder.path) \
            if folder.results.exists() else {}
        unanswered = exp.unanswered(own)
        left = max(0, pf.to_ask - stats.answered - stats.failed) if pf is not None else None
        status = ("fatal" if stats.fatal else "unavailable" if stats.unavailable else "interrupted" if interrupted
                  else "stopped" if stats.stopped else "incomplete" if unanswered or left else "done")
        if hasattr(backend, "stats"):
            extra["backend"] = backend.stats()  # CLIP: encoder calls, images and texts encoded
        folder.write_manifest(kind=exp.kind, spec=recorded, settings=exp.settings, status=status,
                              started=started, stats=stats.to_json(), **extra)

        def whole() -> dict:  # summary.json: every shard's answers as one run (under the manifest lock)
            s = {"kind": exp.kind} | (exp.summarize(folder.path) if folder.results_files() else {})
            if folder.shard is None:  # a run that ended done asked everything (also when not counted)
                return completeness(s, status, 0 if status == "done" else left)
            return completeness(s, *run_status(folder.path))

        summary = folder.write_summary(whole)
        lines = _lines(stats, exp, summary, folder)
        if lock is not None:
            lines[:0] = [x for x in (lock.note, lock.stale_line()) if x]
        if stats.fatal:
            code = ExitCode.INPUT if isinstance(stats.fatal, str) and stats.fatal.startswith(str(spec.data)) \
                else ExitCode.FATAL
            return RunResult(folder.path, status, code, summary, stats.to_json(), stats.fatal, lines)
        if stats.unavailable:
            return RunResult(folder.path, status, ExitCode.UNAVAILABLE, summary, stats.to_json(),
                             f"{stats.unavailable}; results kept: run the same command again once it is back", lines)
        if interrupted:
            return RunResult(folder.path, status, ExitCode.INTERRUPTED, summary, stats.to_json(),
                             f"interrupted by {interrupted[0]}: the {stats.answered + stats.failed:,} answers "
                             "written are kept; run the same command again to continue", lines)
        if stats.stopped:
            return RunResult(folder.path, status, ExitCode.UNANSWERED, summary, stats.to_json(),
                             f"{stats.stopped}; run the same command again to continue", lines)
        if unanswered:
            return RunResult(folder.path, status, ExitCode.UNANSWERED, summary, stats.to_json(),
                             f"{unanswered:,} question(s) failed; rerun with --retry-errors to ask them again", lines)
        code = ExitCode.INPUT if exp.report.errors else ExitCode.OK
        return RunResult(folder.path, status, code, summary, stats.to_json(), None, lines)


def _lines(stats, exp, summary: dict, folder: RunFolder) -> list[str]:
    s = stats.to_json()
    dt = s["seconds"]
    n = stats.answered + stats.failed
    out = []
    if n or stats.groups:  # a resumed run with nothing left has said so already
        out.append(f"{n:,} questions in {dt:,.1f} s ({n / max(dt, 1e-9):,.0f}/s): {stats.answered:,} answered, "
                   f"{stats.failed:,} failed, {stats.cached:,} from cache/dedupe, {stats.retried:,} retries, "
                   f"{stats.images_encoded:,} images encoded for {stats.items:,} items"
                   + (f", ${stats.cost:,.4f}" if stats.cost else ""))
    out += [f"invalid input, skipped: {e}" for e in exp.report.errors[:20]]
    head = exp.headline(summary)
    if head:
        out.append(f"{head}  -> {folder.summary_path}")
    return out


def _remove_if_unused(path: Path) -> None:
    """Remove a run folder this invocation created when it holds nothing but lock files."""
    try:
        entries = list(path.iterdir())
        if all(e.name.startswith(".lock") and e.is_file() for e in entries):
            for e in entries:
                e.unlink()
            path.rmdir()
    except OSError:
        pass


def execute(spec: RunSpec, *, dry_run: bool = False, progress: bool = False, quiet_server: bool = False,
            on_engine: Callable[[Engine], Any] | None = None, on_line: Callable[[str], Any] | None = None
            ) -> RunResult:
    """Run a spec to the end (or until stopped); resumable. Invalid input raises ValueError /
    FileNotFoundError naming the field or file; backend failures come back as a FATAL result."""
    _check_inputs(spec)
    if spec.shard is not None:
        parse_shard(spec.shard)  # a spec built without validation: the message names the flag
    if not dry_run:  # input errors (profile, items file, images) before a server or endpoint is asked
        _preflight(spec, spec.model or "(the served model)", set(), count=False)
    try:
        import uvloop  # optional: a faster event loop where installed

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with ExitStack() as stack:
        lock = None
        if not dry_run:  # one writer per results file, checked before a server starts or a model loads
            folder = RunFolder(spec.out, spec.shard)
            if not folder.path.exists():  # a run that fails before writing anything leaves nothing behind
                stack.callback(_remove_if_unused, folder.path)
            folder.prepare()
            try:
                lock = stack.enter_context(folder.lock())
            except RunLocked as e:
                return RunResult(folder.path, "locked", ExitCode.LOCKED, message=str(e))
        endpoints: list[str] = []
        b = spec.backend
        if isinstance(b, EndpointBackend):
            endpoints = list(b.endpoints)
            if not endpoints:
                if not spec.model:
                    raise ValueError("give --endpoint URL, or --model PATH_OR_HUB_ID to start a local server")
                if dry_run:  # a dry run starts nothing: no server, no model
                    return runner(_execute(spec, [], dry_run=True, progress=False, on_engine=None))
                from harness.serving.launcher import ServerStartError, local_server

                try:
                    server = stack.enter_context(local_server(
                        spec.model, profile=getattr(spec.task, "profile", None), timeout=b.server_timeout,
                        quiet=quiet_server))
                except ServerStartError as e:  # died or timed out: the message has the log's tail
                    return RunResult(Path(spec.out), "fatal", ExitCode.FATAL, message=str(e))
                endpoints = [server.url]
                update: dict[str, Any] = {"model": server.model}
                if server.api_key_env:  # the client sends the key the server was started with
                    update["backend"] = b.model_copy(update={"api_key_env": server.api_key_env})
                spec = spec.model_copy(update=update)
        try:
            return runner(_execute(spec, endpoints, dry_run=dry_run, progress=progress, on_engine=on_engine,
                                   lock=lock, on_line=on_line))
        except FatalError as e:
            return RunResult(Path(spec.out), "fatal", ExitCode.FATAL, message=str(e))
