"""The GPUs a plan may use and how a model's server fits on them.

Inventory: `--gpus` (ids "0,1,2,3", or a count "4" meaning 0..3), else $CUDA_VISIBLE_DEVICES (what a
SLURM job with GPUs or a container gets; an empty value means none), else the GPUs `nvidia-smi` lists,
else none. Ids are opaque tokens (an index, a GPU-/MIG- UUID): a server is started with
CUDA_VISIBLE_DEVICES set to its share.

A model's server takes tensor-parallel x data-parallel GPUs (its servers/ profile); when fewer GPUs are
there, its data-parallel size shrinks to what fits (never below one replica of TP GPUs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from harness.serving.profiles import ServerProfile

__all__ = ["Fit", "fit", "gpu_inventory", "parse_gpus", "profile_parallel"]


def parse_gpus(text: str) -> list[str]:
    """"0,1,3" -> ["0", "1", "3"]; "4" -> ["0", "1", "2", "3"]; "" -> []."""
    text = text.strip()
    if not text:
        return []
    if text.isdigit() and "," not in text:
        return [str(i) for i in range(int(text))]
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {text!r}: a GPU id is listed twice")
    return ids


def _nvidia_smi() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [x.strip() for x in out.splitlines() if x.strip()]


def gpu_inventory(flag: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """The GPU ids this process may hand out: `flag` (`--gpus`), else $CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    if flag is not None:
        return parse_gpus(flag)
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        v = env["CUDA_VISIBLE_DEVICES"].strip()
        return [] if v in ("", "-1", "NoDevFiles") else [t.strip() for t in v.split(",") if t.strip()]
    return _nvidia_smi()


def profile_parallel(profile: ServerProfile | None) -> tuple[int, int]:
    """(tensor-parallel size, data-parallel size) of a profile; (1, 1) without one (a `path` served alone)."""
    if profile is None:
        return 1, 1
    v = profile.vllm
    return int(v.tensor_parallel_size), int(getattr(v, "data_parallel_size", 1) or 1)


@dataclass(frozen=True)
class Fit:
    tp: int
    dp: int
    gpus: tuple[str, ...]
    """The GPUs given to the server (tp x dp of them)."""

    @property
    def count(self) -> int:
        return self.tp * self.dp


def fit(tp: int, dp: int | None, gpus: Sequence[str]) -> Fit | None:
    """The share of `gpus` a server of TP `tp` takes: `dp` replicas (None: as many as fit), fewer when
    fewer fit, None when not even one replica (TP GPUs) fits."""
    n = len(gpus) // tp
    if n < 1:
        return None
    dp = n if dp is None else max(1, min(dp, n))
    return Fit(tp, dp, tuple(gpus[: tp * dp]))
