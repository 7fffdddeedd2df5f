#!/usr/bin/env python3
"""Make torchvision importable on CPU-only machines (idempotent).

Every torchvision wheel on the registry is a CUDA build. With the CPU torch wheel its C++ ops
(``torchvision::nms`` ...) fail to load, and ``torchvision/_meta_registrations.py`` then dies at
import time on ``@torch.library.register_fake("torchvision::nms")`` ("operator torchvision::nms does
not exist"), which also breaks some transformers imports. This rewrites each such decorator into

    @(torch.library.register_fake("torchvision::nms") if torchvision.extension._has_ops() else (lambda f: f))

so the fake kernels are only registered when the ops really loaded. On machines where torchvision's
ops load (CUDA) nothing changes in behaviour. Transforms then work; ``torchvision.ops.nms`` and
``torchvision.io.decode_*`` still do not.

Usage:
    python .ci/patch_torchvision.py                 # the torchvision of this interpreter
    python .ci/patch_torchvision.py VENV_OR_PYTHON  # of another venv (dir) or interpreter (file)

Exit status 0 when patched or already patched, and also when torchvision is not installed
(nothing to do); 1 on an unexpected file layout.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# Matches the unpatched decorator only (a patched line starts with "@(").
_DECORATOR = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)[ \t]*$', re.MULTILINE)
_REPLACEMENT = r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))"
_PATCHED_MARK = "if torchvision.extension._has_ops() else (lambda f: f))"

_FIND = (
    "import importlib.util as u, os; s = u.find_spec('torchvision'); "
    "print(os.path.join(os.path.dirname(s.origin), '_meta_registrations.py') if s and s.origin else '')"
)


def _python_of(target: str) -> str:
    p = Path(target)
    if p.is_dir():
        py = p / "bin" / "python"
        if not py.exists():
            py = p / "Scripts" / "python.exe"
        return str(py)
    return str(p)


def meta_registrations_path(python: str) -> Path | None:
    """Locate torchvision/_meta_registrations.py for ``python`` without importing torchvision."""
    out = subprocess.run([python, "-c", _FIND], check=True, capture_output=True, text=True).stdout.strip()
    return Path(out) if out else None


def patch_file(path: Path) -> str:
    """Patch one _meta_registrations.py; returns 'patched', 'already patched' or raises."""
    text = path.read_text()
    new, n = _DECORATOR.subn(_REPLACEMENT, text)
    if n:
        path.write_text(new)
        return f"patched ({n} decorators)"
    if _PATCHED_MARK in text or "register_fake(" not in text:
        return "already patched"
    raise RuntimeError(f"{path}: unexpected layout, no register_fake decorator found to patch")


def main(argv: list[str]) -> int:
    targets = argv or [sys.executable]
    rc = 0
    for t in targets:
        py = _python_of(t)
        path = meta_registrations_path(py)
        if path is None:
            print(f"patch_torchvision: {py}: torchvision not installed, nothing to do")
            continue
        if not path.exists():
            print(f"patch_torchvision: {path} not found (torchvision layout changed?)", file=sys.stderr)
            rc = 1
            continue
        try:
            print(f"patch_torchvision: {path}: {patch_file(path)}")
        except RuntimeError as e:
            print(f"patch_torchvision: {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
