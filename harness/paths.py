"""Where the shipped data lives: next to the package in a wheel, at the repository root in a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parent


def data_dir(name: str) -> Path:
    """Directory of shipped data: `taxonomies`, `hierarchy` (annotations) or `servers`."""
    wheel = _PKG / "_data" / name
    if wheel.is_dir():
        return wheel
    repo = _REPO / ("data/hierarchy" if name == "hierarchy" else name)
    if repo.is_dir():
        return repo
    raise FileNotFoundError(f"shipped data folder {name!r} not found (looked in {wheel} and {repo})")
