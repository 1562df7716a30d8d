"""Largest-connected-component post-processing: the step, the cross-validated decision, evaluate's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti

from medseg.errors import ConfigError
from medseg.postprocess import case_effect, decide, keep_largest_component, read_decision
from medseg.stages.evaluate import evaluate


def cube(mask: np.ndarray, corner: tuple[int, int, int], edge: int, value: int) -> None:
    x, y, z = corner
    mask[x : x + edge, y : y + edge, z : z + edge] = value


def test_keeps_the_largest_component_of_the_classes_asked_for_only() -> None:
    mask = np.zeros((30, 30, 30), dtype=np.uint8)
    cube(mask, (2, 2, 2), 4, 1)      # 64 voxels
    cube(mask, (20, 20, 20), 2, 1)   # 8 voxels, apart
    mask[6, 6, 6] = 1                # touches the big cube at a corner only: 26-connected to it
    cube(mask, (2, 20, 2), 3, 2)     # class 2: 27 + 8 voxels, both kept
    cube(mask, (20, 2, 20), 2, 2)
    out = keep_largest_component(mask, [1])
    assert out is mask
    assert int((mask == 1).sum()) == 65
    assert not mask[20:22, 20:22, 20:22].any()
    assert int((mask == 2).sum()) == 35
    keep_largest_component(mask, [2, 3])  # 3 is absent: nothing to do
    assert int((mask == 2).sum()) == 27


def test_decision_keeps_the_step_where_the_mean_dice_rises() -> None:
    ref = np.zeros((30, 30, 30), dtype=np.uint8)
    cube(ref, (2, 2, 2), 4, 1)
    cube(ref, (2, 20, 2), 4, 2)   # class 2 really has two parts: 64 + 27 voxels
    cube(ref, (20, 2, 20), 3, 2)
    pred = ref.copy()
    cube(pred, (20, 20, 20), 2, 1)  # a false positive of class 1: 8 voxels
    effect = case_effect(pred, ref, [1, 2])
    assert effect[1] == pytest.approx((128 / 136, 1.0))
    assert effect[2] == pytest.approx((1.0, 128 / 155))
    assert int((pred == 1).sum()) == 72  # the input is left as it was
    perfect = case_effect(ref, ref, [1, 2])
    decision = decide([effect, perfect], {1: "left", 2: "right"})
    assert decision["largest_component"] == [1]
    assert decision["n_cases"] == 2
    assert decision["classes"]["left"] == {"label": 1, "dice_before": pytest.approx((128 / 136 + 1) / 2),
                                           "dice_after": 1.0, "keep_largest": True, "cases_changed": 1}
    assert decision["classes"]["right"]["keep_largest"] is False
    assert decision["classes"]["right"]["dice_after"] == pytest.approx((128 / 155 + 128 / 155) / 2)


def test_evaluate_writes_the_decision(tmp_path: Path) -> None:
    for case, blob in (("a", True), ("b", False)):
        ref = np.zeros((24, 24, 24), dtype=np.uint8)
        cube(ref, (2, 2, 2), 6, 1)
        cube(ref, (12, 12, 12), 6, 2)
        pred = ref.copy()
        if blob:
            cube(pred, (20, 2, 20), 2, 1)
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", ref)
        write_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred)
    evaluate([tmp_path / "pred"], tmp_path / "eval", labels_dir=tmp_path / "labels", labels={1: "one", 2: "two"})
    decision = json.loads((tmp_path / "eval" / "postprocessing.json").read_text())
    assert decision["largest_component"] == [1]
    assert decision["classes"]["one"]["dice_before"] == pytest.approx((432 / 440 + 1) / 2)
    assert decision["classes"]["two"] == {"label": 2, "dice_before": 1.0, "dice_after": 1.0, "keep_largest": False,
                                          "cases_changed": 0}
    assert read_decision(tmp_path / "eval" / "postprocessing.json") == (1,)


@pytest.mark.parametrize(("content", "found"), [(None, "no such file"), ('{"classes": {}}', "another content"),
                                                ("[1, 2]", "another content")])
def test_a_bad_decision_file_is_refused(tmp_path: Path, content: str | None, found: str) -> None:
    path = tmp_path / "postprocessing.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_decision(path)
    assert str(err.value) == (f"{path}: expected evaluate's postprocessing.json with a list 'largest_component', "
                              f"found {found}")
