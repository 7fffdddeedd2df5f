"""Start a local OpenAI-compatible server: for `harness run --model PATH_OR_HUB_ID` (no --endpoint) and
for a plan's model without an endpoint.

vLLM when it is importable and a GPU is present (with the `servers/` profile's arguments: the one
named by `--profile`, else the model's own when it has one), otherwise `transformers serve` (the
`[serve]` extra) on the GPU when torch sees one, else the CPU; the argv and the choice come from
harness.serving.command. The server gets its own process group on a free loopback port; we wait
for /health and /v1/models (sending the API key the server was started with), run through the same
client path as any endpoint, and stop the whole group afterwards (SIGTERM, then SIGKILL).

The key: `harness run --model` starts the server with $VLLM_API_KEY when it is set (vLLM enforces it on
/v1; a loopback port is reachable by every user of the host), and the health wait and the run's
client send that same key. A plan's servers (`start_server` without `api_key`) run without one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from harness.serving.command import (
    TF_LAUNCHER,
    choose_backend,
    default_launcher,
    transformers_available,
    transformers_command,
    transformers_device,
    vllm_command,
)
from harness.serving.profiles import API_KEY_ENV, ServerProfile, find_profile, load_profile

__all__ = [
    "DEFAULT_SERVER_TIMEOUT",
    "LOOPBACK",
    "TF_LAUNCHER",
    "TIMEOUT_HINT",
    "LocalServer",
    "ServerStartError",
    "free_port",
    "local_server",
    "managed_server",
    "pdeathsig_preexec",
    "start_server",
    "stop_group",
    "tail",
    "wait_healthy",
]

LOOPBACK = "127.0.0.1"
DEFAULT_SERVER_TIMEOUT = 3600.0
"""Seconds a started server may take to answer /health and /v1/models (a first download and load of a
72B model takes well over the old fixed 900 s). `harness run --server-timeout` changes it."""
TIMEOUT_HINT = ("a first download or a large model can take longer: raise the limit with "
                "--server-timeout SECONDS (RunSpec: backend.server_timeout)")


class ServerStartError(RuntimeError):
    pass


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the usual bind-to-0 trick; tiny race window)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Path, max_chars: int = 6000) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"<no log: {e}>"
    return data[-max_chars:].decode("utf-8", "replace")


def http_status(url: str, api_key: str | None, timeout: float = 5.0) -> int | None:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def wait_healthy(
    proc: subprocess.Popen,
    root_url: str,
    *,
    api_key: str | None,
    timeout: float,
    log_path: Path,
    name: str,
    interval: float = 0.5,
    hint: str | None = None,
) -> float:
    """Poll ``/health`` then ``/v1/models`` (with ``api_key`` as a bearer token: the key the server was
    started with) until both are 200; returns the seconds it took. ``hint`` ends the timeout message
    (how to raise the limit)."""
    start = time.monotonic()
    deadline = start + timeout
    last = None
    while True:
        rc = proc.poll()
        if rc is not None:
            raise ServerStartError(
                f"{name} exited with status {rc} before becoming healthy; log {log_path}:\n{tail(log_path)}"
            )
        health = http_status(f"{root_url}/health", api_key)
        if health == 200:
            models = http_status(f"{root_url}/v1/models", api_key)
            if models == 200:
                return time.monotonic() - start
            last = f"/v1/models -> {models}"
        else:
            last = f"/health -> {health}"
        if time.monotonic() > deadline:
            if last in ("/v1/models -> 401", "/v1/models -> 403"):
                last += " (the server wants an API key other than the one sent)"
            why = f"; {hint}" if hint else ""
            raise ServerStartError(
                f"{name} not healthy after {timeout:g} s (last: {last}){why}; log {log_path}:\n{tail(log_path)}"
            )
        time.sleep(interval)


def pdeathsig_preexec():
    """Linux: a preexec_fn making the kernel SIGTERM the server when the test process dies without
    cleaning up (e.g. SIGKILLed by a CI timeout). libc is resolved here, in the parent, so the child
    only makes one foreign call between fork and exec. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Terminate the server's whole process group (vLLM forks an engine core and workers).

    SIGTERM, up to ``grace`` seconds for the group to go, then SIGKILL. The group id is the leader's
    pid (``start_new_session=True``)."""
    pgid = proc.pid

    def group_alive() -> bool:
        proc.poll()  # reap the leader, or its zombie keeps the group "alive"
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover
            return True
        return True

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive():
                return
            time.sleep(0.1)


@contextlib.contextmanager
def managed_server(cmd: list[str], port: int, *, env: dict | None = None, timeout: float = DEFAULT_SERVER_TIMEOUT,
                   log_path: Path | None = None, name: str = "server", api_key: str | None = None,
                   timeout_hint: str | None = None) -> Iterator[str]:
    """Run `cmd` in its own process group, wait until /health and /v1/models answer 200 (sending
    `api_key`), yield the base URL (…/v1), stop the group on exit. The log's tail is in the error when
    start-up fails; `timeout_hint` says how to raise `timeout`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]  # a model path has slashes
    log_path = log_path or Path(tempfile.mkstemp(prefix=f"harness-{safe}-", suffix=".log")[1])
    with open(log_path, "ab", buffering=0) as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,  # own process group: stopped as a whole
                                preexec_fn=pdeathsig_preexec())  # noqa: PLW1509
    try:
        wait_healthy(proc, f"http://{LOOPBACK}:{port}", api_key=api_key, timeout=timeout, log_path=log_path, name=name,
                     hint=timeout_hint)
        yield f"http://{LOOPBACK}:{port}/v1"
    finally:
        stop_group(proc)


