"""Tumours of a phantom case: one to three lesions, each an irregular core with its edema.

Decisions (the paper is silent on phantoms):

* **Lesions**: one (55 %), two (30 %) or three (15 %), at least the sum of their reaches apart, each
  centred in grey or white matter (white matter 70 % of the time) deep enough inside the brain.
* **Core**: one to six random ellipsoid blobs plus smooth noise of drawn strength, thresholded, largest
  component kept (a single blob without noise is a smooth ellipsoid); equivalent radius 3-25 mm
  (log-uniform). A lesion is **small** with probability 0.2: core radius 1.5-4 mm, edema reaching
  0.1-0.8 core radii plus 1-3 mm, a whole tumour of a few hundred to about 2,000 voxels, the size
  that a detector misses and a false positive resembles.
* **Kinds**: ``ring`` (necrotic centre, enhancing rim of irregular 1-5 mm thickness, 55 %), ``solid``
  (enhancing, no necrosis, 15 %), ``nonenhancing`` (non-enhancing core, label 1, no ET, as in low-grade
  glioma, 30 %; its core 1.4 times larger and its edema 0.4 times as far-reaching).
* **Edema** surrounds the core, reaching 0.1-1.6 core radii plus 1-12 mm, further in white matter than
  in grey matter by a drawn factor, never into CSF.

Labels are in the 2021 scheme (1 necrosis / non-enhancing core, 2 edema, 4 enhancing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..regions import EDEMA, NECROSIS, et_label_of
from .anatomy import Template, random_rotation, smooth_noise

ENHANCING = et_label_of("2021")
KINDS = ("ring", "solid", "nonenhancing")
_KIND_PROBABILITIES = (0.55, 0.15, 0.30)
_LESION_COUNTS = (1, 2, 3)
_LESION_PROBABILITIES = (0.55, 0.3, 0.15)
SMALL_PROBABILITY = 0.2


@dataclass(frozen=True)
class Lesion:
    """One lesion's drawn parameters (voxels of the case's grid)."""

    kind: str
    centre: tuple[int, int, int]  # in the template box
    core_radius: float
    edema_extent: float

    @property
    def reach(self) -> float:
        """How far its labels can reach from the centre."""
        return 2.0 * self.core_radius + 1.9 * self.edema_extent + 4


def draw_lesions(rng: np.random.Generator, template: Template, mm: float, kind: str | None,
                 count: int | None) -> list[Lesion]:
    """The lesions of one case (module docstring); ``kind`` / ``count`` force them."""
    count = count or int(rng.choice(_LESION_COUNTS, p=_LESION_PROBABILITIES))
    lesions: list[Lesion] = []
    for _ in range(count * 20):  # a few tries to keep lesions apart
        if len(lesions) == count:
            break
        lesion_kind = kind or KINDS[int(rng.choice(len(KINDS), p=_KIND_PROBABILITIES))]
        small = rng.random() < SMALL_PROBABILITY
        smallest = 3.0 if lesion_kind == "ring" else 1.5
        if small:
            core = max(float(np.exp(rng.uniform(np.log(1.5), np.log(4)))) * mm, smallest)
            edema = rng.uniform(0.1, 0.8) * core + rng.uniform(1, 3) * mm
        else:
            core = max(float(np.exp(rng.uniform(np.log(3), np.log(25)))) * mm, 3.0 if lesion_kind == "ring" else 2.0)
            edema = rng.uniform(0.1, 1.6) * core + rng.uniform(1, 12) * mm
            if lesion_kind == "nonenhancing":  # low-grade glioma: a large core with little edema
                core, edema = 1.4 * core, 0.4 * edema
        centre = _choose_centre(template, rng, core + 4 * mm, white=rng.random() < 0.7)
        candidate = Lesion(lesion_kind, centre, core, edema)
        if all(np.linalg.norm(np.subtract(centre, other.centre)) > 0.6 * (candidate.reach + other.reach)
               for other in lesions):
            lesions.append(candidate)
    return lesions


def _choose_centre(template: Template, rng: np.random.Generator, margin: float, white: bool) -> tuple[int, int, int]:
    """A tissue voxel at least ``margin`` voxels deep inside the brain (the deepest ones if none)."""
    kind = template.tissue_is_white if white else np.ones_like(template.tissue_is_white)
    deep = template.tissue_depth >= margin
    candidates = template.tissue_voxels[deep & kind]
    if candidates.size == 0:
        candidates = template.tissue_voxels[template.tissue_depth >= np.quantile(template.tissue_depth, 0.9)]
    return tuple(int(i) for i in np.unravel_index(candidates[rng.integers(candidates.size)], template.shape))


def lesion_box(lesion: Lesion, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, c - int(lesion.reach)), min(s, c + int(lesion.reach) + 1))
                 for c, s in zip(lesion.centre, shape))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def _core(rng, lesion: Lesion, box, maps, mm: float) -> np.ndarray:
    """The lesion's core inside ``box`` (blobs + noise, thresholded, within the brain)."""
    box_shape = maps.shape[:3]
    local = np.array([c - s.start for c, s in zip(lesion.centre, box)], float)
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in box_shape], indexing="ij"), axis=-1)
    radius = lesion.core_radius
    blobs = np.zeros(box_shape, np.float32)
    for _ in range(int(rng.integers(1, 7))):
        blob_centre = local + np.clip(rng.normal(0, 0.45 * radius, 3), -0.6 * radius, 0.6 * radius)
        relative = (coords - blob_centre) @ random_rotation(rng, 90.0).T / (radius * rng.uniform(0.45, 0.95, 3))
        blobs = np.maximum(blobs, np.exp(-0.5 * np.sum(relative**2, axis=-1)))
    noise = rng.uniform(0.0, 0.25) * smooth_noise(rng, box_shape, max(2.0, 0.6 * radius))
    brain = maps[..., 2] > 0.5
    deep = ndimage.binary_erosion(brain, iterations=max(1, int(round(2 * mm))))
    core = _largest_component((blobs + noise > 0.45) & deep)
    if not core.any():  # the blobs fell outside the brain: keep the centre voxel's neighbourhood
        core = np.zeros(box_shape, bool)
        core[tuple(slice(max(0, int(c) - 1), int(c) + 2) for c in local)] = True
        core &= brain
    return core


