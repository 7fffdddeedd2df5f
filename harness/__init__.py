"""Serving-based evaluation harness for hierarchical visual understanding.

The public API (`RunSpec`, `run`, `report`) is imported on first use, so `import harness` stays
cheap for the command line and for the modules below it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RunResult", "RunSpec", "report", "run"]

_API = {"RunSpec": "harness.runs.spec", "RunResult": "harness.runs.execute", "run": "harness.api",
        "report": "harness.api"}

if TYPE_CHECKING:
    from harness.api import report, run
    from harness.runs.execute import RunResult
    from harness.runs.spec import RunSpec


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
