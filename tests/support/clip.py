"""Helpers of the CLIP/SigLIP tests: generated stand-in images for CUB items, a one-thread torch."""

from __future__ import annotations

import contextlib
import hashlib
from itertools import islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CUB_SIMILAR = REPO / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
CUB_RANDOM = REPO / "data" / "hierarchy" / "CUB200_with_random_choice.jsonl"
AUTHORS_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"


def cub_images(root: Path, n: int, skip: set[int] = frozenset(), items_file: Path = CUB_SIMILAR) -> str:
    """Draw a small image at the remapped path of each of the first `n` CUB items (except the
    positions in `skip`): a colour and size from a hash of the path, with a second-colour block so
    images differ in structure, not only in colour. Returns the --image-root-map value."""
    from PIL import Image

    from harness.data.items import read_items

    for i, item in enumerate(islice(read_items(items_file), n)):
        if i in skip:
            continue
        p = root / item.image[len(AUTHORS_PREFIX) + 1:]
        if p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.blake2b(item.image.encode(), digest_size=8).digest()
        im = Image.new("RGB", (40 + h[0] % 40, 32 + h[1] % 40), tuple(h[2:5]))
        im.paste(tuple(h[5:8]), (0, 0, 10 + h[0] % 20, 8 + h[1] % 20))
        im.save(p, format="JPEG" if p.suffix.lower() == ".jpg" else None)
    return f"{AUTHORS_PREFIX}={root}"


@contextlib.contextmanager
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
