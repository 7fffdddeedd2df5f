"""Extraction recipes (data in recipes.toml): prompt, sites, pools and image-size rule of a study."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import tomllib
from pydantic import BaseModel, ConfigDict

_FILE = Path(__file__).with_name("recipes.toml")


class Recipe(BaseModel):
    """What decides the features of an extraction (recorded in the feature store's manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    system: str | None = None
    """System turn of the chat (None: no system turn)."""
    user: str | None = None
    """User text after the image (chat recipes)."""
    template: str | None = None
    """A raw prompt instead of the chat template; {image} becomes the processor's image token."""
    sentence: str | None = None
    """Text probing: the sentence per species and level ({species}, {rank}, {label})."""
    sites: tuple[str, ...]
    pools: tuple[str, ...]
    max_side: int | None = None
    max_pixels: int | None = None


@lru_cache(maxsize=1)
def recipes() -> dict[str, Recipe]:
    with _FILE.open("rb") as f:
        raw = tomllib.load(f)
    return {name: Recipe(name=name, **row) for name, row in raw.items()}


def load_recipe(name: str) -> Recipe:
    try:
        return recipes()[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(recipes())}") from None
