"""Image payloads: read and encode once per item (never once per level).

`base64` mode sends a data URL; `file` mode sends `file://` URLs for a local vLLM started with
`--allowed-local-media-path` (nothing is read or encoded here). Images whose longest side exceeds
`max_side` are resized like the reference (LANCZOS, int truncation of the scaled side) and re-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


@dataclass(frozen=True, slots=True)
class ImagePayload:
    url: str
    uuid: str  # stable id for vLLM's multimodal cache (hash of path and size cap)
    n_bytes: int
    size: tuple[int, int] | None


def image_uuid(path: str, max_side: int | None) -> str:
    return hashlib.blake2b(f"{path}\x1f{max_side}".encode(), digest_size=12).hexdigest()


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
    with Image.open(io.BytesIO(raw)) as im:  # header only until pixels are needed
        w, h = im.size
        fmt = im.format or "JPEG"
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            nw, nh = (max_side, int(h * scale)) if w >= h else (int(w * scale), max_side)
            im = im.convert("RGB").resize((nw, nh), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
            raw, fmt, (w, h) = buf.getvalue(), "JPEG", (nw, nh)
    mime = _MIME.get(fmt, "image/jpeg")
    return ImagePayload(f"data:{mime};base64,{base64.b64encode(raw).decode()}", uid, len(raw), (w, h))
