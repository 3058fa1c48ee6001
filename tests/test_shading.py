"""The bias field (brats_cls.shading), the bias-field augmentation and the phantoms rendered with it."""

from __future__ import annotations

import numpy as np
import pytest

from brats_cls.preprocess import foreground_statistics, zscore
from brats_cls.shading import BiasField, ShadingDistribution, sample_box
from brats_cls.synth import SMALL_SHAPE, make_case
from brats_cls.training.augment import (SHADING_AUGMENTATION, WIDE_AUGMENTATION, _crop, shade,
                                        training_sample)

SHAPE = (60, 72, 64)


def _brain(shape=SHAPE) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((axis - (s - 1) / 2) / (0.42 * s)) ** 2 for axis, s in zip(grid, shape)) < 1


def _field(seed=0, strength=None, shape=SHAPE, distribution=ShadingDistribution(), channels=4) -> BiasField:
    return BiasField(np.random.default_rng(seed), shape, channels, _brain(shape)[sample_box(shape)], distribution,
                     strength=strength)


def test_field_is_reproducible_bounded_by_its_strength_and_has_zero_mean_on_the_brain():
    brain = _brain()
    first, again, other = _field(3).log(), _field(3).log(), _field(4).log()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.01
    field = _field(5, strength=0.3)
    log = field.log()
    assert log.shape == (4, *SHAPE) and log.dtype == np.float32
    for channel in log:
        # |L| <= s on the brain (normalised on a sample of it, so the bound holds up to what lies between samples)
        assert np.abs(channel[brain]).max() <= 0.3 * 1.05
        assert abs(float(channel[brain].mean())) < 0.05
    # the strongest channel uses most of its allowance
    assert max(np.abs(channel[brain]).max() for channel in log) > 0.15


def test_field_is_smooth_and_a_box_is_the_same_field():
    log = _field(7, strength=0.3).log()
    # neighbouring voxels differ by a tiny fraction of the field's range: no edges, no noise
    for axis in (1, 2, 3):
        assert np.abs(np.diff(log, axis=axis)).max() < 0.02
    box = (slice(10, 42), slice(5, 69), slice(30, 62))
    np.testing.assert_allclose(_field(7, strength=0.3).log(box), log[(slice(None), *box)], atol=1e-5)
    step = (slice(0, 60, 4), slice(0, 72, 4), slice(0, 64, 4))
    np.testing.assert_allclose(_field(7, strength=0.3).log(step), log[(slice(None), *step)], atol=1e-5)


def test_field_is_shared_by_the_channels_in_part_and_a_strength_changes_only_the_amplitude():
    brain = _brain()
    shared = _field(9, strength=0.3, distribution=ShadingDistribution(shared=(1.0, 1.0), gain=(1.0, 1.0))).log()
    for channel in shared[1:]:  # fully shared: one map in every channel
        np.testing.assert_allclose(channel, shared[0], atol=1e-6)
    own = _field(9, strength=0.3, distribution=ShadingDistribution(shared=(0.0, 0.0))).log()
    correlation = np.corrcoef(own[0][brain], own[1][brain])[0, 1]
    assert abs(correlation) < 0.9  # channels of their own
    default = _field(9, strength=0.3).log()
    assert np.corrcoef(default[0][brain], default[1][brain])[0, 1] > 0.3  # mostly shared by default
    weak = _field(9, strength=0.1).log()
    np.testing.assert_allclose(weak * 3, default, atol=1e-5)
    np.testing.assert_array_equal(_field(9, strength=0.0).log(), np.zeros((4, *SHAPE), np.float32))


def test_field_has_lobe_sized_features_as_well_as_head_sized_ones():
    """The correlation of the field with itself 25 mm away: low for the lobe scale, near 1 for the head scale."""
    brain = _brain((120, 120, 120))
    inside = brain[:, :, 25:] & brain[:, :, :-25]

    def correlation_25mm(scale_mm):
        distribution = ShadingDistribution(head_mm=(scale_mm, scale_mm), lobe_mm=(scale_mm, scale_mm))
        values = []
        for seed in range(4):
            log = BiasField(np.random.default_rng(seed), brain.shape, 1, brain[sample_box(brain.shape)],
                            distribution, strength=0.3).log()[0]
            values.append(np.corrcoef(log[:, :, 25:][inside], log[:, :, :-25][inside])[0, 1])
        return np.mean(values)

    assert correlation_25mm(25.0) < 0.8
    assert correlation_25mm(160.0) > 0.95
    default = ShadingDistribution()
    assert default.lobe_mm[0] <= 30 and default.head_mm[1] >= 120  # a few cm to the whole brain


