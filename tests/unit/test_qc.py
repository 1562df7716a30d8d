"""Unit tests of medseg.qc: the normalized entropy, and each flag on masks with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg.qc import case_qc, normalized_entropy, touches_edge

LABELS = {0: "background", 1: "a", 2: "b"}


def _mask() -> np.ndarray:
    """A 10^3 box of label 1 and a 5 x 10 x 10 box of label 2, away from the faces of a 20^3 grid."""
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    mask[5:10, 5:15, 5:15] = 2
    return mask


def _qc(mask: np.ndarray, uncertainty: float = 0.1, volume_range: dict | None = None) -> object:
    return case_qc("c", mask, 0.008, LABELS, uncertainty, volume_range=volume_range, volume_tolerance=0.5,
                   max_uncertainty=0.25)  # 2 mm voxels: 0.008 mL


def test_normalized_entropy_known_values() -> None:
    probs = torch.tensor([[1.0, 1 / 3, 0.5], [0.0, 1 / 3, 0.5], [0.0, 1 / 3, 0.0]])  # classes first, 3 voxels
    entropy = normalized_entropy(probs)
    assert entropy.tolist() == pytest.approx([0.0, 1.0, math.log(2) / math.log(3)], abs=1e-6)
    assert normalized_entropy(torch.ones(1, 4)).tolist() == [0.0, 0.0, 0.0, 0.0]  # one class: certain


def test_volumes_in_millilitres_and_no_flags() -> None:
    qc = _qc(_mask(), volume_range={1: (2.0, 6.0), 2: (1.0, 3.0)})
    assert qc.volumes_ml == pytest.approx({"a": 500 * 0.008, "b": 500 * 0.008})
    assert qc.flags == [] and qc.details == {}


def test_empty_mask() -> None:
    qc = _qc(np.zeros((20, 20, 20), dtype=np.uint8))
    assert qc.flags == ["empty"]
    assert qc.volumes_ml == {"a": 0.0, "b": 0.0}


def test_volume_outside_the_widened_training_range() -> None:
    # a: 4 mL against 9-10 mL (the low bound widened by 50% is 4.5): flagged; b: 4 mL within 1-3 mL
    # widened to 4.5: not flagged
    qc = _qc(_mask(), volume_range={1: (9.0, 10.0), 2: (1.0, 3.0)})
    assert qc.flags == ["volume"]
    assert qc.details["volume"] == "a 4 mL outside the training range 9-10 mL"


def test_uncertain_case() -> None:
    qc = _qc(_mask(), uncertainty=0.3)
    assert qc.flags == ["uncertain"]
    assert "0.300 above 0.25" in qc.details["uncertain"]


def test_label_touching_a_face() -> None:
    mask = _mask()
    mask[14:, 5:8, 5:8] = 1  # a arm of label 1 reaching x = 19
    assert touches_edge(mask) == [1]
    qc = _qc(mask)
    assert qc.flags == ["edge"]
    assert qc.details["edge"] == "touching a face of the scan: a"
    flat = np.zeros((20, 20, 1), dtype=np.uint8)
    flat[5:10, 5:10, 0] = 2  # a single slice: its one-voxel axis has no faces to touch
    assert touches_edge(flat) == []


def test_entropy_leaves_the_probabilities_alone() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    normalized_entropy(probs)
    assert probs.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # not clamped in place
