"""Where the shipped data lives: next to the package in a wheel, at the repository root in a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parent
_DATA_SETS = {"hierarchy", "classification", "probing"}


def data_dir(name: str) -> Path:
    """Directory of shipped data: `taxonomies`, `servers`, `plans`, or a data set folder under `data/`
    (`hierarchy` annotations, `classification`, `probing`)."""
    wheel = _PKG / "_data" / name
    if wheel.is_dir():
        return wheel
    repo = _REPO / (f"data/{name}" if name in _DATA_SETS else name)
    if repo.is_dir():
        return repo
    raise FileNotFoundError(f"shipped data folder {name!r} not found (looked in {wheel} and {repo})")
