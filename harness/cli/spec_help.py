"""Help text of the flags that are RunSpec fields, taken from the fields' docstrings (one source)."""

from __future__ import annotations

import argparse
import re

from pydantic import BaseModel


def help_from_fields(p: argparse.ArgumentParser, *models: type[BaseModel]) -> None:
    """Give every option of `p` that has no help the description of the field named by its dest, looked
    up in `models` in order (the first model that has the field wins: list the task before RunSpec when
    a name means different things, e.g. `seed`). Flags without such a field are left alone."""
    flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}

    def as_flag(m: re.Match) -> str:  # `answer = "logprobs"` -> --answer logprobs, `model` -> --model
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        return flags[name] + (f" {value}" if value else "")

    for a in p._actions:
        if (a.help or "").strip() or not a.option_strings:
            continue
        doc = next((m.model_fields[a.dest].description for m in models if a.dest in m.model_fields), None)
        if not doc:
            continue
        text = " ".join(doc.split()).removesuffix(".")
        text = re.sub(r'`(\w+)(?: = "([^"]*)")?`', as_flag, text)
        if len(text) > 1 and text[0].isupper() and text[1].islower():
            text = text[0].lower() + text[1:]  # the style of the hand-written help: lower case, no final stop
        a.help = text.replace("%", "%%")
