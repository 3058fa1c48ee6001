"""Preprocessing shared by training and inference: crop, z-score, pad; and the exact inverse.

The paper "cropped out zero-intensity regions". Decisions where it is silent:

* the crop box is the bounding box of voxels nonzero in *any* modality;
* each modality is z-scored over its own nonzero voxels; zero (background) stays exactly zero;
* the cropped volume is padded with zeros, symmetrically (extra voxel at the end), up to a
  multiple of 16 on each axis, since both networks divide every spatial size by 16;
* **unmasked background** (:func:`clear_background`): a skull-stripped BraTS scan is exactly zero
  outside the brain, about 85 % of its grid, and every step above relies on it. When fewer than
  :data:`MIN_ZERO_FRACTION` of the voxels are zero in every modality (noise or a head around the brain:
  another generator, or a scan that was not skull-stripped), a foreground mask is estimated (each
  modality scaled by its 99th percentile of magnitude, averaged, Otsu's threshold, holes filled, the
  largest component, scikit-image) and the voxels outside it are set to zero first.

:class:`CropBox` keeps what is needed to put a prediction back into the full grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PAD_MULTIPLE = 16
#: Below this share of all-zero voxels the background counts as unmasked (module docstring).
MIN_ZERO_FRACTION = 0.2


@dataclass(frozen=True)
class CropBox:
    """Where the network's volume sits in the original ``(D, H, W)`` grid.

    ``start``/``stop``: the nonzero bounding box in the original grid. ``pad_before``/``pad_after``:
    zeros added around the cropped box to reach a multiple of :data:`PAD_MULTIPLE`.
    """

    full_shape: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    pad_after: tuple[int, int, int]

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(c + a + b for c, a, b in zip(self.cropped_shape, self.pad_before, self.pad_after))

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "CropBox":
        return cls(**{k: tuple(int(x) for x in v) for k, v in values.items()})


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """An estimated foreground of ``(C, D, H, W)`` (module docstring): ``(D, H, W)`` bool."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    scaled = [np.abs(channel) / max(float(np.percentile(np.abs(channel), 99)), 1e-12) for channel in image]
    mean = np.mean(scaled, axis=0)
    mask = mean > threshold_otsu(mean)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))
    components = label(mask, connectivity=1)
    if components.max() > 1:
        mask = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    return mask


def clear_background(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """``image`` with its background set to zero when it is not already (module docstring); returns
    the image and whether it was masked."""
    zero = ~np.any(image != 0, axis=0)
    if zero.mean() >= MIN_ZERO_FRACTION:
        return image, False
    return image * foreground_mask(image)[None], True


def nonzero_box(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box ``(start, stop)`` of voxels nonzero in any channel of a ``(C, D, H, W)`` array."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        raise ValueError("no nonzero voxel: nothing to crop to")
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start.append(int(present[0]))
        stop.append(int(present[-1]) + 1)
    return tuple(start), tuple(stop)


def padding_for(shape: tuple[int, ...], multiple: int = PAD_MULTIPLE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    before, after = [], []
    for size in shape:
        total = (-size) % multiple
        before.append(total // 2)
        after.append(total - total // 2)
    return tuple(before), tuple(after)


def foreground_channels(image: np.ndarray):
    """``(index, channel, nonzero mask)`` for each channel of ``(C, D, H, W)`` with a nonzero voxel:
    zero is background everywhere in this project (skull-stripped input, padding)."""
    for index, values in enumerate(image):
        mask = values != 0
        if mask.any():
            yield index, values, mask


def foreground_statistics(image: np.ndarray) -> dict[str, list[float]]:
    """Per channel of ``(C, D, H, W)``, the mean and std of its nonzero voxels (0 and 0 for an empty
    channel): what :func:`zscore` divides by, kept in the training cache for the bias-field augmentation."""
    means, stds = [0.0] * image.shape[0], [0.0] * image.shape[0]
    for channel, values, mask in foreground_channels(image):
        foreground = values[mask].astype(np.float64)
        means[channel], stds[channel] = float(foreground.mean()), float(foreground.std())
    return {"mean": means, "std": stds}


def zscore(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of ``(C, D, H, W)`` over its nonzero voxels; zeros stay zero. float32."""
    out = np.zeros_like(image, dtype=np.float32)
    for channel, values, mask in foreground_channels(image):
        foreground = values[mask].astype(np.float64)
        std = foreground.std()
        out[channel][mask] = ((foreground - foreground.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def crop_and_pad(volume: np.ndarray, box: CropBox) -> np.ndarray:
    """Crop ``(..., D, H, W)`` to ``box`` and zero-pad it to the padded shape."""
    slices = tuple(slice(a, b) for a, b in zip(box.start, box.stop))
    cropped = volume[(Ellipsis, *slices)]
    widths = [(0, 0)] * (volume.ndim - 3) + list(zip(box.pad_before, box.pad_after))
    return np.pad(cropped, widths)


def preprocess(image: np.ndarray) -> tuple[np.ndarray, CropBox]:
    """``(4, D, H, W)`` raw modalities -> normalised, cropped, padded float32 volume and its CropBox."""
    start, stop = nonzero_box(image)
    cropped_shape = tuple(b - a for a, b in zip(start, stop))
    before, after = padding_for(cropped_shape)
    box = CropBox(tuple(image.shape[1:]), start, stop, before, after)
    slices = tuple(slice(a, b) for a, b in zip(start, stop))
    normalised = zscore(image[(slice(None), *slices)])
    widths = [(0, 0)] + list(zip(before, after))
    return np.pad(normalised, widths), box


def uncrop(volume: np.ndarray, box: CropBox, fill=0) -> np.ndarray:
    """Inverse of :func:`crop_and_pad`: ``(..., d, h, w)`` on the padded grid -> ``(..., D, H, W)``."""
    lead = volume.shape[:-3]
    if tuple(volume.shape[-3:]) != box.padded_shape:
        raise ValueError(f"volume shape {volume.shape[-3:]} is not the padded shape {box.padded_shape}")
    inner = tuple(slice(a, a + c) for a, c in zip(box.pad_before, box.cropped_shape))
    out = np.full(lead + tuple(box.full_shape), fill, dtype=volume.dtype)
    target = tuple(slice(a, b) for a, b in zip(box.start, box.stop))
    out[(Ellipsis, *target)] = volume[(Ellipsis, *inner)]
    return out


def uncrop_slices(slice_values: np.ndarray, box: CropBox, fill=0) -> np.ndarray:
    """``(..., d)`` per-slice values on the padded D axis -> ``(..., D)`` on the original slices."""
    lead = slice_values.shape[:-1]
    out = np.full(lead + (box.full_shape[0],), fill, dtype=slice_values.dtype)
    inner = slice(box.pad_before[0], box.pad_before[0] + box.cropped_shape[0])
    out[..., box.start[0] : box.stop[0]] = slice_values[..., inner]
    return out
