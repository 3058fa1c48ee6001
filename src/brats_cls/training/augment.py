"""Training augmentation of section 3.1, on one cached case at a time (numpy, CPU).

Order: random crop, random flips, random intensity scale, random intensity shift; the slice targets
are recomputed from the final regions, so a flip along D reverses them and slices cut off by the crop
vanish. Cropping first touches only the voxels that are kept; since the crop offset is uniform, the
distribution is the same as the paper's flip-then-crop.

Decisions where the paper is silent:

* **Uniform random crop** by default (``foreground_probability = 0``): the paper says "random crop",
  and a 128^3 or 96x128x128 crop covers most of a skull-stripped, zero-cropped brain anyway. The
  ``demo`` recipe's 96^3 crop covers only about a quarter of a brain, so it sets a foreground
  probability (see :mod:`brats_cls.training.recipe`): with that probability the crop is placed
  uniformly among the positions that contain one tumour voxel, drawn by first picking one of the
  non-empty regions (WT, TC, ET) uniformly and then one of its voxels uniformly (so the thin ET is not
  drowned by WT), as nnU-Net's oversampling does. A case without tumour always gets a uniform crop.
* Where the volume is smaller than the crop along an axis it is zero-padded (zero is background after
  the z-score) and placed at a random offset inside the crop.
* **Intensity scale and shift per channel**: with probability 0.8 (per sample) every modality gets
  its own factor in [0.9, 1.1]; independently, with probability 0.8 every modality gets its own offset
  in [-0.1, 0.1] (z-score units). Like MONAI's ``RandScaleIntensity(channel_wise=True)``.
* **Foreground only**: scale and shift touch only the voxels nonzero in that channel, so background
  and padding stay exactly 0, the invariant that preprocessing and inference rely on.

The ``wide`` augmentation (models that meet phantoms of other generators) adds, per channel and on
foreground voxels only, a gamma curve (nnU-Net's: rescale to [0, 1], power 0.7-1.5, rescale back),
Gaussian noise (std up to 0.1 z-score units) and a Gaussian blur (0.5-1 voxel), each with its own
probability, and widens the scale and shift ranges to [0.8, 1.2] and [-0.2, 0.2].

The ``shading`` augmentation (the ``demo`` recipe) is ``wide`` plus, with probability 0.5 per sample
and right after the crop, a **bias field** (:class:`brats_cls.shading.BiasField`, its default
distribution: shared and per-channel parts, head- and lobe-sized features, strength up to 0.3 in log
units). The cache holds z-scored images, and a field multiplies raw intensities, so the field is
applied where it belongs: with ``v_c`` the channel's coefficient of variation (raw std / raw mean over
its foreground, kept in the cache's ``meta.json``), a z-score ``z`` is the relative intensity
``1 + v_c z``; that is multiplied by the field and z-scored again with the mean and std of the shaded
whole volume (estimated on every fourth voxel per axis), as preprocessing would z-score a shaded scan.
The field is drawn over the whole volume and evaluated on the crop, so its scales are those of a
brain, not of a crop. A channel whose raw mean is not positive is left unshaded
(docs/design.md#shading-augmentation).

Every random draw comes from the ``numpy.random.Generator`` passed in; the data set seeds it from
(seed, epoch, sample index), so augmentation is reproducible and independent of worker count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..preprocess import foreground_channels
from ..regions import slice_targets
from ..shading import SAMPLE_STEP, BiasField, ShadingDistribution, sample_box


@dataclass(frozen=True)
class Augmentation:
    """Probabilities and ranges of section 3.1 (the defaults are the paper's)."""

    flip_probability: float = 0.5
    scale_range: tuple[float, float] = (0.9, 1.1)
    shift_range: tuple[float, float] = (-0.1, 0.1)
    intensity_probability: float = 0.8
    foreground_probability: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    noise_std_max: float = 0.0
    blur_sigma_range: tuple[float, float] = (0.0, 0.0)
    texture_probability: float = 0.0  # each of gamma, noise and blur, per channel
    bias_probability: float = 0.0  # per sample
    bias: ShadingDistribution = ShadingDistribution()


PAPER_AUGMENTATION = Augmentation()
WIDE_AUGMENTATION = Augmentation(scale_range=(0.8, 1.2), shift_range=(-0.2, 0.2), gamma_range=(0.7, 1.5),
                                 noise_std_max=0.1, blur_sigma_range=(0.5, 1.0), texture_probability=0.2)
SHADING_AUGMENTATION = replace(WIDE_AUGMENTATION, bias_probability=0.5)
AUGMENTATIONS = {"paper": PAPER_AUGMENTATION, "wide": WIDE_AUGMENTATION, "shading": SHADING_AUGMENTATION}
#: Validation and the determinism tests: crops only.
NO_AUGMENTATION = Augmentation(flip_probability=0.0, intensity_probability=0.0)


def crop_windows(
    shape: tuple[int, ...], crop: tuple[int, ...], rng: np.random.Generator,
    contains: tuple[int, ...] | None = None,
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """A uniform random crop of ``crop`` from a volume of ``shape`` (both ``(D, H, W)``); with
    ``contains`` (a voxel index), uniform among the crops that contain that voxel.

    Returns ``(source, target)`` slices: ``out[target] = volume[source]``. Along an axis where the
    volume is smaller than the crop, the whole axis is taken and placed at a random offset.
    """
    source, target = [], []
    for axis, (size, want) in enumerate(zip(shape, crop)):
        if size >= want:
            low, high = 0, size - want
            if contains is not None:
                low, high = max(low, contains[axis] - want + 1), min(high, contains[axis])
            start = int(rng.integers(low, high + 1))
            source.append(slice(start, start + want))
            target.append(slice(0, want))
        else:
            offset = int(rng.integers(0, want - size + 1))
            source.append(slice(0, size))
            target.append(slice(offset, offset + size))
    return tuple(source), tuple(target)


def tumour_voxel(regions: np.ndarray, rng: np.random.Generator) -> tuple[int, ...] | None:
    """A random tumour voxel of ``(3, D, H, W)`` regions: a non-empty region picked uniformly, then
    one of its voxels uniformly; None when every region is empty."""
    present = [index for index in range(regions.shape[0]) if regions[index].any()]
    if not present:
        return None
    voxels = np.flatnonzero(regions[present[int(rng.integers(len(present)))]])
    return tuple(int(i) for i in np.unravel_index(voxels[int(rng.integers(voxels.size))], regions.shape[1:]))


def _crop(image, regions, crop, rng, foreground_probability):
    contains = None
    if foreground_probability > 0 and rng.random() < foreground_probability:
        contains = tumour_voxel(regions, rng)
    source, target = crop_windows(image.shape[1:], crop, rng, contains)
    image_out = np.zeros((image.shape[0], *crop), dtype=np.float32)
    regions_out = np.zeros((regions.shape[0], *crop), dtype=np.uint8)
    image_out[(slice(None), *target)] = image[(slice(None), *source)]
    regions_out[(slice(None), *target)] = regions[(slice(None), *source)]
    return image_out, regions_out, source, target


def random_crop(
    image: np.ndarray, regions: np.ndarray, crop: tuple[int, int, int], rng: np.random.Generator,
    foreground_probability: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``(4, D, H, W)`` image and ``(3, D, H, W)`` regions at the same random place; with
    ``foreground_probability`` the crop contains a tumour voxel (:func:`tumour_voxel`).

    The image comes back float32 (the cache may hold float16), the regions uint8, both as new arrays.
    """
    return _crop(image, regions, crop, rng, foreground_probability)[:2]


def shade(crop: np.ndarray, volume: np.ndarray, source: tuple[slice, ...], target: tuple[slice, ...],
          field: BiasField, variation) -> np.ndarray:
    """Apply ``field`` (drawn for ``volume``'s grid) to ``crop``, the z-scored ``volume[source]`` placed
    at ``target``, through raw intensities (module docstring); in place. ``variation``: per channel,
    raw std / raw mean over the foreground."""
    box = sample_box(volume.shape[1:])
    sample = np.asarray(volume[(slice(None), *box)], dtype=np.float32)
    sample_log = field.log(box)
    crop_log = field.log(source)
    for channel, v in enumerate(variation):
        if not v > 0 or not np.isfinite(v):
            continue
        inside = sample[channel] != 0
        if not inside.any():
            continue
        shaded = (1 + v * sample[channel][inside]) * np.exp(sample_log[channel][inside])
        mean, std = float(shaded.mean()), max(float(shaded.std()), 1e-6)
        values = crop[(channel, *target)]
        foreground = values != 0
        values[foreground] = ((1 + v * values[foreground]) * np.exp(crop_log[channel][foreground]) - mean) / std
        values[foreground & (values == 0)] = np.float32(1e-6)  # a foreground voxel never becomes background
    return crop


def random_shading(crop, volume, source, target, rng: np.random.Generator, augmentation: Augmentation,
                   variation) -> np.ndarray:
    """With ``bias_probability``: a field drawn over ``volume``'s brain, applied by :func:`shade`."""
    if augmentation.bias_probability <= 0 or rng.random() >= augmentation.bias_probability:
        return crop
    if variation is None:
        raise ValueError("the bias-field augmentation needs each channel's raw coefficient of variation "
                         "(the cache's meta.json 'intensity'); rebuild the cache with `brats-cls preprocess`")
    box = sample_box(volume.shape[1:])
    brain = np.any(np.asarray(volume[(slice(None), *box)]) != 0, axis=0)
    field = BiasField(rng, volume.shape[1:], volume.shape[0], brain, augmentation.bias, sample_step=SAMPLE_STEP)
    return shade(crop, volume, source, target, field, variation)


def random_flip(
    image: np.ndarray, regions: np.ndarray, rng: np.random.Generator, probability: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flip both arrays along each spatial axis (D, H, W) independently with ``probability``."""
    axes = tuple(axis for axis in (1, 2, 3) if rng.random() < probability)
    if axes:
        image = np.ascontiguousarray(np.flip(image, axes))
        regions = np.ascontiguousarray(np.flip(regions, axes))
    return image, regions


def random_intensity(image: np.ndarray, rng: np.random.Generator, augmentation: Augmentation) -> np.ndarray:
    """Per-channel scale then shift of the nonzero voxels, each with its probability; in place."""
    channels = image.shape[0]
    scale = np.ones(channels, dtype=np.float32)
    shift = np.zeros(channels, dtype=np.float32)
    if rng.random() < augmentation.intensity_probability:
        scale = rng.uniform(*augmentation.scale_range, size=channels).astype(np.float32)
    if rng.random() < augmentation.intensity_probability:
        shift = rng.uniform(*augmentation.shift_range, size=channels).astype(np.float32)
    for channel in range(channels):
        if scale[channel] == 1 and shift[channel] == 0:
            continue
        values = image[channel]
        foreground = values != 0
        values[foreground] = values[foreground] * scale[channel] + shift[channel]
    return image


def random_texture(image: np.ndarray, rng: np.random.Generator, augmentation: Augmentation) -> np.ndarray:
    """Per channel, each with ``texture_probability``: gamma, noise, blur on the nonzero voxels; in place."""
    from scipy import ndimage

    if augmentation.texture_probability <= 0:
        return image
    for _, values, foreground in foreground_channels(image):
        draws = rng.random(3) < augmentation.texture_probability
        if draws[0]:
            inside = values[foreground]
            low, high = float(inside.min()), float(inside.max())
            if high > low:
                gamma = rng.uniform(*augmentation.gamma_range)
                values[foreground] = ((inside - low) / (high - low)) ** gamma * (high - low) + low
        if draws[1]:
            std = rng.uniform(0.0, augmentation.noise_std_max)
            values[foreground] += rng.normal(0.0, std, int(foreground.sum())).astype(np.float32)
        if draws[2]:
            blurred = ndimage.gaussian_filter(values, rng.uniform(*augmentation.blur_sigma_range))
            values[foreground] = blurred[foreground]
        values[values == 0] = np.float32(1e-6) * foreground[values == 0]  # a foreground voxel never becomes background
    return image


def training_sample(
    image: np.ndarray,
    regions: np.ndarray,
    crop: tuple[int, int, int],
    rng: np.random.Generator,
    augmentation: Augmentation = PAPER_AUGMENTATION,
    variation=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented crop: ``(4, *crop)`` float32 image, ``(3, *crop)`` uint8 regions and
    ``(3, crop_D)`` float32 slice targets recomputed from the cropped, flipped regions. ``variation``
    (per channel, raw std / raw mean) is needed by the bias-field augmentation only."""
    volume = image
    image, regions, source, target = _crop(volume, regions, crop, rng, augmentation.foreground_probability)
    image = random_shading(image, volume, source, target, rng, augmentation, variation)
    image, regions = random_flip(image, regions, rng, augmentation.flip_probability)
    image = random_intensity(image, rng, augmentation)
    image = random_texture(image, rng, augmentation)
    return image, regions, slice_targets(regions)
