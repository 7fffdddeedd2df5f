"""A real single-node SLURM cluster for the tests: `.ci/slurm-up.sh` / `.ci/slurm-down.sh` (Debian's
slurmctld + slurmd + munge, plus slurmdbd + MariaDB for sacct; recipe: shared/reference/slurm-test-cluster.md).

`cluster()` reuses a cluster that is already up (an idle `localhost` node: CI may start it before
pytest) and otherwise starts one and stops it afterwards. `unavailable_reason()` says why the tests
must skip (not root, packages not installed, no submitit)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UP = REPO / ".ci" / "slurm-up.sh"
DOWN = REPO / ".ci" / "slurm-down.sh"
DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")
TIMINGS: dict[str, float] = {}


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed (pip install -e '.[slurm]')"
    missing = [d for d in DAEMONS if not os.path.exists(d)] + [c for c in ("sbatch", "squeue", "scontrol")
                                                                if shutil.which(c) is None]
    if missing:
        return ("SLURM is not installed (" + ", ".join(missing) + "): apt-get install slurmctld slurmd "
                "slurm-client munge slurmdbd mariadb-server, as .ci/run does")
    if os.geteuid() != 0:
        return "starting a SLURM test cluster needs root"
    return None


def _alive(pidfile: str) -> bool:
    try:
        os.kill(int(Path(pidfile).read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def is_up() -> bool:
    """slurmctld and slurmd running (their pid files) and the node idle (sinfo hangs ~10 s without a controller)."""
    if not (_alive("/run/slurm/slurmctld.pid") and _alive("/run/slurm/slurmd.pid")):
        return False
    try:
        p = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return p.returncode == 0 and p.stdout.strip() in ("idle", "mix", "alloc")


@contextlib.contextmanager
def cluster() -> Iterator[None]:
    if is_up():
        TIMINGS["up"] = 0.0
        yield
        return
    t0 = time.monotonic()
    try:
        p = subprocess.run(["bash", str(UP)], check=False, capture_output=True, text=True, timeout=180)
        if p.returncode != 0:
            raise RuntimeError(f"slurm-up.sh failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        TIMINGS["up"] = time.monotonic() - t0
        yield
    finally:
        t1 = time.monotonic()
        subprocess.run(["bash", str(DOWN)], check=False, capture_output=True, text=True, timeout=180)
        TIMINGS["down"] = time.monotonic() - t1
