"""Preflight: the work left is counted and a forgotten --image-root-map stops the run before it starts."""

from __future__ import annotations

import pytest

from harness.runs.hierarchy import HierarchyExperiment
from harness.runs.preflight import preflight
from harness.runs.spec import RunSpec
from tests.support.engine_helpers import CUB_SIMILAR, image_items


def _exp(data, **kw) -> HierarchyExperiment:
    return HierarchyExperiment(RunSpec(out="unused", data=str(data), **kw), "m")


def test_the_authors_paths_give_the_exact_root_map_to_add():
    with pytest.raises(ValueError) as e:
        preflight(_exp(CUB_SIMILAR), set(), data=str(CUB_SIMILAR))
    msg = str(e.value)
    assert msg.startswith(f"--data {CUB_SIMILAR}: none of the first 20 images exists (looked for /projectnb/")
    assert "add --image-root-map /projectnb/ivc-ml/yuwentan/dataset=/path/to/your/datasets" in msg


def test_counts_the_work_left_and_warns_about_some_missing_images(tmp_path):
    data = image_items(tmp_path, 10, missing=[3])
    pf = preflight(_exp(data), set(), data=str(data))
    assert (pf.items, pf.to_ask, pf.auto, pf.images_checked) == (10, 40, 0, 10)
    assert pf.lines == [f"warning: 1 of the first 10 images are missing (e.g. {tmp_path}/img/0003.png); "
                        "their questions will be recorded as failed"]
    text = preflight(_exp(CUB_SIMILAR, task={"mode": "text"}, limit=5), set())
    assert (text.to_ask, text.auto, text.images_checked) == (15, 5, 0)


def test_other_missing_roots_name_the_folder(tmp_path):
    data = image_items(tmp_path, 3, missing=[0, 1, 2])
    with pytest.raises(ValueError, match=f"the images are not under {tmp_path}/img: map their folder with "
                                         "--image-root-map OLD=NEW"):
        preflight(_exp(data), set(), data=str(data))
