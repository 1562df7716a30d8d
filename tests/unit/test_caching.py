"""Unit tests of medseg.caching: the size of a case, the choice between memory and disk, and the
disk reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.caching import GB, LoadPreprocessed, case_bytes, choose, training_items, validation_cases


def test_case_bytes_counts_float32_channels_and_a_uint8_label() -> None:
    assert case_bytes((10, 20, 30), 1) == 6000 * 5
    assert case_bytes((10, 20, 30), 4) == 6000 * 17


@pytest.mark.parametrize(
    ("mode", "total", "max_gb", "expected", "why"),
    [
        ("auto", 3 * GB, 8.0, "memory", "at most cache_max_gb=8"),
        ("auto", 8 * GB, 8.0, "memory", "at most"),
        ("auto", 8 * GB + 1, 8.0, "disk", "more than cache_max_gb=8"),
        ("disk", 1, 8.0, "disk", "set in the config"),
        ("memory", 100 * GB, 8.0, "memory", "set in the config"),
    ],
)
def test_choose(mode: str, total: int, max_gb: float, expected: str, why: str) -> None:
    chosen, reason = choose(mode, total, max_gb)
    assert chosen == expected
    assert why in reason


def test_disk_items_are_read_when_drawn(tmp_path: Path) -> None:
    image = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    label = (image[0] > 10).astype(np.uint8)
    np.savez(tmp_path / "a.npz", image=image, label=label)
    items = training_items(tmp_path, ["a"], "disk")
    assert items == [{"path": str(tmp_path / "a.npz")}]
    loaded = LoadPreprocessed()(items[0])
    np.testing.assert_array_equal(loaded["image"], image)
    np.testing.assert_array_equal(loaded["label"], label)
    kept = training_items(tmp_path, ["a"], "memory")
    np.testing.assert_array_equal(kept[0]["image"], image)
    assert [c["label"].sum() for c in validation_cases(tmp_path, ["a"], None)] == [label.sum()]
