"""Crop, z-score, pad, and the exact inverse."""

import numpy as np
import pytest

from brats_cls.preprocess import CropBox, nonzero_box, preprocess, uncrop, uncrop_slices, zscore


def brain_like(shape=(20, 30, 25), seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((4, *shape), dtype=np.float32)
    image[:, 3:17, 5:28, 2:20] = rng.uniform(50, 500, size=(4, 14, 23, 18))
    image[2, 4, 6, 3] = 0.0  # a zero inside the box stays zero
    return image


def test_crop_box_and_padding():
    volume, box = preprocess(brain_like())
    assert box.start == (3, 5, 2) and box.stop == (17, 28, 20)
    assert box.cropped_shape == (14, 23, 18)
    assert all(s % 16 == 0 for s in volume.shape[1:])
    assert volume.shape == (4, *box.padded_shape) == (4, 16, 32, 32)
    assert volume.dtype == np.float32


def test_zscore_over_nonzero_voxels_only():
    image = brain_like()
    normalised = zscore(image)
    for channel in range(4):
        mask = image[channel] != 0
        assert abs(normalised[channel][mask].mean()) < 1e-4
        assert abs(normalised[channel][mask].std() - 1) < 1e-3
        assert np.all(normalised[channel][~mask] == 0)


def test_uncrop_is_the_exact_inverse():
    image = brain_like()
    volume, box = preprocess(image)
    labels = (volume[0] > 0).astype(np.uint8)
    full = uncrop(labels, box)
    assert full.shape == image.shape[1:]
    assert not full[:3].any() and not full[17:].any()
    # Outside the nonzero box nothing is ever predicted; inside, the crop round-trips exactly.
    restored = uncrop(volume, box)
    inner = (slice(None), slice(3, 17), slice(5, 28), slice(2, 20))
    np.testing.assert_array_equal(restored[inner], zscore(image[inner]))
    np.testing.assert_array_equal(uncrop(np.ones(box.padded_shape, bool), box), np.pad(np.ones((14, 23, 18), bool), [(3, 3), (5, 2), (2, 5)]))


def test_uncrop_slices_maps_back_to_original_slices():
    _, box = preprocess(brain_like())
    values = np.arange(box.padded_shape[0], dtype=np.float32)[None]  # (1, 16)
    full = uncrop_slices(values, box, fill=-1)
    assert full.shape == (1, 20)
    assert list(full[0, :3]) == [-1, -1, -1] and list(full[0, 17:]) == [-1, -1, -1]
    assert full[0, 3] == box.pad_before[0]


def test_crop_box_serialises():
    _, box = preprocess(brain_like())
    assert CropBox.from_dict(box.to_dict()) == box


def test_all_zero_image_is_refused():
    with pytest.raises(ValueError):
        nonzero_box(np.zeros((4, 5, 5, 5)))
