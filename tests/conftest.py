"""Shared fixtures: paths to the data shipped in the repository (never /work/shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUB_SIMILAR = REPO / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
CUB_RANDOM = REPO / "data" / "hierarchy" / "CUB200_with_random_choice.jsonl"
TAXONOMY_DIR = REPO / "taxonomies"
AUTHORS_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cub_similar() -> Path:
    """The shipped CUB-200 annotation file with similar distractors (5,794 lines)."""
    assert CUB_SIMILAR.is_file(), CUB_SIMILAR
    return CUB_SIMILAR


@pytest.fixture(scope="session")
def cub_random() -> Path:
    """The shipped CUB-200 annotation file with random distractors (5,794 lines)."""
    assert CUB_RANDOM.is_file(), CUB_RANDOM
    return CUB_RANDOM


@pytest.fixture(scope="session")
def taxonomy_dir() -> Path:
    return TAXONOMY_DIR


@pytest.fixture(scope="session")
def cub_items(cub_similar):
    """All items of the similar-choice CUB file, read once per session (read-only: Items are frozen)."""
    from harness.data.items import read_items

    return tuple(read_items(cub_similar))


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `harness ...` in-process: returns (exit code, stdout, stderr).

    Subcommand plugins written by other packages (build, runner, servers) are not imported, so these
    tests exercise the core commands only and do not depend on modules in flux."""
    import harness.cli

    monkeypatch.setenv("COLUMNS", "400")  # rich: no wrapping of the printed tables

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = harness.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run
