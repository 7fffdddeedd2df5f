"""Token prices (USD per 1M tokens) and token estimates for API runs; override with --price-in/--price-out."""

from __future__ import annotations

import math

# Public list prices (input, output) per 1M tokens; local models cost nothing.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-2024-11-20": (2.50, 10.00),
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}


def price_for(model: str | None, price_in: float | None = None, price_out: float | None = None) -> tuple[float, float]:
    base = PRICES.get(model or "", (0.0, 0.0))
    if model and model not in PRICES:
        base = next((v for k, v in PRICES.items() if model.startswith(k)), base)
    return (base[0] if price_in is None else price_in, base[1] if price_out is None else price_out)


def cost(prompt_tokens: int, completion_tokens: int, prices: tuple[float, float]) -> float:
    return (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6


def estimate_text_tokens(text: str) -> int:
    """Rough count without a tokenizer (about 4 characters a token for English)."""
    return max(1, math.ceil(len(text) / 4))


def estimate_image_tokens(size: tuple[int, int] | None, detail: str | None) -> int:
    """OpenAI vision token rule: 85 at detail low; else 85 + 170 per 512-px tile after scaling to
    fit 2048x2048 and then the shortest side to 768."""
    if detail == "low" or size is None:
        return 85
    w, h = size
    s = min(1.0, 2048 / max(w, h))
    w, h = w * s, h * s
    s = min(1.0, 768 / min(w, h))
    w, h = w * s, h * s
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)
