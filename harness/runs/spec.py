"""`RunSpec`: one run, completely - data, backend and model, the experiment and its prompt options,
decoding, limits and the output folder. The CLI, plans and the Python API all build one; `run.json`
records it under `spec` (never a secret: keys travel by the *name* of their environment variable), and
`harness.run(RunSpec.model_validate(manifest["spec"]))` reproduces the run.

A spec round-trips through JSON (`model_dump_json` / `model_validate_json`) and TOML (`to_toml` /
`from_toml`), which is how a cluster job receives it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


SHARD_HELP = "expected I/N with 0 <= I < N (shards 0/3, 1/3 and 2/3 make one run)"


def parse_shard(text: str) -> tuple[int, int]:
    """(I, N) of `--shard I/N`; a ValueError naming the flag otherwise."""
    i, sep, n = str(text).strip().partition("/")
    try:
        ii, nn = int(i), int(n)
    except ValueError:
        ii = nn = -1
    if not sep or not 0 <= ii < nn:
        raise ValueError(f"--shard {text!r}: {SHARD_HELP}")
    return ii, nn


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# ------------------------------------------------------------------ backends

class EndpointBackend(_Spec):
    """OpenAI-compatible HTTP endpoints: vLLM, GPT-4o, any server (or a local server started for `model`)."""

    kind: Literal["openai"] = "openai"
    endpoints: list[str] = []
    """Base URLs (http://host:port or .../v1); several share the load. Empty: a local server is started
    for `RunSpec.model` (vLLM with a GPU, else `transformers serve`) and stopped after the run."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never recorded)."""
    concurrency: int | None = Field(None, ge=1)
    """Requests in flight per endpoint (default: vLLM's sequence slots, 256 per engine: 256 for a URL,
    256 * N for URL#dp=N). With one endpoint this is the run's concurrency, as before."""
    rps: float | None = Field(None, gt=0)
    """Requests per second limit."""
    tpm: int | None = Field(None, gt=0)
    """Tokens per minute budget (estimated from the prompt)."""
    timeout: float = Field(120.0, gt=0)
    """Per-request timeout, seconds."""
    max_retries: int = Field(8, ge=0)
    """Retries of a request after a transient fault (429, 5xx, connection, malformed reply)."""
    unavailable_after: float = Field(120.0, gt=0)
    """Seconds without any usable endpoint (all failing their health probe) before the run stops with
    exit code 5; results are kept and the same command resumes."""
    server_timeout: float = Field(3600.0, gt=0)
    """Seconds a local server started for `model` (no `endpoints`) may take to become healthy."""

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {u!r} must start with http:// or https://")
            frag = u.partition("#")[2]
            if frag and not (frag.startswith("dp=") and frag[3:].isdigit() and int(frag[3:]) >= 1):
                raise ValueError(f"endpoint {u!r}: the only URL suffix is #dp=N (a data-parallel vLLM with N engines)")
        return v


class ClipBackend(_Spec):
    """A local contrastive scorer (open_clip or transformers CLIP/SigLIP) behind the same engine."""

    kind: Literal["clip"] = "clip"
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:1 ..."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Model precision (the reference used float32)."""
    batch_size: int = Field(64, ge=1)
    """Images per encoder call."""
    workers: int | None = Field(None, ge=1)
    """Image decoding threads (default: CPUs - 1, at most 16)."""
    text_batch: int = Field(256, ge=1)
    """Texts per text-encoder call."""


def _kind(default: str):
    """Discriminate on `kind`, which may be left out for the default member."""
    return Discriminator(lambda v: v.get("kind", default) if isinstance(v, dict) else getattr(v, "kind", default))


Backend = Annotated[Annotated[EndpointBackend, Tag("openai")] | Annotated[ClipBackend, Tag("clip")], _kind("openai")]


# ------------------------------------------------------------------ experiments

class HierarchyTask(_Spec):
    """4-choice questions at every level of every image (Tan et al. 2025)."""

    kind: Literal["hierarchy"] = "hierarchy"
    taxonomy: str | None = None
    """Taxonomy id; default: from the items' `taxonomy` field or inferred from their labels."""
    mode: Literal["image", "text", "binary"] = "image"
    """image: the image and the question; text: the leaf name replaces the image; binary: yes/no statements."""
    prompt_variant: int | str | None = None
    """0..4, or a named variant (`gpt`); default: the profile's variant, else 0."""
    profile: str | None = None
    """A servers/ profile: the paper's prompt variant, system prompt and max tokens for that model."""
    protocol: Literal["reference", "robust"] = "robust"
    """reference: seeded option shuffle replay + substring parser; robust: hashed order + strict parser."""
    preset: str | None = None
    """Reference settings of an API model (`gpt-4o`: prompt, option order, decoding)."""
    answer: Literal["generate", "choice", "logprobs", "clip"] = "generate"
    """generate: greedy text + parser; choice: vLLM structured outputs; logprobs: top-20 letter
    distribution; clip: the scorer's logits (set by the CLIP backend)."""
    system: str = "auto"
    """System prompt id from the catalogue, `auto` (profile or mode default), or `none`."""
    suffix: Literal["standard", "cot", "cot_qwen"] = "standard"
    """Instruction after the options."""
    taxonomy_cot: bool = False
    """iNat taxonomy-based chain-of-thought system prompt."""
    taxonomy_in_context: bool = False
    """CUB: the whole taxonomy in the system prompt."""
    option_order: Literal["reference", "file", "hashed"] | None = None
    """Override the protocol's option order."""
    parser: Literal["reference", "robust"] | None = None
    """Override the protocol's answer parser."""
    gpt_order: bool = False
    """Text part before the image, image detail low (the reference GPT runs)."""
    template: str = "a photo of a {}."
    """CLIP backend: text of an option (`{}` or `{cls}` is replaced by the option)."""


class _ClassifyData(_Spec):
    dataset: str | None = None
    """Shipped data set: imagenet (needs `data`), flowers, cars, caltech."""
    classes: str | None = None
    """Class list JSON (default: the data set's)."""
    split: str | None = None
    """Evaluation split (default: valid for imagenet, test otherwise; `all`)."""
    first_synonym: bool = False
    """Class names: the text before the first comma (the thesis)."""


class _RequestStyle(_Spec):
    request: Literal["chat", "raw"] = "chat"
    """chat: the model's chat template; raw: the reference's raw prompt (`template`)."""
    template: str | None = None
    """Raw template: llava15, llava16-mistral, llava16-vicuna, blip2."""
    text_first: bool = False
    """Text before the image (the reference's API order)."""


class ClassifyTask(_ClassifyData, _RequestStyle):
    """Classification by generation: open world, closed world (K labels), N-way (Zhang et al. 2024)."""

    kind: Literal["classify"] = "classify"
    task: Literal["open", "closed", "nway"] = "open"
    """open: 'What type of object...'; closed: '... Choose one from'; nway: the thesis prompt."""
    k: int | Literal["all"] | None = None
    """Label-set size (truth included) for closed / nway, or `all`."""
    order: Literal["random", "fixed"] = "random"
    """Candidate order (fixed: class-list order, K = all)."""
    wording: int = Field(0, ge=0, le=3)
    """Open-world wording 0..3."""
    cot: bool = False
    """Chain of thought ("Let's think step by step.")."""
    protocol: Literal["reference", "robust"] = "robust"
    """reference: the seed-1234 global candidate stream; robust: per-item hashed candidates."""
    seed: int = 1234
    """Seed of the candidate stream."""
    preset: Literal["reference-api"] | None = None
    """reference-api: the reference's API decoding (no temperature, no max_tokens: the provider's defaults)."""


class LoglikTask(_ClassifyData, _RequestStyle):
    """Every class name scored by its log-likelihood after the image and question."""

    kind: Literal["loglik"] = "loglik"
    question: str | None = None
    """Default: 'What type of object is in this photo?'."""
    prefix: str | None = None
    """Answer prefix the class follows (default: 'The photo features a'; blip2: 'A')."""
    prior: bool = False
    """Also score every class without the image (the image-free prior)."""
    seed: int = 1234
    """Item order: the reference's seeded shuffle."""
    method: Literal["trie", "prompt-logprobs"] = "trie"
    """trie: one prefix-cached request per node of the class-token trie; prompt-logprobs: one request a class."""
    group_workers: int = Field(2, ge=1)
    """Images in flight (each fans out over the classes)."""
    protocol: Literal["reference", "robust"] = "robust"
    """Scoring of duplicate class names (ImageNet's missile, sunglasses): reference: every list entry a
    candidate, the label at its last index, ties to the lower index (never top-1 right); robust: one
    candidate per name, right for either class."""


class WikiQATask(_RequestStyle):
    """ImageWikiQA: 2,000 four-choice knowledge questions about ImageNet objects."""

    kind: Literal["wikiqa"] = "wikiqa"
    cot: bool = False
    """Append "Let's think step by step."."""
    control: Literal["none", "classname", "noimage"] = "none"
    """classname: 'this object' -> the class name, text only; noimage: the question without the image."""
    protocol: Literal["reference", "robust"] = "robust"
    """reference: the MMMU parser's random guesses continue one seed-1234 stream across the runs
    `harness report` is given (in that order), as the reference notebook did over its files; robust:
    each run reseeds."""
    preset: Literal["reference-api"] | None = None
    """reference-api: the reference's API decoding (no temperature, no max_tokens: the provider's defaults)."""


Task = Annotated[Annotated[HierarchyTask, Tag("hierarchy")] | Annotated[ClassifyTask, Tag("classify")]
                 | Annotated[LoglikTask, Tag("loglik")] | Annotated[WikiQATask, Tag("wikiqa")], _kind("hierarchy")]


# ------------------------------------------------------------------ the run

class RunSpec(_Spec):
    """Everything a run needs. Fields that change answers are fingerprinted in the run folder; the others
    (concurrency, retries, output handling) may change between invocations of one run."""

    out: str
    """Run folder: results.jsonl (append-only), run.json (manifest), summary.json."""
    data: str | None = None
    """Items JSONL (reference annotation format), or a classification image list; optional for shipped
    classification data sets and ImageWikiQA."""
    model: str | None = None
    """Served model name (may be omitted when the endpoint serves one), a local path / hub id to serve,
    or a CLIP spec (open_clip:ARCH/PRETRAINED, hf:ID_OR_PATH)."""
    backend: Backend = EndpointBackend()
    """Where answers come from."""
    task: Task = HierarchyTask()
    """The experiment and its prompt options."""
    max_tokens: int | None = Field(None, ge=1)
    """Completion budget (default: the protocol's)."""
    temperature: float | None = Field(None, ge=0)
    """Sampling temperature (default 0: greedy)."""
    seed: int | None = None
    """Sampling seed sent with each request."""
    top_logprobs: int = Field(20, ge=1, le=20)
    """Letters considered by `answer = "logprobs"`."""
    limit: int | None = Field(None, ge=1)
    """First N items only (a larger limit later extends the same run)."""
    image_root_map: list[str] = []
    """OLD=NEW image path prefix rewrites (the shipped files carry the authors' paths)."""
    strict: bool = False
    """Stop at the first invalid input line (default: skip it and report)."""
    media: Literal["base64", "file"] = "base64"
    """file: send file:// URLs (vLLM with --allowed-local-media-path)."""
    max_side: int | None = Field(None, ge=1)
    """Resize images whose longest side is larger (reference: 1680)."""
    cache: str | None = None
    """Folder of a request-hash answer cache shared across runs."""
    retry_errors: bool = False
    """Ask again the questions that failed before."""
    force: bool = False
    """Resume even if the folder's answer-changing settings differ."""
    max_cost: float | None = Field(None, gt=0)
    """Stop cleanly when the estimated cost reaches this many USD."""
    price_in: float | None = Field(None, ge=0)
    """USD per 1M prompt tokens (default: the built-in table)."""
    price_out: float | None = Field(None, ge=0)
    """USD per 1M completion tokens."""
    shard: str | None = None
    """I/N: this job asks only the items of shard I of N (0 <= I < N, by a stable hash of the item id);
    N jobs share `out`, each writing results.shard-I-of-N.jsonl under its own lock."""

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            i, n = parse_shard(v)
        except ValueError:
            raise ValueError(SHARD_HELP) from None  # the CLI prefixes the flag and the value
        return f"{i}/{n}"

    @field_validator("image_root_map")
    @classmethod
    def _maps(cls, v: list[str]) -> list[str]:
        for m in v:
            if "=" not in m or not m.split("=", 1)[0]:
                raise ValueError(f"image root map {m!r} must be OLD=NEW")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        if isinstance(self.backend, ClipBackend):
            if not isinstance(self.task, HierarchyTask):
                raise ValueError("the CLIP backend scores hierarchy items only (task.kind = hierarchy)")
            if self.task.mode != "image":
                raise ValueError("the CLIP backend scores images: task.mode must be image")
            if not self.model:
                raise ValueError("the CLIP backend needs `model` (open_clip:ARCH/PRETRAINED or hf:ID_OR_PATH)")
            self.task.answer = "clip"
        elif isinstance(self.task, HierarchyTask) and self.task.answer == "clip":
            raise ValueError("answer = clip needs the CLIP backend")
        if isinstance(self.task, HierarchyTask) and not self.data:
            raise ValueError("a hierarchy run needs `data` (an items JSONL file)")
        return self

    # -- serialisation
    def to_toml(self) -> str:
        """TOML text of the spec (None values left out: they are the defaults)."""
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_toml(cls, text: str) -> RunSpec:
        return cls.model_validate(tomllib.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        """A spec from a .toml or .json file."""
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        return cls.from_toml(text) if p.suffix == ".toml" else cls.model_validate_json(text)
