"""Feature extraction: a loaded HF model + hooks, batched over a stream of probe items into a store.

Images are read and preprocessed in a background thread (one batch ahead) while the model runs; the
forward calls the base model (no LM head) and stops after the deepest requested site.
"""

from __future__ import annotations

import importlib.util
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probes.arch import VISION_SITES, ArchSpec, expand_sites, n_llm_layers, spec_for
from probes.data import ProbeItem
from probes.hooks import LLM_POOLS, VISION_POOLS, Recorder, pool_batch
from probes.imaging import SizeRule
from probes.recipes import Recipe
from probes.store import StoreWriter


def feature_keys(sites: Sequence[str], pools: Sequence[str]) -> list[tuple[str, str]]:
    """(site, pool) pairs: every pool for LLM sites, `last`/`mean` for vision sites (their rows are all
    image rows, so `img_*` adds nothing there)."""
    bad = [p for p in pools if p not in LLM_POOLS]
    if bad:
        raise ValueError(f"unknown pools {bad}: use {', '.join(LLM_POOLS)}")
    out = []
    for s in sites:
        for p in pools:
            if s in VISION_SITES and p not in VISION_POOLS:
                continue
            out.append((s, p))
    if not out:
        raise ValueError(f"no feature from sites {list(sites)} and pools {list(pools)}")
    return out


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


class Extractor:
    """A model, its processor and hook table, ready to turn prepared batches into pooled features."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: str = "auto"):
        import torch
        import transformers
        from transformers import AutoProcessor

        self.model_dir = str(model_dir)
        self.device = _resolve_device(device)
        self.torch_dtype = _resolve_dtype(dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        model = None
        kw: dict = {"dtype": self.torch_dtype}
        if self.device.startswith("cuda") and importlib.util.find_spec("accelerate"):
            kw["device_map"] = self.device  # load straight onto the GPU
        for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
            try:
                model = getattr(transformers, auto).from_pretrained(self.model_dir, **kw)
                break
            except ValueError:  # this auto class does not know the config: try the next
                continue
        if model is None:
            raise ValueError(f"{self.model_dir}: neither an image-text-to-text nor a causal LM checkpoint")
        self.model = model.to(self.device).eval()
        self.base = getattr(model, model.base_model_prefix, model)
        self.spec: ArchSpec = spec_for(model.config)
        self.n_layers = n_llm_layers(model, self.spec)
        cfg = model.config
        tok_id = getattr(cfg, "image_token_id", None)
        self.image_token_id = tok_id if tok_id is not None else getattr(cfg, "image_token_index", None)
        vcfg = getattr(cfg, "vision_config", None)
        self.merge = int(getattr(vcfg, "spatial_merge_size", 1) or 1)
        ip = getattr(self.processor, "image_processor", None)
        self.has_images = ip is not None
        self.factor = int(getattr(ip, "patch_size", 14) or 14) * int(getattr(ip, "merge_size", 1) or 1)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if getattr(self.tokenizer, "pad_token", "") is None:  # llama-style tokenizers: batches need a pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._torch = torch

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    def size_rule(self, recipe: Recipe) -> SizeRule:
        if self.spec.resize == "qwen":
            return SizeRule("qwen", recipe.max_side, recipe.max_pixels, self.factor)
        return SizeRule("none")

    # ------------------------------------------------------------------ prompts
    def prompt(self, recipe: Recipe, *, text: str | None, image: bool) -> str:
        """The prompt string of one input (chat template, or the recipe's raw template)."""
        if recipe.template is not None:
            token = getattr(self.processor, "image_token", None) or "<image>"
            return recipe.template.format(image=token if image else "", question=text or "")
        user_text = text if text is not None else (recipe.user or "")
        messages = []
        if recipe.system is not None:
            messages.append({"role": "system", "content": recipe.system})
        if self.has_images:
            parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": user_text}]
            messages.append({"role": "user", "content": parts})
        else:
            if image:
                raise ValueError(f"{self.model_dir}: a text-only model cannot take images")
            messages.append({"role": "user", "content": user_text})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], images: list | None):
        kw = {"text": prompts, "return_tensors": "pt", "padding": True}
        if images:
            kw["images"] = images
        return self.processor(**kw)

    # ------------------------------------------------------------------ forward
    def features(self, inputs, keys: Sequence[tuple[str, str]], n_images: int) -> dict[str, np.ndarray]:
        """Run one prepared batch; {"site.pool": (B, d) float32 array}."""
        torch = self._torch
        sites = list(dict.fromkeys(s for s, _ in keys))
        batch = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.torch_dtype)
        with torch.inference_mode(), Recorder(self.model, self.spec, sites) as rec:
            got = rec.run(lambda: self.base(**batch, use_cache=False))
            pooled = pool_batch(
                got, keys, self.spec,
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                image_token_id=self.image_token_id, n_images=n_images,
                grid_thw=batch.get("image_grid_thw"), merge=self.merge,
            )
        return {k: v.cpu().numpy() for k, v in pooled.items()}


