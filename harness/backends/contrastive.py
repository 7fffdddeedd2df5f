"""Contrastive image-text encoders (CLIP, SigLIP) behind one small interface, and the image pipeline.

Two backends:
  - open_clip_torch (`open_clip:ARCH/PRETRAINED`, `open_clip:hf-hub:ORG/REPO`, `open_clip:local-dir:PATH`),
    scored as the reference did: 100 x cosine (SigLIP-type open_clip models: exp(logit_scale) x cosine
    + logit_bias);
  - transformers `AutoModel` CLIP / SigLIP (`hf:ID_OR_PATH`), scored like `logits_per_image`:
    exp(logit_scale) x cosine (+ logit_bias for SigLIP). SigLIP text is padded to `max_length` (as it
    was trained, and as the reference processor call did); CLIP text to the longest in the batch.

Encoders return L2-normalised float32 embeddings, so a similarity is a dot product and logits are an
affine map of it. Every adapter counts its encoder calls and encoded inputs (benchmarks report them).

Image decoding and preprocessing run in a bounded background thread pool (:func:`prefetch`) so the
encoder does not wait for JPEG decoding: PIL decode/resize and torch tensor ops release the GIL.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from harness.backends.clip_defaults import (  # noqa: F401  (the study defaults, re-exported)
    DEFAULT_OPEN_CLIP,
    DEFAULT_SIGLIP,
    TEMPLATE_CLASSIFICATION,
    TEMPLATE_HIERARCHY,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EncoderCounts:
    """How often the encoders ran (calls = forward passes, items = images / texts encoded)."""

    image_calls: int = 0
    images: int = 0
    text_calls: int = 0
    texts: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


class ContrastiveModel(Protocol):
    """A dual encoder. `preprocess` is thread-safe and runs in the image pool; the encoders run on
    the model's device and return L2-normalised float32 embeddings (rows)."""

    spec: str
    device: torch.device
    counts: EncoderCounts

    def preprocess(self, image: Any) -> torch.Tensor:
        """PIL image (RGB) -> pixel tensor (C, H, W) on the CPU."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D)."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """len(texts) strings -> (T, D)."""
        ...

    def logits(self, sims: torch.Tensor) -> torch.Tensor:
        """Cosine similarities -> the model's logits (scale x cosine [+ bias])."""
        ...


def resolve_device(device: str | None) -> torch.device:
    """`auto`/None: CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}") from None


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns a BaseModelOutputWithPooling from get_*_features, 4.x a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[0]
    return pooled


@dataclass
class _Base:
    spec: str
    device: torch.device
    dtype: torch.dtype
    counts: EncoderCounts = field(default_factory=EncoderCounts)
    scale: float = 100.0
    bias: float = 0.0

    def logits(self, sims: torch.Tensor) -> torch.Tensor:
        return sims * self.scale + self.bias


class OpenClipModel(_Base):
    """open_clip_torch model + its eval transform and tokenizer."""

    def __init__(self, spec: str, model, transform, tokenizer, device: torch.device, dtype: torch.dtype):
        super().__init__(spec, device, dtype)
        self.model, self.transform, self.tokenizer = model, transform, tokenizer
        bias = getattr(model, "logit_bias", None)
        if bias is not None:  # SigLIP-type open_clip model: sigmoid logits
            self.scale = float(model.logit_scale.detach().exp())
            self.bias = float(bias.detach())
        # else: the reference's fixed 100 x cosine (= exp(logit_scale) of a trained CLIP)

    def preprocess(self, image) -> torch.Tensor:
        return self.transform(image)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.counts.image_calls += 1
        self.counts.images += len(pixels)
        return _normalize(self.model.encode_image(pixels.to(self.device, self.dtype, non_blocking=True)))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.counts.text_calls += 1
        self.counts.texts += len(texts)
        tokens = self.tokenizer(list(texts)).to(self.device, non_blocking=True)
        return _normalize(self.model.encode_text(tokens))


class HFModel(_Base):
    """transformers CLIPModel / SiglipModel (any AutoModel with get_image/text_features and a
    logit_scale) + AutoTokenizer + AutoImageProcessor."""

    def __init__(self, spec: str, model, tokenizer, image_processor, device: torch.device, dtype: torch.dtype):
        super().__init__(spec, device, dtype)
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.model_type = getattr(model.config, "model_type", "")
        self.sigmoid = getattr(model, "logit_bias", None) is not None
        self.scale = float(model.logit_scale.detach().exp())
        self.bias = float(model.logit_bias.detach()) if self.sigmoid else 0.0
        # SigLIP was trained on max_length-padded text and pools the last position: padding changes
        # the embedding, so it must be fixed (the reference processor call used padding="max_length").
        self.padding: str | bool = "max_length" if self.sigmoid else True

    def preprocess(self, image) -> torch.Tensor:
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.counts.image_calls += 1
        self.counts.images += len(pixels)
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype, non_blocking=True))
        return _normalize(_pooled(out))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.counts.text_calls += 1
        self.counts.texts += len(texts)
        enc = self.tokenizer(list(texts), padding=self.padding, truncation=True, return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"].to(self.device)}
        if "attention_mask" in enc and not self.sigmoid:  # SigLIP's text model takes no mask in the reference
            kwargs["attention_mask"] = enc["attention_mask"].to(self.device)
        return _normalize(_pooled(self.model.get_text_features(**kwargs)))


# --- loading ----------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    """Model spec -> (backend, name). Accepted:
    `open_clip:ARCH/PRETRAINED` (a tag, a checkpoint file, or `random` for untrained weights),
    `open_clip:hf-hub:ORG/REPO`, `open_clip:local-dir:PATH`, `hf:HUB_ID_OR_PATH`, a local folder
    (config.json -> transformers; open_clip_config.json -> open_clip), or a bare hub id (transformers)."""
    if spec.startswith("open_clip:"):
        return "open_clip", spec[len("open_clip:"):]
    if spec.startswith("hf:"):
        return "hf", spec[3:]
    p = Path(spec)
    if p.is_dir():
        if (p / "open_clip_config.json").is_file():
            return "open_clip", f"local-dir:{p}"
        if (p / "config.json").is_file():
            return "hf", spec
        raise FileNotFoundError(f"{spec}: a folder with neither config.json (transformers) nor "
                                f"open_clip_config.json (open_clip)")
    if p.exists() or spec.startswith(("/", ".")):
        raise FileNotFoundError(f"model {spec!r}: not a model folder")
    return "hf", spec


def load_model(spec: str, device: str | None = "auto", dtype: str | torch.dtype | None = "float32") -> ContrastiveModel:
    """Load a CLIP/SigLIP model from a spec (see :func:`parse_spec`) onto `device`, in eval mode."""
    backend, name = parse_spec(spec)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    try:
        if backend == "open_clip":
            return _load_open_clip(spec, name, dev, dt)
        return _load_hf(spec, name, dev, dt)
    except (OSError, RuntimeError) as e:  # no network / no such repo / bad checkpoint: name the model
        if isinstance(e, FileNotFoundError) and str(e).startswith("model "):
            raise
        raise ValueError(f"model {spec!r}: cannot load: {type(e).__name__}: {str(e).strip()[:500]}") from e


def _load_open_clip(spec: str, name: str, dev: torch.device, dt: torch.dtype) -> OpenClipModel:
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        arch, pretrained = name, None
    else:
        arch, _, pretrained = name.partition("/")
        if not pretrained:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"model {spec!r}: give open_clip:{arch}/PRETRAINED (a tag, a checkpoint file, or "
                             f"`random`); tags for {arch}: {', '.join(tags) or 'none'}")
        if pretrained == "random":
            pretrained = None
        elif not open_clip.get_pretrained_cfg(arch, pretrained) and not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"model {spec!r}: {pretrained!r} is neither a pretrained tag of {arch} nor a file; "
                             f"tags: {', '.join(tags) or 'none'}")
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=dev)
    tokenizer = open_clip.get_tokenizer(arch)
    model = model.to(dev, dt).eval()
    return OpenClipModel(spec, model, transform, tokenizer, dev, dt)


def _load_hf(spec: str, name: str, dev: torch.device, dt: torch.dtype) -> HFModel:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(name)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
            and hasattr(model, "logit_scale")):
        raise ValueError(f"model {spec!r} ({type(model).__name__}) is not a CLIP/SigLIP dual encoder")
    tokenizer = AutoTokenizer.from_pretrained(name)
    image_processor = AutoImageProcessor.from_pretrained(name)
    model = model.to(device=dev, dtype=dt).eval()
    return HFModel(spec, model, tokenizer, image_processor, dev, dt)


# --- images -----------------------------------------------------------------------------------------


def load_pixels(path: str, model: ContrastiveModel) -> torch.Tensor:
    """Decode one image (RGB) and preprocess it for `model`; errors name the path."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except OSError as e:
        raise OSError(f"cannot decode image {path}: {e}") from None
    return model.preprocess(rgb)