def grow_lesion(rng, lesion: Lesion, box, maps, mm: float) -> np.ndarray:
    """Label map (2021 scheme, uint8) of ``box``; ``maps`` = the warped (gm, wm, brain) in ``box``."""
    box_shape = maps.shape[:3]
    core = _core(rng, lesion, box, maps, mm)
    labels = np.zeros(box_shape, np.uint8)
    outside = ndimage.distance_transform_edt(~core)
    gm, wm, brain = maps[..., 0], maps[..., 1], maps[..., 2]
    csf = np.clip(brain - gm - wm, 0, 1)
    wobble = np.clip(1 + 0.3 * smooth_noise(rng, box_shape, max(2.0, 0.5 * lesion.edema_extent)), 0.5, 1.5)
    white_bias = rng.uniform(0.3, 0.9)
    reach = lesion.edema_extent * (1.2 - white_bias + white_bias * wm) * wobble  # at most 1.8 x extent
    whole = _largest_component(((outside < reach) & (brain > 0.5) & (csf < 0.5)) | core)
    labels[whole] = EDEMA
    if lesion.kind == "nonenhancing":
        labels[core] = NECROSIS
        return labels
    labels[core] = ENHANCING
    if lesion.kind == "ring":
        inside = ndimage.distance_transform_edt(core)
        thickness = smooth_noise(rng, box_shape, max(2.0, 0.5 * lesion.core_radius))
        rim = min(rng.uniform(1.0, 5.0) * mm, 0.4 * lesion.core_radius) * (1 + 0.35 * thickness)
        labels[core & (inside > np.maximum(rim, 1.0))] = NECROSIS
    return labels


def merge_labels(existing: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Two lesions' labels in one box: core labels (1, 4) win over edema, the first lesion's over the second's."""
    out = existing.copy()
    take = (new > 0) & ((existing == 0) | ((existing == EDEMA) & (new != EDEMA)))
    out[take] = new[take]
    return out
