"""Image-size rules applied before the processor (protocol section 7).

The reference fed Qwen2.5-VL images through qwen-vl-utils (smart resize to multiples of 28 within
[4, 16384] x 28 x 28 pixels, PIL's default bicubic), then, when the longest side exceeded a cap (1680 for
vision / merger features, 1024 for LLM features), scaled the longest side to the cap (int truncation)
and smart-resized again with max_pixels 28*28*1280 (vision) or 28*28*640 (LLM), LANCZOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

MAX_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize: sides multiples of `factor`, area within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"image {width}x{height}: aspect ratio above {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class SizeRule:
    """How an image is sized before the processor. kind "none": untouched (the processor decides)."""

    kind: Literal["qwen", "none"] = "none"
    max_side: int | None = None
    max_pixels: int | None = None
    factor: int = 28  # patch size x spatial merge size

    def apply(self, img):
        from PIL import Image

        img = img.convert("RGB")
        if self.kind == "none":
            return img
        f = self.factor
        w, h = img.size
        rh, rw = smart_resize(h, w, f, 4 * f * f, 16384 * f * f)  # qwen-vl-utils fetch_image
        if (rw, rh) != (w, h):
            img = img.resize((rw, rh), Image.BICUBIC)
        w, h = img.size
        if self.max_side and max(w, h) > self.max_side:
            scale = self.max_side / max(w, h)
            cw, ch = int(w * scale), int(h * scale)
            rh, rw = smart_resize(ch, cw, f, 56 * 56, self.max_pixels or 28 * 28 * 1280)
            img = img.resize((rw, rh), Image.LANCZOS)
        return img