T = TypeVar("T")
R = TypeVar("R")


def prefetch(inputs: Iterable[T], fn: Callable[[T], R], workers: int, ahead: int | None = None
             ) -> Iterator[tuple[T, R | BaseException]]:
    """Yield (x, fn(x)) in input order while up to `ahead` later calls run in a pool of `workers`
    threads. A call that raised yields its exception instead of a result. workers=0: no threads."""
    if workers <= 0:
        for x in inputs:
            try:
                yield x, fn(x)
            except Exception as e:  # noqa: BLE001 - handed to the caller, which records it
                yield x, e
        return
    ahead = max(ahead or workers * 4, 1)
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="harness-img") as pool:
        try:
            for x in inputs:
                pending.append((x, pool.submit(fn, x)))
                if len(pending) >= ahead:
                    yield _done(*pending.popleft())
            while pending:
                yield _done(*pending.popleft())
        finally:
            for _, f in pending:
                f.cancel()


def _done(x, fut: Future):
    try:
        return x, fut.result()
    except Exception as e:  # noqa: BLE001
        return x, e


def default_workers() -> int:
    """Image threads: the CPU count minus one for the encoder loop (at least 1), at most 16."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))



def embed_images(model: ContrastiveModel, inputs: Iterable[T], *, path: Callable[[T], str] = str,
                 batch_size: int = 64, workers: int = 4) -> Iterator[tuple[T, torch.Tensor | BaseException]]:
    """(input, L2-normalised embedding (D,)) in input order, each image decoded once in the background
    pool and encoded `batch_size` at a time; an unreadable image yields its exception instead.
    `path(input)` gives the file to read (default: the input itself)."""
    pixels: list[torch.Tensor] = []
    pending: list[tuple[T, int | BaseException]] = []  # (input, row in `pixels` or its error)

    def flush() -> Iterator[tuple[T, torch.Tensor | BaseException]]:
        emb = model.encode_images(torch.stack(pixels)) if pixels else None
        for x, r in pending:
            yield x, (r if isinstance(r, BaseException) else emb[r])  # type: ignore[index]
        pixels.clear()
        pending.clear()

    for x, px in prefetch(inputs, lambda x: load_pixels(path(x), model), workers,
                          ahead=max(2 * batch_size, workers * 4)):
        if isinstance(px, BaseException):
            pending.append((x, px))
        else:
            pending.append((x, len(pixels)))
            pixels.append(px)
        if len(pixels) >= batch_size:
            yield from flush()
    yield from flush()
