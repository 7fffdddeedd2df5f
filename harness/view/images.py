"""Images of a run, served safely: only files under the run's mapped image roots.

The roots of a run are the targets of its `image_root_map` (`OLD=NEW`: NEW), the folders given to
`harness view --image-root`, or, when there are neither, the folder of the run's items file. A request
names a root by its number and a path relative to it; it is refused when the path is absolute, has a
`..` part, is not an image file, or resolves (symlinks followed) to a file outside the root.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from pathlib import Path, PurePosixPath, PureWindowsPath
from threading import Lock

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                 ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


class Refused(ValueError):
    """An image request outside the run's image roots (or not an image)."""


def run_roots(manifest: dict, data_path: str | None, extra: list[str | Path] = ()) -> list[Path]:
    """The image roots of a run (absolute, resolved), in order."""
    roots: list[Path] = []
    for m in (manifest.get("spec") or {}).get("image_root_map") or []:
        if isinstance(m, str) and "=" in m:
            new = m.split("=", 1)[1]
            if new:
                roots.append(Path(new))
    roots += [Path(e) for e in extra]
    if not roots and data_path:
        roots.append(Path(data_path).parent)
    out: list[Path] = []
    for r in roots:
        r = Path(os.path.realpath(r))
        if r not in out:
            out.append(r)
    return out


def locate(image: str | None, roots: list[Path]) -> tuple[int, str] | None:
    """(root number, path relative to it) of an image path, when it lies under one of the roots."""
    if not image:
        return None
    p = Path(os.path.normpath(os.path.abspath(image)))
    for k, r in enumerate(roots):
        try:
            rel = p.relative_to(r)
        except ValueError:
            continue
        return k, rel.as_posix()
    # the root itself may be a symlink resolved above: compare with the unresolved form too
    return None


def resolve(roots: list[Path], root: int, rel: str) -> Path:
    """The file of an image request, or Refused."""
    if not 0 <= root < len(roots):
        raise Refused("unknown image root")
    if not rel or "\x00" in rel:
        raise Refused("empty path")
    if rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive or PurePosixPath(rel).is_absolute():
        raise Refused("absolute paths are refused")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise Refused("'..' is refused")
    base = roots[root]
    real = Path(os.path.realpath(base / rel))
    if real != base and base not in real.parents:
        raise Refused("the path leaves the image root")
    if real.suffix.lower() not in IMAGE_SUFFIXES:
        raise Refused("not an image file")
    if not real.is_file():
        raise FileNotFoundError(rel)
    return real


class Thumbnails:
    """Small JPEG thumbnails, an LRU of bounded size (bytes) in memory."""

    def __init__(self, max_bytes: int = 32 << 20, side: int = 192):
        self.max_bytes, self.side = max_bytes, side
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = Lock()

    def get(self, path: Path, side: int | None = None) -> bytes:
        side = side or self.side
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, side)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = thumbnail(path, side)
        with self._lock:
            self._cache[key] = data
            self._size += len(data)
            while self._size > self.max_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._size -= len(old)
        return data


def thumbnail(path: Path, side: int = 192) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
        im = im.convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()
