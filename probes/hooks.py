"""Forward hooks that record the tensors of named sites during one forward pass, and the pooling.

No modeling file is patched: a pre-hook reads a module's first input, a hook its output. After the
deepest requested site the forward is stopped (a vision-only extraction never runs the LLM; an
early-layer one never runs the later layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from probes.arch import VISION_SITES, ArchSpec, HookPoint, hook_point, site_order

VISION_POOLS = ("last", "mean")
LLM_POOLS = ("last", "mean", "img_last", "img_mean")


class _Stop(Exception):
    """Raised by the hook of the deepest site: nothing after it is needed."""


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _read_output(out, what: str):
    field = what.partition(".")[2]
    if field and not isinstance(out, torch.Tensor):
        val = getattr(out, field, None)
        if val is None and isinstance(out, dict):
            val = out.get(field)
        if val is not None:
            out = val
    t = _first_tensor(out)
    if t is None:
        raise TypeError(f"cannot read a tensor from {type(out).__name__} ({what})")
    return t


class Recorder:
    """Context manager: hooks on the sites' modules; `run(fn)` calls fn() and returns {site: tensor}.

    A module called several times in one forward (e.g. once per image) has its calls concatenated
    along the first dimension."""

    def __init__(self, model, spec: ArchSpec, sites: Sequence[str], *, stop_early: bool = True):
        if not sites:
            raise ValueError("no sites to record")
        self.points: list[HookPoint] = [hook_point(model, spec, s) for s in sites]
        self.deepest = max(sites, key=site_order) if stop_early else None
        self._handles: list = []
        self._got: dict[str, list[torch.Tensor]] = {}

    def _make(self, hp: HookPoint):
        site, stop = hp.site, hp.site == self.deepest

        def keep(t: torch.Tensor) -> None:
            self._got.setdefault(site, []).append(t.detach())
            if stop:
                raise _Stop

        if hp.what == "input":
            def pre(_m, args, kwargs):
                t = _first_tensor(args) if args else None
                if t is None:
                    t = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                if t is None:
                    raise TypeError(f"site {site!r}: no tensor input to {hp.path}")
                keep(t)

            return hp.module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(_m, _args, out):
            keep(_read_output(out, hp.what))

        return hp.module.register_forward_hook(post)

    def __enter__(self) -> Recorder:
        self._handles = [self._make(hp) for hp in self.points]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, fn: Callable[[], object]) -> dict[str, torch.Tensor]:
        self._got = {}
        try:
            fn()
        except _Stop:
            pass
        missing = [hp.site for hp in self.points if hp.site not in self._got]
        if missing:
            raise RuntimeError(f"sites {missing} were not reached in the forward pass (is there an image?)")
        return {s: (ts[0] if len(ts) == 1 else torch.cat(ts, 0)) for s, ts in self._got.items()}


def split_rows(t: torch.Tensor, how: str, n_images: int, grid_thw: torch.Tensor | None, merge: int) -> list[torch.Tensor]:
    """Per-image (rows, d) matrices of a vision site's tensor."""
    d = t.shape[-1]
    if how == "batch":
        if t.shape[0] != n_images:
            raise RuntimeError(f"vision tensor of shape {tuple(t.shape)}: expected {n_images} images first")
        return [x.reshape(-1, d) for x in t]
    if how in ("grid", "grid_merged"):
        if grid_thw is None:
            raise RuntimeError("split 'grid' needs image_grid_thw from the processor")
        sizes = grid_thw.prod(-1)
        if how == "grid_merged":
            sizes = sizes // (merge * merge)
        return list(t.reshape(-1, d).split(sizes.tolist()))
    if how == "single":
        if n_images != 1:
            raise ValueError("this architecture's vision rows cannot be split per image: use --batch-size 1")
        return [t.reshape(-1, d)]
    raise ValueError(f"unknown split rule {how!r}")


def pool_rows(rows: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "last":
        return rows[-1].float()
    if pool == "mean":
        return rows.float().mean(0)
    raise ValueError(f"pool {pool!r} is not defined for vision sites (use {', '.join(VISION_POOLS)})")


def pool_sequence(h: torch.Tensor, mask: torch.Tensor, pool: str, what: str) -> torch.Tensor:
    """(B, S, d) hidden states, (B, S) bool mask of the positions to pool -> (B, d) float32."""
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"row {row} of the batch has no {what} positions to pool")
    if pool.endswith("last"):
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, pos, -1).max(1).values
        return h[torch.arange(h.shape[0], device=h.device), last].float()
    m = mask.unsqueeze(-1).to(torch.float32)
    return (h.float() * m).sum(1) / counts.unsqueeze(-1).to(torch.float32)


def pool_batch(
    got: dict[str, torch.Tensor],
    keys: Sequence[tuple[str, str]],
    spec: ArchSpec,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int | None,
    n_images: int,
    grid_thw: torch.Tensor | None = None,
    merge: int = 1,
) -> dict[str, torch.Tensor]:
    """Pool the recorded tensors into {"site.pool": (B, d) float32} for the requested (site, pool) keys.

    LLM pools: `last` / `mean` over the prompt tokens (attention mask), `img_last` / `img_mean` over the
    image-token positions (input_ids == image_token_id). Vision pools: over the image's rows."""
    prompt = attention_mask.bool()
    image = None
    out: dict[str, torch.Tensor] = {}
    for site, pool in keys:
        t = got[site]
        if site in VISION_SITES:
            rows = split_rows(t, spec.split.get(site, "single"), n_images, grid_thw, merge)
            out[f"{site}.{pool}"] = torch.stack([pool_rows(r, pool) for r in rows])
            continue
        if pool not in LLM_POOLS:
            raise ValueError(f"pool {pool!r} is not defined for LLM sites (use {', '.join(LLM_POOLS)})")
        if pool.startswith("img"):
            if image is None:
                if image_token_id is None:
                    raise ValueError("image pools need the model's image token id")
                image = (input_ids == image_token_id) & prompt
            mask, what = image, "image-token"
        else:
            mask, what = prompt, "prompt"
        out[f"{site}.{pool}"] = pool_sequence(t, mask.to(t.device), pool, what)
    return out
