"""The four modalities of a phantom from its tissue maps and labels, in the case's :class:`~.style.Style`.

Tissue (CSF, grey, white matter) is mixed by the warped probability maps; the tumour classes are
painted with soft (Gaussian-smoothed) borders over it, edema brightest next to the core; then texture,
the case's bias field (:class:`brats_cls.shading.BiasField`, multiplicative, shared by the modalities
in part), optional blur, Rician or Gaussian noise, the case's intensity scale, rounding to integers (at
least 1 inside the brain, exactly 0 outside).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..cases import MODALITIES
from ..regions import EDEMA, NECROSIS
from ..shading import BiasField
from .anatomy import smooth_noise
from .style import CSF, EDEMA as EDEMA_TISSUE, ENHANCING as ENHANCING_TISSUE, GM, NECROSIS as NECROSIS_TISSUE, \
    NONENHANCING, WM, Style
from .tumour import ENHANCING


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


class _TumourPaint:
    """Soft masks of the tumour classes in the tumour's box, over the brain voxels in it."""

    def __init__(self, rng, labels: np.ndarray, low_grade: np.ndarray, brain: np.ndarray, inside: np.ndarray,
                 mm: float):
        shape = labels.shape
        box = ndimage.find_objects((labels > 0).astype(np.uint8))[0]
        box = tuple(slice(max(0, s.start - 3), min(n, s.stop + 3)) for s, n in zip(box, shape))
        box_labels, box_brain = labels[box], brain[box]
        in_box = np.zeros(shape, bool)
        in_box[box] = True
        self.in_box = in_box.ravel()[inside]  # which brain voxels lie in the box, in box C order
        sigma = max(0.5, 0.8 * mm)
        self.whole = _soft(box_labels > 0, sigma)[box_brain]
        self.core = _soft((box_labels == NECROSIS) | (box_labels == ENHANCING), sigma)[box_brain]
        self.necrosis = _soft((box_labels == NECROSIS) & ~low_grade[box], sigma)[box_brain]
        self.enhancing = _soft(box_labels == ENHANCING, sigma)[box_brain]
        distance = ndimage.distance_transform_edt(box_labels == EDEMA)
        self.near_core = np.exp(-distance / max(2.0, 6 * mm)).astype(np.float32)[box_brain]
        self.texture = smooth_noise(rng, box_labels.shape, max(2.0, 3 * mm))[box_brain]

    def paint(self, tissue: np.ndarray, contrast: np.ndarray) -> np.ndarray:
        edema = np.float32(0.15) * tissue + np.float32(0.85) * contrast[EDEMA_TISSUE] * (
            np.float32(0.9) + np.float32(0.1) * self.near_core) * (1 + np.float32(0.06) * self.texture)
        # a core that is not enhancing (necrosis or low-grade core) is painted as non-enhancing tissue,
        # then necrosis and enhancing tumour over it
        painted = (1 - self.whole) * tissue + self.whole * edema
        painted = (1 - self.core) * painted + self.core * contrast[NONENHANCING] * (1 + np.float32(0.1) * self.texture)
        painted = (1 - self.necrosis) * painted + self.necrosis * contrast[NECROSIS_TISSUE] * (
            1 + np.float32(0.08) * self.texture)
        return (1 - self.enhancing) * painted + self.enhancing * contrast[ENHANCING_TISSUE] * (
            1 + np.float32(0.10) * self.texture)


def render(rng: np.random.Generator, maps: np.ndarray, labels: np.ndarray, low_grade: np.ndarray, brain: np.ndarray,
           mm: float, style: Style, field: BiasField) -> np.ndarray:
    """The four modalities ``(4, D, H, W)`` float32, integer-valued, from tissue maps and labels;
    ``low_grade`` marks the label-1 voxels of non-enhancing lesions (painted as non-enhancing tumour,
    the other label-1 voxels as necrosis); ``field`` is the bias field, drawn for this grid."""
    shape = labels.shape
    inside = np.flatnonzero(brain)
    gm, wm = maps[..., 0].ravel()[inside], maps[..., 1].ravel()[inside]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    total = gm + wm + csf
    gm, wm, csf = gm / total, wm / total, csf / total
    log_bias = field.log().reshape(len(MODALITIES), -1)[:, inside]
    texture = smooth_noise(rng, shape, max(2.0, 8 * mm)).ravel()[inside]
    tumour = _TumourPaint(rng, labels, low_grade, brain, inside, mm) if labels.any() else None
    image = np.zeros((len(MODALITIES), *shape), np.float32)
    for channel in range(len(MODALITIES)):
        contrast = style.contrast[channel] * np.exp(rng.normal(0, 0.03, 7)).astype(np.float32)
        values = csf * contrast[CSF] + gm * contrast[GM] + wm * contrast[WM]
        values *= 1 + np.float32(style.texture * rng.choice([-1.0, 1.0])) * texture
        if tumour is not None:
            values[tumour.in_box] = tumour.paint(values[tumour.in_box], contrast)
        values *= np.exp(log_bias[channel])
        image[channel].ravel()[inside] = _noisy(rng, values, contrast[WM], style, brain, inside)
    return image


def _noisy(rng, values: np.ndarray, white: float, style: Style, brain: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Blur (on the brain, in 3-D), noise, scale, integers >= 1."""
    if style.blur > 0:
        volume = np.zeros(brain.shape, np.float32)
        volume.ravel()[inside] = values
        weight = ndimage.gaussian_filter(brain.astype(np.float32), style.blur).ravel()[inside]
        values = ndimage.gaussian_filter(volume, style.blur).ravel()[inside] / np.maximum(weight, 1e-3)
    sigma = np.float32(style.noise * white)
    values = values + sigma * rng.standard_normal(values.size, dtype=np.float32)
    if style.rician:
        imaginary = sigma * rng.standard_normal(values.size, dtype=np.float32)
        values = np.sqrt(values * values + imaginary * imaginary)
    return np.clip(np.round(np.abs(values) * np.float32(style.scale)), 1, np.iinfo(np.int16).max)