class LocalServer(NamedTuple):
    """What `local_server` yields."""

    url: str
    """Base URL, http://127.0.0.1:PORT/v1."""
    model: str
    """The model name clients send."""
    api_key_env: str | None
    """The environment variable holding the key the server was started with (None: no key)."""


@contextlib.contextmanager
def start_server(model: str | None = None, *, profile: ServerProfile | None = None,
                 served_model_name: str | None = None, backend: str = "auto",
                 timeout: float = DEFAULT_SERVER_TIMEOUT, log_path: Path | None = None, quiet: bool = False,
                 api_key: str | None = None, timeout_hint: str | None = None) -> Iterator[tuple[str, str]]:
    """Serve `model` (a local folder or hub id) and/or a profile on a free loopback port; yields (base
    URL, the model name clients send). The backend is `choose_backend`'s; `transformers serve` runs on
    the GPU when there is one. With `api_key` the server is started with it (vLLM reads it as its
    $VLLM_API_KEY, never from the command line) and the health wait sends it; without, the server runs
    without a key (a $VLLM_API_KEY in this environment is not passed on). `timeout` bounds the start;
    `timeout_hint` ends the timeout error (how to raise it)."""
    backend = choose_backend(backend)
    port = free_port()
    env = dict(os.environ)
    if api_key:
        env[API_KEY_ENV] = api_key
    else:
        env.pop(API_KEY_ENV, None)  # no key to leak or to mismatch
    if model is not None and Path(model).exists():
        env.setdefault("HF_HUB_OFFLINE", "1")  # local weights: nothing to fetch
    if backend == "vllm":
        if model is None and profile is None:
            raise ValueError("start_server: name a model or a profile")
        served = served_model_name or (profile.hf_id if profile is not None else model)
        cmd = vllm_command(profile, model=model, host=LOOPBACK, port=port, served_model_name=served,
                           launcher=default_launcher())
        if cmd[0] != "vllm" and cmd[0] != sys.executable:  # $HARNESS_VLLM_PYTHON: its own environment
            for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
                env.pop(var, None)
            env["PATH"] = f"{Path(cmd[0]).parent}{os.pathsep}{env.get('PATH', '')}"
        device = ""
    else:
        model = model or (profile.hf_id if profile is not None else None)
        if model is None:
            raise ValueError("start_server: name a model or a profile")
        if not transformers_available():
            raise ServerStartError("no local server available: install vLLM (GPU) or the `[serve]` extra "
                                   "(pip install 'vlm-hierarchy-harness[serve]' torch==2.13.0), or pass --endpoint")
        hub_cache = env.get("HF_HUB_CACHE") or str(Path.home() / ".cache" / "huggingface" / "hub")
        Path(hub_cache).mkdir(parents=True, exist_ok=True)  # /v1/models fails without it
        env["HF_HUB_CACHE"] = hub_cache
        served = model  # transformers serve loads whatever model a request names
        device = transformers_device()
        cmd = transformers_command(model, port, host=LOOPBACK, device=device)
    what = model or (profile.name if profile is not None else "?")
    if not quiet:
        where = f" (log {log_path})" if log_path else ""
        on = f" on {device}" if device else ""
        prof = f" with profile {profile.name}" if profile is not None and backend == "vllm" else ""
        print(f"harness: starting {backend} server{on} for {what}{prof} on {LOOPBACK}:{port}{where} ...",
              file=sys.stderr)
    t0 = time.monotonic()
    with managed_server(cmd, port, env=env, timeout=timeout, log_path=log_path, name=f"{backend} ({what})",
                        api_key=api_key, timeout_hint=timeout_hint) as url:
        if not quiet:
            print(f"harness: server ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        yield url, served


@contextlib.contextmanager
def local_server(model: str, *, profile: str | ServerProfile | None = None, quiet: bool = False,
                 backend: str = "auto", timeout: float = DEFAULT_SERVER_TIMEOUT,
                 key_env: str = API_KEY_ENV) -> Iterator[LocalServer]:
    """A server for `harness run --model PATH_OR_HUB_ID`, served under the name given.

    Its vLLM arguments come from `profile` (`--profile`: a name or a ServerProfile) when given, else
    from the model's own `servers/` profile when it has one (a broken profile is an error). A local
    folder is the weights; a profile name or HF id loads the profile's HF id. The server is started
    with the key in `key_env` ($VLLM_API_KEY) when that is set, and the health wait sends it; the
    yielded `api_key_env` names it, so the run's client sends the same key."""
    local = Path(model).exists()
    named = find_profile(model)
    if isinstance(profile, str):
        profile = load_profile(profile)
    prof = profile if profile is not None else named
    # a profile found by its name or service is not a weights location: load its HF id then
    weights = model if local or named is None else named.hf_id
    key = os.environ.get(key_env) or None
    with start_server(weights, profile=prof, served_model_name=model, backend=backend, timeout=timeout,
                      quiet=quiet, api_key=key, timeout_hint=TIMEOUT_HINT) as (url, served):
        yield LocalServer(url, served, key_env if key else None)
