"""The hierarchy experiment of a RunSpec: presets and profiles resolved into settings, items into units.

One class serves every backend: chat requests to endpoints, or option texts to a CLIP scorer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import islice

from pydantic import Field

from harness.backends.images import MaxSide
from harness.data.items import ReadReport, detect_taxonomy, file_hash, read_items
from harness.engine.core import Unit
from harness.engine.pricing import estimate_image_tokens, estimate_text_tokens, price_for
from harness.metrics.readers import summarize_results
from harness.prompts.hierarchy import PromptConfig, Renderer, catalogue_hash
from harness.runs.folder import NOT_ANSWERS, Settings
from harness.runs.spec import ClipBackend, HierarchyTask, RunSpec
from harness.tasks import hierarchy as H

# GPT-4o protocol of the reference scripts (hierarchy-protocol.md section 2). A preset may hold settings
# per mode (a nested dict under "image" / "text") that override its common ones.
PRESETS: dict[str, dict] = {
    "gpt-4o": {
        "variant": "gpt", "system": "helpful", "image_first": False, "detail": "low", "option_order": "file",
        "max_tokens": 5, "temperature": 0.2, "seed": 42,
        "ask_none": True,  # the GPT scripts ask levels whose truth is None (under `reference`)
        # every GPT text script (CUB, iNat, ImageNet) fills the leaf with the label, and sends the user
        # turn as a list with one text part
        "text": {"ask_leaf": False, "text_parts": True},
    },
}


def preset_for(name: str | None, mode: str) -> dict:
    """A preset's settings for one mode: its common settings, then those of the mode."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: unknown; known: {', '.join(PRESETS)}")
    base = {k: v for k, v in PRESETS[name].items() if k not in ("image", "text", "binary")}
    return base | PRESETS[name].get(mode, {})


class HierarchySettings(Settings):
    model: str
    data: str = Field(json_schema_extra=NOT_ANSWERS)
    data_sha256: str
    prompt: PromptConfig
    protocol: str = Field(json_schema_extra=NOT_ANSWERS)  # decided through option_order and parser
    answer: str
    parser: str
    max_tokens: int
    temperature: float
    seed: int | None
    top_logprobs: int
    max_side: int | None
    media: str = Field(json_schema_extra=NOT_ANSWERS)
    limit: int | None = Field(json_schema_extra=NOT_ANSWERS)  # items are rendered in file order: extendable
    catalogue_sha256: str
    resize: str = "exact"
    """Images above max_side: "exact" (longest side = max_side) or "reference" (int(side * scale) on both)."""
    template: str | None = None  # CLIP: the option text template
    dtype: str | None = None  # CLIP: model precision


def resolve(spec: RunSpec, model: str) -> HierarchySettings:
    """Spec + preset + profile -> the settings that decide every answer (explicit fields win)."""
    t = spec.task
    assert isinstance(t, HierarchyTask)
    preset = preset_for(t.preset, t.mode)
    taxonomy = detect_taxonomy(spec.data, t.taxonomy)
    clip = isinstance(spec.backend, ClipBackend)
    if t.profile:  # per-model protocol of the paper (servers/*.toml)
        from harness.serving.profiles import load_profile

        try:
            prof = load_profile(t.profile)
        except ValueError as e:  # ProfileError: unknown, or a broken file (named)
            raise ValueError(f"--profile {t.profile}: {e}") from None
        pmode = "text" if t.mode == "text" else "image"
        p = prof.protocol
        if t.prompt_variant is None:
            preset["variant"] = prof.prompt_variant_for(taxonomy, pmode)
        preset.setdefault("context_position", p.taxonomy_context)
        if t.mode == "text":
            preset.setdefault("label_case", p.text_label_case)
        preset.setdefault("request", p.api)
        # A prompt kind with its own system prompt keeps it: the profile's is only the default.
        own = t.taxonomy_cot or t.mode == "binary" or (t.taxonomy_in_context and preset["context_position"] == "system")
        if not own:
            preset.setdefault("system", prof.system_prompt_key(pmode))
        preset.setdefault("max_tokens", prof.max_tokens_for(taxonomy, pmode))
    reference = t.protocol == "reference"
    request = preset.get("request", "chat")
    if request == "completions" and t.mode != "text":
        raise ValueError(f"--profile {t.profile}: a raw-completions model (api = \"completions\") has text mode only")
    order = t.option_order or preset.get("option_order") or ("file" if clip else "reference" if reference else "hashed")
    variant: int | str = t.prompt_variant if t.prompt_variant is not None else preset.get("variant", 0)
    if isinstance(variant, str) and variant.isdigit():
        variant = int(variant)
    system = preset.get("system", "auto") if t.system == "auto" else (None if t.system == "none" else t.system)
    prompt = PromptConfig(
        taxonomy=taxonomy, mode=t.mode, variant=variant, system=system,
        suffix=t.suffix, taxonomy_cot=t.taxonomy_cot, taxonomy_in_context=t.taxonomy_in_context,
        ask_leaf=preset.get("ask_leaf", False), option_order=order,
        image_first=not (t.gpt_order or preset.get("image_first") is False),
        detail="low" if (t.gpt_order or preset.get("detail")) else None,
        context_position=preset.get("context_position", "system"),
        label_case=preset.get("label_case", "original"),
        # levels whose truth is None: the reference text and GPT scripts ask them, its image scripts skip them
        ask_none=reference and t.mode != "binary" and (t.mode == "text" or bool(preset.get("ask_none"))),
        request=request, text_parts=bool(preset.get("text_parts")),
    )
    # the taxonomy-CoT script (Qwen, iNat) generates 5 tokens
    max_tokens = spec.max_tokens or preset.get("max_tokens") or (5 if t.answer == "choice" or t.taxonomy_cot else 10)
    temperature = spec.temperature if spec.temperature is not None else preset.get("temperature", 0.0)
    seed = spec.seed if spec.seed is not None else preset.get("seed")
    return HierarchySettings(
        model=model, data=str(spec.data), data_sha256=file_hash(spec.data), prompt=prompt,
        protocol=t.protocol, answer=t.answer, parser=t.parser or ("reference" if reference else "robust"),
        max_tokens=max_tokens, temperature=temperature, seed=seed, top_logprobs=spec.top_logprobs,
        max_side=spec.max_side, media=spec.media, limit=spec.limit, catalogue_sha256=catalogue_hash(),
        resize="reference" if reference and spec.max_side and spec.media == "base64" else "exact",
        template=t.template if clip else None, dtype=spec.backend.dtype if clip else None,  # type: ignore[union-attr]
    )


