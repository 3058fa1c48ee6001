"""Labels <-> regions, nesting and slice targets: known answers in both schemes."""

import numpy as np
import pytest

from brats_cls.regions import convert_scheme, enforce_nesting, labels_to_regions, regions_to_labels, slice_targets


@pytest.mark.parametrize("scheme,et", [("2021", 4), ("2023", 3)])
def test_known_answer_both_schemes(scheme, et):
    labels = np.array([[[0, 1, 2, et]], [[0, 0, 2, 2]]], dtype=np.uint8)  # (D=2, H=1, W=4)
    regions = labels_to_regions(labels, scheme)
    assert regions.shape == (3, 2, 1, 4)
    np.testing.assert_array_equal(regions[0], labels > 0)
    np.testing.assert_array_equal(regions[1], [[[0, 1, 0, 1]], [[0, 0, 0, 0]]])
    np.testing.assert_array_equal(regions[2], [[[0, 0, 0, 1]], [[0, 0, 0, 0]]])
    np.testing.assert_array_equal(regions_to_labels(regions, scheme), labels)
    np.testing.assert_array_equal(slice_targets(regions), [[1, 1], [1, 0], [1, 0]])


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="not in the 2023 scheme"):
        labels_to_regions(np.array([[[4]]], dtype=np.uint8), "2023")


def test_nesting_by_intersection():
    regions = np.zeros((3, 1, 1, 3), dtype=bool)
    regions[2, 0, 0, 0] = True  # ET outside TC and WT: dropped
    regions[1, 0, 0, 1] = True  # TC outside WT: dropped
    regions[:, 0, 0, 2] = True  # properly nested: kept
    nested = enforce_nesting(regions)
    np.testing.assert_array_equal(nested[:, 0, 0], [[0, 0, 1], [0, 0, 1], [0, 0, 1]])


def test_painting_order_overwrites_larger_regions():
    regions = np.ones((3, 1, 1, 1), dtype=bool)
    assert regions_to_labels(regions, "2021")[0, 0, 0] == 4
    regions[2] = False
    assert regions_to_labels(regions, "2023")[0, 0, 0] == 1


def test_convert_scheme():
    labels = np.array([0, 1, 2, 4], dtype=np.uint8)
    np.testing.assert_array_equal(convert_scheme(labels, "2021", "2023"), [0, 1, 2, 3])