@dataclass
class Prepared:
    positions: list[int]
    items: list[ProbeItem]
    inputs: object | None
    errors: list[tuple[int, ProbeItem, BaseException]] = field(default_factory=list)
    next_input: int = 0


def _load_image(path: str, rule: SizeRule):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return rule.apply(im)


def _prepare(ext: Extractor, recipe: Recipe, rule: SizeRule, batch: list[tuple[int, ProbeItem]]) -> Prepared:
    ok_pos, ok_items, prompts, images, errors = [], [], [], [], []
    for pos, item in batch:
        try:
            img = _load_image(item.image, rule) if item.image is not None else None
            prompt = ext.prompt(recipe, text=item.text, image=img is not None)
        except (OSError, ValueError) as e:
            errors.append((pos, item, e))
            continue
        if img is not None:
            images.append(img)
        prompts.append(prompt)
        ok_pos.append(pos)
        ok_items.append(item)
    inputs = ext.encode(prompts, images or None) if prompts else None
    return Prepared(ok_pos, ok_items, inputs, errors, batch[-1][0] + 1)


def _prefetch(gen: Iterator[Prepared], depth: int = 2) -> Iterator[Prepared]:
    """Run `gen` in a thread, `depth` batches ahead (image decoding overlaps the forward)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for x in gen:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
            return
        q.put(done)

    t = threading.Thread(target=work, daemon=True, name="probe-prefetch")
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


@dataclass
class ExtractReport:
    n_rows: int
    n_errors: int
    n_new: int
    seconds: float
    resumed_at: int
    complete: bool

    @property
    def rate(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else float("nan")


def run_extraction(
    ext: Extractor,
    items: Iterable[ProbeItem],
    out: str | Path,
    recipe: Recipe,
    *,
    settings: dict,
    extra: dict | None = None,
    batch_size: int = 1,
    shard_size: int = 1024,
    store_dtype: str = "float16",
    limit: int | None = None,
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 10.0,
) -> ExtractReport:
    """Extract the recipe's features of `items` into the store at `out`, resuming what is there."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError("--batch-size and --shard-size must be >= 1")
    if shard_size % batch_size:
        raise ValueError(f"--shard-size {shard_size} must be a multiple of --batch-size {batch_size} "
                         "(so a resumed run cuts the same batches and writes identical shards)")
    sites = expand_sites(recipe.sites, ext.n_layers)
    keys = feature_keys(sites, recipe.pools)
    rule = ext.size_rule(recipe)
    writer = StoreWriter(Path(out), settings, shard_size=shard_size, store_dtype=store_dtype, extra=extra or {})
    start = writer.start()
    t0 = time.perf_counter()
    stream = itertools.islice(enumerate(items), start, limit)

    def batches() -> Iterator[Prepared]:
        while chunk := list(itertools.islice(stream, batch_size)):
            yield _prepare(ext, recipe, rule, chunk)

    exhausted = True
    n_new = 0
    last_note = time.perf_counter()
    for prep in _prefetch(batches()):
        for pos, item, err in prep.errors:
            if strict:
                raise err
            writer.add_error(pos, item.id, f"{type(err).__name__}: {err}", prep.next_input)
        if not prep.items:
            if writer.n_rows == 0 and prep.errors and all(isinstance(e, FileNotFoundError) for *_, e in prep.errors):
                raise FileNotFoundError(f"no image of the first batch could be read, e.g. {prep.errors[0][2]} "
                                        "(check --image-root-map)")
            continue
        feats = ext.features(prep.inputs, keys, n_images=sum(i.image is not None for i in prep.items))
        writer.add([i.row() for i in prep.items], feats, prep.next_input)
        n_new += len(prep.items)
        if progress and time.perf_counter() - last_note >= progress_every:
            last_note = time.perf_counter()
            rate = n_new / (last_note - t0)
            progress(f"{start + n_new} inputs done, {rate:.1f} items/s")
    if limit is not None and writer.next_input >= limit:
        exhausted = False
    writer.finish(complete=exhausted)
    return ExtractReport(writer.n_rows, writer.n_errors, n_new, time.perf_counter() - t0, start, exhausted)


def default_progress(msg: str) -> None:
    print(f"harness probe: {msg}", file=sys.stderr, flush=True)