def test_multiply_is_multiplicative_on_the_brain_and_leaves_the_background_zero():
    brain = _brain()
    image = np.where(brain, np.random.default_rng(1).uniform(50, 150, (4, *SHAPE)), 0).astype(np.float32)
    field = _field(11, strength=0.3)
    shaded = field.multiply(image)
    assert np.all(shaded[:, ~brain] == 0) and np.all(shaded[:, brain] > 0)
    np.testing.assert_allclose(shaded[:, brain] / image[:, brain], np.exp(field.log())[:, brain], rtol=1e-5)
    with pytest.raises(ValueError, match="brain sample shape"):
        BiasField(np.random.default_rng(0), SHAPE, 4, brain)
    with pytest.raises(ValueError, match="strength"):
        ShadingDistribution(strength=(0.3, 0.1))


def test_shading_a_zscored_crop_equals_zscoring_the_shaded_scan():
    """The augmentation works on the cache's z-scores; through the raw coefficient of variation it
    gives what preprocessing gives a shaded raw scan (up to the statistics taken on a sample)."""
    brain = _brain()
    rng = np.random.default_rng(2)
    raw = np.where(brain, rng.uniform(40, 160, (4, *SHAPE)), 0).astype(np.float32)
    stats = foreground_statistics(raw)
    variation = [s / m for m, s in zip(stats["mean"], stats["std"])]
    volume = zscore(raw)
    field = _field(13, strength=0.3)
    expected = zscore(field.multiply(raw))
    regions = np.zeros((3, *SHAPE), np.uint8)
    crop, _, source, target = _crop(volume, regions, (32, 32, 32), np.random.default_rng(0), 0.0)
    shaded = shade(crop.copy(), volume, source, target, field, variation)
    truth = expected[(slice(None), *source)]
    error = np.abs(shaded[(slice(None), *target)] - truth)
    unshaded_error = np.abs(crop[(slice(None), *target)] - truth)
    # the mean and std come from every fourth voxel per axis, of white noise here: a few per cent off at most
    assert error.max() < 0.1 and error.mean() < 0.03
    assert unshaded_error.mean() > 5 * error.mean()
    assert np.all((shaded == 0) == (crop == 0))  # background stays exactly background


def test_shading_augmentation_is_drawn_per_sample_reproducibly_and_needs_the_statistics():
    brain = _brain()
    volume = np.where(brain, np.random.default_rng(4).normal(0, 1, (4, *SHAPE)), 0).astype(np.float32)
    regions = np.zeros((3, *SHAPE), np.uint8)
    variation = [0.4, 0.3, 0.35, 0.5]
    always = SHADING_AUGMENTATION.__class__(**{**SHADING_AUGMENTATION.__dict__, "bias_probability": 1.0,
                                               "texture_probability": 0.0, "intensity_probability": 0.0,
                                               "flip_probability": 0.0})
    first = training_sample(volume, regions, (32, 32, 32), np.random.default_rng([1, 2]), always, variation)
    second = training_sample(volume, regions, (32, 32, 32), np.random.default_rng([1, 2]), always, variation)
    np.testing.assert_array_equal(first[0], second[0])
    plain = training_sample(volume, regions, (32, 32, 32), np.random.default_rng([1, 2]),
                            always.__class__(**{**always.__dict__, "bias_probability": 0.0}), variation)
    assert np.abs(first[0] - plain[0]).max() > 0.05
    with pytest.raises(ValueError, match="coefficient of variation"):
        training_sample(volume, regions, (32, 32, 32), np.random.default_rng(0), always, None)
    # the wide augmentation draws no field and so needs no statistics
    training_sample(volume, regions, (32, 32, 32), np.random.default_rng(0), WIDE_AUGMENTATION, None)
    assert SHADING_AUGMENTATION.bias_probability == 0.5 and WIDE_AUGMENTATION.bias_probability == 0.0


def test_phantom_renders_one_case_under_several_strengths_of_one_field():
    none = make_case(31, 2, healthy=False, shape=SMALL_SHAPE, shading_strength=0.0)
    strong = make_case(31, 2, healthy=False, shape=SMALL_SHAPE, shading_strength=0.35)
    mild = make_case(31, 2, healthy=False, shape=SMALL_SHAPE, shading_strength=0.1)
    np.testing.assert_array_equal(none.labels, strong.labels)
    brain = none.image[0] > 0
    assert np.array_equal(strong.image[0] > 0, brain)
    ratios = [case.image[:, brain] / none.image[:, brain] for case in (mild, strong)]
    # the same field at two strengths: log-ratios proportional (noise and rounding aside)
    bright = np.abs(np.log(ratios[1])) > 0.15
    assert bright.any()
    np.testing.assert_allclose(np.median(np.log(ratios[1])[bright] / np.log(ratios[0])[bright]), 3.5, rtol=0.15)
    assert strong.drawn["shading_strength"] == 0.35 and none.drawn["shading_strength"] == 0.0
    drawn = make_case(31, 2, healthy=False, shape=SMALL_SHAPE)
    assert 0.0 <= drawn.drawn["shading_strength"] <= 0.35
    with pytest.raises(ValueError, match="shading strength"):
        make_case(31, 2, shape=SMALL_SHAPE, shading_strength=-0.1)
