"""Model serving profiles: one TOML file per model in `servers/`, their schema and loading.

A profile holds two things: how to serve the model with vLLM (`[vllm]`: parallelism, context length,
image limits, remote code, dtype, ...) and the protocol settings the published study used for it
(`[protocol]`: answer token budget, system prompt, prompt variant per taxonomy and mode).
`ServerProfile.vllm_args` gives the arguments after `vllm serve`; the full command is built in
harness.serving.command, the compose file in harness.serving.compose, `harness serve` in harness.cli.serve.

Secrets: the vLLM API key is never written anywhere. vLLM reads it from the `VLLM_API_KEY`
environment variable by itself, so neither the compose command nor `harness serve` puts it on a
command line (where every user of the host could read it in the process list); `vllm_args` can emit
`--api-key ${VAR}` as a *reference* for callers that want the flag form.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.paths import data_dir

__all__ = [
    "API_KEY_ENV",
    "PARALLEL_FLAGS",
    "SYSTEM_PROMPT_IDS",
    "TAXONOMIES",
    "TEXT_TAXONOMIES",
    "ProfileError",
    "ProfileNotFound",
    "ProtocolSettings",
    "ServerProfile",
    "VllmSettings",
    "find_profile",
    "gpus_env_var",
    "list_profiles",
    "load_all_profiles",
    "load_profile",
    "parallel_flag",
    "parse_device_ids",
    "profiles_dir",
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

API_KEY_ENV = "VLLM_API_KEY"


PARALLEL_FLAGS: dict[str, str] = {
    "--tensor-parallel-size": "--tensor-parallel-size", "-tp": "--tensor-parallel-size",
    "--data-parallel-size": "--data-parallel-size", "-dp": "--data-parallel-size",
}
"""vLLM flags (and their short forms) that change how many GPUs a server takes: `harness serve` sets them
from its own options so the GPU reservation follows."""


def parallel_flag(arg: str) -> str | None:
    """The long name of a GPU-count flag `arg` is (`-tp`, `--data-parallel-size=2`, ...), else None."""
    return PARALLEL_FLAGS.get(str(arg).split("=", 1)[0])


class ProfileError(ValueError):
    """A server profile that cannot be found, parsed or validated (the message names the file)."""


class ProfileNotFound(ProfileError):
    """No profile goes by the name asked for (a broken profile is a plain ProfileError)."""


# --------------------------------------------------------------------------------------------------
# The profile model
# --------------------------------------------------------------------------------------------------


class VllmSettings(BaseModel):
    """`[vllm]`: the engine arguments of `vllm serve` for this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: Annotated[int, Field(ge=1, le=16)] = 1
    """GPUs per replica (`--tensor-parallel-size`)."""
    data_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    """Replicas (engines) of the model behind one server (`--data-parallel-size`, emitted when > 1).
    A server takes tensor_parallel_size x data_parallel_size GPUs: the count `harness serve` and docker
    compose reserve by default (explicit device ids; each can be changed per server, see servers/README.md)."""
    mm_encoder_tp_mode: Literal["weights", "data"] | None = None
    """`--mm-encoder-tp-mode` (VLMs, vLLM >= 0.10): "data" runs the vision encoder data-parallel
    across the TP ranks (a full copy on each) instead of splitting its weights; vLLM's Qwen2.5-VL recipe
    for TP > 1. None = vLLM's default ("weights")."""
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
            flag = parallel_flag(a)
            if flag:
                raise ValueError(
                    f"extra_args must not carry {flag}: set tensor_parallel_size / data_parallel_size, "
                    "which also decide the GPUs reserved"
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
    text_label_case: Literal["original", "lower"] = "original"
    """Text mode: the leaf label as in the file, or lower-cased as the model's reference scripts did."""
    taxonomy_context: Literal["system", "user"] = "system"
    """Taxonomy in context: in the system prompt (Qwen's script) or in the user turn before the image
    ("Here is a taxonomy: {...}\\n<image>\\n{question}", the LLaVA-OV script)."""
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
            if v.mm_encoder_tp_mode is not None:
                raise ValueError("an llm profile has no vision encoder: leave mm_encoder_tp_mode unset")
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
        """GPUs one server of this profile takes: tensor_parallel_size x data_parallel_size."""
        return self.vllm.tensor_parallel_size * self.vllm.data_parallel_size

    @property
    def gpus_env(self) -> str:
        """The environment variable that names this server's GPUs (comma-separated device ids), e.g.
        VLLM_QWEN_72B_GPUS for service vllm-qwen-72b: read by docker compose and by `harness serve`."""
        return gpus_env_var(self.compose_service)

    def default_device_ids(self) -> list[str]:
        """The device ids reserved when none are given: 0 .. gpus-1."""
        return [str(i) for i in range(self.gpus)]

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
        tensor_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
    ) -> list[str]:
        """Arguments after `vllm serve`: the model first, then the flags.

        `tensor_parallel_size` / `data_parallel_size` override the profile's (e.g. the DP that fits a
        node); `--data-parallel-size` is emitted only when it is above 1.

        `api_key_env` adds `--api-key ${NAME}`, a reference to an environment variable for a shell or
        docker compose to expand; the key itself is never an argument here. Without it, vLLM still
        enforces a key found in its own environment as VLLM_API_KEY.
        `model_path` serves a local folder (e.g. a merged LoRA model) under the profile's names.
        """
        v = self.vllm
        tp = v.tensor_parallel_size if tensor_parallel_size is None else int(tensor_parallel_size)
        dp = v.data_parallel_size if data_parallel_size is None else int(data_parallel_size)
        if tp < 1 or dp < 1:
            raise ValueError(f"tensor and data parallel sizes must be >= 1, got {tp} and {dp}")
        if api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, got {api_key_env!r}")
        args: list[str] = [str(model_path) if model_path else self.hf_id]
        args += ["--host", host, "--port", str(port if port is not None else self.port)]
        args += ["--served-model-name", *self.served_model_names(served_model_name)]
        if v.revision:
            args += ["--revision", v.revision]
        args += ["--dtype", v.dtype]
        args += ["--tensor-parallel-size", str(tp)]
        if dp > 1:
            args += ["--data-parallel-size", str(dp)]
        args += ["--max-model-len", str(v.max_model_len)]
        args += ["--gpu-memory-utilization", f"{v.gpu_memory_utilization:g}"]
        if v.max_num_seqs is not None:
            args += ["--max-num-seqs", str(v.max_num_seqs)]
        if v.limit_mm_per_prompt is not None:
            args += ["--limit-mm-per-prompt", json.dumps(v.limit_mm_per_prompt, sort_keys=True)]
        if v.mm_processor_kwargs is not None:
            args += ["--mm-processor-kwargs", json.dumps(v.mm_processor_kwargs, sort_keys=True)]
        if v.mm_encoder_tp_mode is not None:
            args += ["--mm-encoder-tp-mode", v.mm_encoder_tp_mode]
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


