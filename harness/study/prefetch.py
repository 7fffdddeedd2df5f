"""`harness plan prefetch PLAN`: download the weights of a plan's models into the Hugging Face cache
(HF_HOME / HF_HUB_CACHE) on a machine that reaches the hub (a login node), so that jobs can run with
HF_HUB_OFFLINE=1. A model is fetched when the plan would start a server for it: its `path` when that is
a hub id (not a local folder), else its profile's HF id at the profile's `revision`; models with an
endpoint (the plan's) or an API preset and no profile are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.serving.profiles import load_profile
from harness.study.cells import Expansion

__all__ = ["Fetch", "prefetch", "prefetch_targets", "snapshot_download"]


@dataclass
class Fetch:
    model: str
    repo_id: str | None
    revision: str | None = None
    result: str = ""
    """The local folder it is in, "skipped: ..." or "failed: ..."."""


def snapshot_download(repo_id: str, revision: str | None = None) -> str:
    """huggingface_hub's snapshot_download into the default cache (HF_HOME honoured); its local folder."""
    try:
        from huggingface_hub import snapshot_download as _dl
    except ImportError:
        raise RuntimeError("huggingface_hub is not installed (pip install huggingface_hub, "
                           "or the [serve] extra)") from None
    return _dl(repo_id=repo_id, revision=revision)


def prefetch_targets(exp: Expansion) -> list[Fetch]:
    """What `prefetch` downloads, per selected model (repo_id None: nothing, `result` says why)."""
    out = []
    for name, e in exp.entries.items():
        if e.endpoint:
            out.append(Fetch(name, None, result="skipped: served at the plan's endpoint"))
        elif e.path and Path(e.path).exists():
            out.append(Fetch(name, None, result=f"skipped: local weights {e.path}"))
        elif e.path:
            rev = load_profile(e.profile).vllm.revision if e.profile else None
            out.append(Fetch(name, e.path, rev))
        elif e.profile:
            prof = load_profile(e.profile)
            out.append(Fetch(name, prof.hf_id, prof.vllm.revision))
        else:
            out.append(Fetch(name, None, result="skipped: no profile or path (an API model)"))
    return out


def prefetch(exp: Expansion, *, download: Callable[..., str] | None = None, dry_run: bool = False,
             log: Callable[[str], None] | None = None) -> list[Fetch]:
    """Download every target once (two models on one repo: one download); a failure is reported and
    the others still download."""
    download = download or snapshot_download
    log = log or (lambda s: None)
    done: dict[tuple[str, str | None], str] = {}
    targets = prefetch_targets(exp)
    for t in targets:
        if t.repo_id is None:
            continue
        key = (t.repo_id, t.revision)
        if dry_run:
            t.result = "would download"
            continue
        if key not in done:
            log(f"harness plan prefetch: {t.repo_id}" + (f"@{t.revision}" if t.revision else "") + " ...")
            try:
                done[key] = str(download(repo_id=t.repo_id, revision=t.revision))
            except Exception as e:  # noqa: BLE001 - one model's failure (network, gated repo) is reported
                done[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        t.result = done[key]
    return targets
