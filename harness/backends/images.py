"""Image payloads: read and encode once per item (never once per level).

`base64` mode sends a data URL; `file` mode sends `file://` URLs for a local vLLM started with
`--allowed-local-media-path` (nothing is read or encoded here). Images whose longest side exceeds
`max_side` are resized (LANCZOS) and re-encoded, by one of two rules:
  - "exact" (default): the longest side becomes `max_side`, the other `int(side * scale)`;
  - "reference": the reference Qwen scripts' arithmetic, `scale = max_side / longest` and
    `(int(w * scale), int(h * scale))` on both sides, which gives `max_side - 1` on the long side
    whenever the float product falls just below the integer (e.g. 1680 / 2049 * 2049 = 1679.999...).
    The reference kept the resized image in memory; this rule re-encodes it losslessly (PNG) so the
    server sees exactly those pixels.
The rule travels with `max_side` as a `MaxSide` (an int that carries it), so the engine and the
backends pass it through unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Self

MAX_PIXELS = 100_000_000  # above this an image is refused unless --max-side resizes it (PIL warns at 89M)
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


class MaxSide(int):
    """A longest-side cap that carries its resize rule ("exact" or "reference"); a plain int is "exact"."""

    rule: str

    def __new__(cls, value: int, rule: str = "exact") -> Self:
        if rule not in ("exact", "reference"):
            raise ValueError(f"unknown resize rule {rule!r}: expected 'exact' or 'reference'")
        obj = super().__new__(cls, value)
        obj.rule = rule
        return obj

    def __reduce__(self):
        return (MaxSide, (int(self), self.rule))


def resize_rule(max_side: int | None) -> str:
    return getattr(max_side, "rule", "exact")


def resized_size(w: int, h: int, max_side: int, rule: str = "exact") -> tuple[int, int]:
    """The size an image of w x h gets when its longest side exceeds max_side (else w x h)."""
    if max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    if rule == "reference":  # reference Qwen scripts: int() of both scaled sides
        return int(w * scale), int(h * scale)
    return (max_side, int(h * scale)) if w >= h else (int(w * scale), max_side)


@dataclass(frozen=True, slots=True)
class ImagePayload:
    url: str
    uuid: str  # stable id for vLLM's multimodal cache (hash of path and size cap)
    n_bytes: int
    size: tuple[int, int] | None


def image_uuid(path: str, max_side: int | None) -> str:
    key = f"{path}\x1f{None if max_side is None else int(max_side)}"
    if resize_rule(max_side) != "exact":  # other pixels: another id for vLLM's multimodal cache
        key += f"\x1f{resize_rule(max_side)}"
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def encode_image(path: str, *, media: str = "base64", max_side: int | None = None) -> ImagePayload:
    """Build the payload of one image. Raises OSError / ValueError with the path on failure."""
    uid = image_uuid(path, max_side)
    if media == "file":
        p = Path(path).resolve()
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        return ImagePayload(p.as_uri(), uid, 0, None)
    from PIL import Image

    raw = Path(path).read_bytes()
    try:
        with warnings.catch_warnings():  # the pixel limit is checked below, with a message naming the file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_ctx = Image.open(io.BytesIO(raw))  # header only until pixels are needed
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e.args[0].split(',')[0]}: too large to decode") from None
    except (OSError, ValueError) as e:  # PIL's message names a BytesIO, not the file
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}"
                         + ("" if "BytesIO" in str(e) else f": {e}") + ")") from None
    with im_ctx as im:
        w, h = im.size
        if w * h > MAX_PIXELS and not (max_side and max(w, h) > max_side):
            raise ValueError(f"{path}: {w}x{h} = {w * h / 1e6:.0f} Mpixels, over the {MAX_PIXELS / 1e6:.0f} "
                             "Mpixel limit; send it resized with --max-side (e.g. 1680)")
        fmt = im.format or "JPEG"
        if max_side and max(w, h) > max_side:
            rule = resize_rule(max_side)
            nw, nh = resized_size(w, h, int(max_side), rule)
            with warnings.catch_warnings():  # the size was checked above: resizing is what was asked
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = im.convert("RGB").resize((nw, nh), Image.LANCZOS)
            buf = io.BytesIO()
            fmt = "PNG" if rule == "reference" else "JPEG"
            im.save(buf, format=fmt, **({} if fmt == "PNG" else {"quality": 95}))
            raw, (w, h) = buf.getvalue(), (nw, nh)
    mime = _MIME.get(fmt, "image/jpeg")
    return ImagePayload(f"data:{mime};base64,{base64.b64encode(raw).decode()}", uid, len(raw), (w, h))