def gpus_env_var(compose_service: str) -> str:
    """`vllm-qwen-72b` -> `VLLM_QWEN_72B_GPUS`: the per-server GPU list variable."""
    return re.sub(r"[^A-Za-z0-9]", "_", compose_service).upper() + "_GPUS"


def parse_device_ids(text: str) -> list[str]:
    """Comma-separated GPU ids ("0,1,2,3", or UUIDs "GPU-..."), as CUDA_VISIBLE_DEVICES and docker
    compose's device_ids take them; blanks are dropped, a repeated id or an empty list is an error."""
    ids = [x.strip() for x in str(text).split(",") if x.strip()]
    if not ids:
        raise ValueError(f"no GPU ids in {text!r}: expected a comma-separated list such as 0,1")
    bad = [x for x in ids if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9:._-]*", x)]
    if bad:
        raise ValueError(f"invalid GPU id(s) {', '.join(map(repr, bad))} in {text!r}")
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise ValueError(f"GPU id(s) {', '.join(dup)} listed twice in {text!r}")
    return ids


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
    raise ProfileNotFound(
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


def find_profile(model: str | os.PathLike[str]) -> ServerProfile | None:
    """The profile of `model` (a name, compose service, HF id or local folder), or None when no profile
    goes by that name. A profile that exists but does not load is an error, never a silent None."""
    try:
        return load_profile(model)
    except ProfileNotFound:
        return None
