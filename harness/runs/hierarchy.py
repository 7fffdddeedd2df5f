"""The hierarchy experiment of a RunSpec: presets and profiles resolved into settings, items into units.

One class serves every backend: chat requests to endpoints, or option texts to a CLIP scorer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import islice

from pydantic import Field

from harness.data.items import ReadReport, detect_taxonomy, file_hash, read_items
from harness.engine.core import Unit
from harness.engine.pricing import estimate_image_tokens, estimate_text_tokens, price_for
from harness.metrics.readers import summarize_results
from harness.prompts.hierarchy import PromptConfig, Renderer, catalogue_hash
from harness.runs.folder import NOT_ANSWERS, Settings
from harness.runs.spec import ClipBackend, HierarchyTask, RunSpec
from harness.tasks import hierarchy as H

# GPT-4o protocol of the reference scripts (hierarchy-protocol.md section 2).
PRESETS: dict[str, dict] = {
    "gpt-4o": dict(variant="gpt", system="helpful", image_first=False, detail="low", option_order="file",
                   ask_leaf=True, max_tokens=5, temperature=0.2, seed=42),
}


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
    template: str | None = None  # CLIP: the option text template
    dtype: str | None = None  # CLIP: model precision


def resolve(spec: RunSpec, model: str) -> HierarchySettings:
    """Spec + preset + profile -> the settings that decide every answer (explicit fields win)."""
    t = spec.task
    assert isinstance(t, HierarchyTask)
    if t.preset is not None and t.preset not in PRESETS:
        raise ValueError(f"--preset {t.preset!r}: unknown; known: {', '.join(PRESETS)}")
    preset = dict(PRESETS.get(t.preset or "", {}))
    taxonomy = detect_taxonomy(spec.data, t.taxonomy)
    clip = isinstance(spec.backend, ClipBackend)
    if t.profile:  # per-model protocol of the paper (servers/*.toml)
        from harness.serving.profiles import load_profile

        prof = load_profile(t.profile)
        pmode = "text" if t.mode == "text" else "image"
        if t.prompt_variant is None:
            preset["variant"] = prof.prompt_variant_for(taxonomy, pmode)
        preset.setdefault("system", prof.system_prompt_key(pmode))
        preset.setdefault("max_tokens", prof.max_tokens_for(taxonomy, pmode))
    reference = t.protocol == "reference"
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
    )
    max_tokens = spec.max_tokens or preset.get("max_tokens") or (5 if t.answer == "choice" else 10)
    temperature = spec.temperature if spec.temperature is not None else preset.get("temperature", 0.0)
    seed = spec.seed if spec.seed is not None else preset.get("seed")
    return HierarchySettings(
        model=model, data=str(spec.data), data_sha256=file_hash(spec.data), prompt=prompt,
        protocol=t.protocol, answer=t.answer, parser=t.parser or ("reference" if reference else "robust"),
        max_tokens=max_tokens, temperature=temperature, seed=seed, top_logprobs=spec.top_logprobs,
        max_side=spec.max_side, media=spec.media, limit=spec.limit, catalogue_sha256=catalogue_hash(),
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
        self.dedupe = s.prompt.mode == "text"
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
