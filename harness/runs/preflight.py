"""Preflight: one pass over a run's work before the first request - how many questions are left, the
invalid and duplicate input lines, and a sample of the images - so that the likeliest first mistakes
(a forgotten `--image-root-map`, an empty or broken items file) stop the run at once with one line that
says what to do, instead of a million failed questions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath

# Where the shipped annotation files point (the authors' cluster): the prefix to map.
KNOWN_PREFIXES = ("/projectnb/ivc-ml/yuwentan/dataset",)


@dataclass
class Preflight:
    to_ask: int = 0  # groups (questions) to send this invocation
    auto: int = 0  # lines written without asking (text-mode leaves)
    items: int = 0  # items with work left
    images_checked: int = 0
    images_missing: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what to tell the user before starting


def _hint(missing: list[str], root_map: list[str]) -> str:
    for prefix in KNOWN_PREFIXES:
        if all(m.startswith(prefix) for m in missing):
            return (f"the items carry the authors' paths: add --image-root-map {prefix}=/path/to/your/datasets "
                    "(the folder holding CUB_200_2011/, inat/, ...)")
    common = os.path.commonpath(missing) if len(missing) > 1 else str(PurePosixPath(missing[0]).parent)
    mapped = f" (the maps given: {', '.join(root_map)})" if root_map else ""
    return f"the images are not under {common}{mapped}: map their folder with --image-root-map OLD=NEW"


def preflight(exp, done: set[str], *, units=None, sample: int = 20, root_map: list[str] = (),
              data: str | None = None, source: str | None = None, count: bool = True) -> Preflight:
    """Count the work left and check a sample of images. Raises ValueError (one line naming the flag
    and what to add) when none of the first `sample` images exists. `count=False`: stop once the
    sample is checked (a check before a server is started). `source`: what the message names
    (default `--data DATA`; a shipped classification data set: `--dataset NAME`)."""
    pf = Preflight()
    checked = 0
    for unit in exp.units(done) if units is None else units:
        if unit.groups:
            pf.items += 1
        pf.to_ask += len(unit.groups)
        pf.auto += len(unit.records)
        if unit.image is not None and checked < sample and unit.groups:
            checked += 1
            if not os.path.isfile(unit.image):
                pf.images_missing.append(unit.image)
            if checked == sample and (len(pf.images_missing) == sample or not count):
                break  # nothing to run (say so now), or only the sample was asked for
    pf.images_checked = checked
    if checked and len(pf.images_missing) == checked:
        raise ValueError(f"{source or f'--data {data}'}: none of the first {checked} images exists (looked for "
                         f"{pf.images_missing[0]}); {_hint(pf.images_missing, list(root_map))}")
    if pf.images_missing:
        pf.lines.append(f"warning: {len(pf.images_missing)} of the first {checked} images are missing "
                        f"(e.g. {pf.images_missing[0]}); their questions will be recorded as failed")
    report = getattr(exp, "report", None)
    if report is not None and getattr(report, "duplicates", 0):
        pf.lines.append(f"note: {report.duplicates:,} duplicate item(s) (the same image twice, first at "
                        f"{report.first_duplicate}): each is asked again under the id `image#k`")
    return pf