class HierarchyExperiment:
    kind = "hierarchy"

    def __init__(self, spec: RunSpec, model: str):
        self.spec = spec
        self.settings = resolve(spec, model)
        s = self.settings
        self.report = ReadReport()
        self.renderer = Renderer(s.prompt, answer=s.answer)
        if s.answer == "clip":
            from harness.tasks.clip import ClipTask

            self.task = ClipTask(s.template or "")
            self.renderer = None  # CLIP questions keep the file order and carry no prompt
        else:
            self.task = H.ChatTask(s.prompt, H.Decoding(
                model=model, answer=s.answer, max_tokens=s.max_tokens, temperature=s.temperature,  # type: ignore[arg-type]
                seed=s.seed, top_logprobs=s.top_logprobs, parser=s.parser))
        # Identical text questions are asked once - harmless when greedy; under `reference` a sampling
        # temperature (GPT-4o's 0.2) makes every request its own draw, as in the reference scripts.
        self.dedupe = s.prompt.mode == "text" and not (s.protocol == "reference" and s.temperature > 0)
        # images above max_side: the reference's resize arithmetic under `reference` (harness.backends.images)
        self.max_side = MaxSide(s.max_side, s.resize) if s.max_side else s.max_side
        self.group_workers = None
        self.prices = price_for(model, spec.price_in, spec.price_out)

    def work(self, done: set[str]) -> Iterator:
        items = read_items(self.spec.data, root_map=self.spec.image_root_map, strict=self.spec.strict,
                           report=self.report)
        items = islice(items, self.spec.limit)
        if self.renderer is None:
            return self.task.questions(items, done)  # type: ignore[union-attr]
        return H.questions(items, self.renderer, done)

    def units(self, done: set[str]) -> Iterator[Unit]:
        return H.units(self.work(done))

    def summarize(self, results) -> dict:
        return summarize_results(results).to_json()

    def headline(self, summary: dict) -> str | None:
        if not summary.get("n_items"):
            return None
        lo, hi = summary["hca_ci"]
        return (f"HCA {summary['hca']:.2f} [{lo:.2f}, {hi:.2f}]  leaf {summary['leaf_acc']:.2f}  "
                f"unanswered {summary['n_unanswered']:,}")

    def unanswered(self, summary: dict) -> int:
        return summary.get("n_errors", 0)

    def dry_run(self, done: set[str]) -> list[str]:
        """What the run would ask and cost; nothing is sent."""
        s = self.settings
        n_q = n_auto = text_tokens = image_tokens = 0
        distinct: set[str] = set()
        for item, qs in self.work(done):
            size = None
            if any(q.image for q in qs):
                with contextlib.suppress(OSError, ValueError):  # unreadable images are counted, not sized
                    from PIL import Image

                    with Image.open(item.image) as im:
                        size = im.size
            for q in qs:
                if q.auto is not None:
                    n_auto += 1
                    continue
                n_q += 1
                distinct.add(q.text if q.image is None else q.qid)
                text_tokens += estimate_text_tokens((q.system or "") + q.text) + 4
                if q.image:
                    image_tokens += estimate_image_tokens(size, s.prompt.detail)
        prices = self.prices
        out_tokens = n_q * (1 if s.answer == "logprobs" else s.max_tokens)
        est = ((text_tokens + image_tokens) * prices[0] + out_tokens * prices[1]) / 1e6
        return [f"dry run: {n_q:,} questions to ask ({len(distinct):,} distinct requests), "
                f"{n_auto:,} auto-filled, {len(done):,} already done",
                f"estimated prompt tokens {text_tokens + image_tokens:,} (text {text_tokens:,}, images "
                f"{image_tokens:,}); completion tokens <= {out_tokens:,}",
                f"estimated cost: ${est:,.2f} at ${prices[0]}/{prices[1]} per 1M tokens in/out ({s.model})"]
