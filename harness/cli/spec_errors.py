"""A RunSpec validation error as one line that names the command-line flag, not a pydantic dump."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

T = TypeVar("T")

# spec field -> flag, where the two differ
_FLAGS = {"endpoints": "--endpoint", "image_root_map": "--image-root-map", "kind": "--backend"}


# parts of an error location that name no field: the sub-models, their union tags, member types
_NOT_FIELDS = {"backend", "task", "openai", "clip", "hierarchy", "classify", "loglik", "wikiqa",
               "int", "str", "float", "bool", "none"}


def flag_of(loc: tuple) -> str:
    """The flag of a RunSpec error location, e.g. ("task", "classify", "k", "int") -> --k."""
    names = [p for p in loc if isinstance(p, str) and p not in _NOT_FIELDS and not p[:1].isupper()
             and "[" not in p and not p.startswith(("function-", "tagged-union"))]
    if not names:
        return "--" + str(loc[0]).replace("_", "-") if loc else "input"
    return _FLAGS.get(names[0], "--" + names[0].replace("_", "-"))


def validated(build: Callable[..., T], *args) -> T:
    """`build(*args)`, with a ValidationError turned into a ValueError naming the flag."""
    try:
        return build(*args)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) and value is not None else ""
        raise ValueError(f"{flag_of(tuple(err['loc']))}: {msg}{shown}") from None
