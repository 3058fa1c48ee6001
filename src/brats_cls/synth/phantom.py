"""Phantom BraTS cases on real anatomy, for tests, the demo and training the shipped weights.

Real BraTS data cannot be downloaded here, so :func:`make_case` builds BraTS-like cases: the anatomy of
:mod:`.anatomy`, one to three lesions of :mod:`.tumour`, rendered by :mod:`.render` in a look drawn
widely per case by :mod:`.style` (so that models trained on them meet other generators' phantoms
with some chance). A case is healthy (all labels 0) with probability ``healthy_fraction``.

Storage: modalities are int16 (as in BraTS 2021), integer-valued, at least 1 inside the brain and exactly
0 outside it; labels uint8. :attr:`PhantomCase.image` holds exactly the values written.

Case ``k``'s content depends only on ``(seed, k)`` (and on what is forced: healthy, kind, lesions), so
cases written with ``start_index`` extend an earlier set, and the same seed gives the same bytes. The
bias field's shape is drawn from a stream of its own, ``(seed, k, 3)``, so ``shading_strength``
renders the same case (anatomy, tumour, contrast, noise) under another strength of the same field:
the shading stress test.

:data:`SYNTH_VERSION` 3: bias fields shared by the modalities with lobe-sized features and stronger,
small and multiple lesions more often, non-enhancing cores from edema-like to necrosis-like
(why: docs/design.md#synth-v3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping

import numpy as np

from ..cases import MODALITIES, SCHEME_SUFFIXES, SEG_SUFFIXES
from ..io import Geometry, array_to_image, atomic_write_image
from ..regions import EDEMA, NECROSIS, convert_scheme
from ..shading import BiasField, sample_box
from .anatomy import BRATS_SHAPE, brats_geometry, brats_template, voxels_per_mm, warp
from .render import render
from .style import SHADING, draw_style
from .tumour import ENHANCING, KINDS, draw_lesions, grow_lesion, lesion_box, merge_labels

log = logging.getLogger(__name__)

DEFAULT_HEALTHY_FRACTION = 0.1
#: The generator's version (module docstring); models record which one they were trained on.
SYNTH_VERSION = 3


@dataclass
class PhantomCase:
    """One phantom case.

    ``image``: ``(4, D, H, W)`` float32 in :data:`~brats_cls.cases.MODALITIES` order (flair, t1, t1ce,
    t2), integer-valued, 0 outside the brain. ``labels``: ``(D, H, W)`` uint8 in the 2021 scheme
    (1 necrosis / non-enhancing core, 2 edema, 4 enhancing). ``drawn``: what was drawn and what came
    out: ``healthy``, ``kind`` (of the first lesion), ``kinds``, ``lesions``, ``tumour``, ``necrosis``,
    ``enhancing`` (bools for the labels actually present) and ``volumes`` (voxels per label and region).
    """

    seed: int
    index: int
    image: np.ndarray
    labels: np.ndarray
    geometry: Geometry
    drawn: dict = field(default_factory=dict)


def case_id(index: int, naming: str) -> str:
    """``BraTS2021_00001`` (2021 naming) or ``BraTS-GLI-00001-000`` (2023 naming) for index 1."""
    if naming == "2021":
        return f"BraTS2021_{index:05d}"
    if naming == "2023":
        return f"BraTS-GLI-{index:05d}-000"
    raise ValueError(f"unknown naming {naming!r}; expected '2021' or '2023'")


def is_healthy(seed: int, index: int, healthy_fraction: float) -> bool:
    """Whether case ``index`` of ``seed`` is tumour-free, drawn from its own stream of ``(seed, index)``."""
    return bool(np.random.default_rng([seed, index, 1]).random() < healthy_fraction)


def _check(seed, index, shape, kind, lesions) -> tuple[int, int, int]:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown tumour kind {kind!r}; expected one of {KINDS}")
    if lesions is not None and lesions not in (1, 2, 3):
        raise ValueError(f"lesions must be 1, 2 or 3, got {lesions!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes (D, H, W) of at least 16 voxels, got {shape}")
    return shape


def _tumour_labels(rng, template, lesions, maps, mm) -> tuple[np.ndarray, np.ndarray]:
    """Labels (2021 scheme) of the template box, and the label-1 voxels of non-enhancing lesions."""
    labels = np.zeros(template.shape, np.uint8)
    low_grade = np.zeros(template.shape, bool)
    for lesion in lesions:
        box = lesion_box(lesion, template.shape)
        grown = grow_lesion(rng, lesion, box, maps[box], mm)
        labels[box] = merge_labels(labels[box], grown)
        if lesion.kind == "nonenhancing":
            low_grade[box] |= grown == NECROSIS
    return labels, low_grade & (labels == NECROSIS)


def make_case(seed: int, index: int, healthy: bool | None = None, shape: tuple[int, int, int] = BRATS_SHAPE,
              kind: str | None = None, lesions: int | None = None,
              shading_strength: float | None = None) -> PhantomCase:
    """Phantom case ``index`` of ``seed`` on a grid of ``shape`` (D, H, W).

    ``healthy`` None draws it with :data:`DEFAULT_HEALTHY_FRACTION` (:func:`is_healthy`); ``kind``
    (one of :data:`KINDS`) forces every lesion's kind and ``lesions`` their number (1-3); None draws
    them. ``shading_strength`` (log units, >= 0) replaces the drawn strength of the case's bias field
    and changes nothing else. Everything else is drawn from ``(seed, index)`` alone.
    """
    shape = _check(seed, index, shape, kind, lesions)
    if shading_strength is not None and not 0 <= shading_strength < 2:
        raise ValueError(f"shading strength must lie in [0, 2) (log units), got {shading_strength}")
    if healthy is None:
        healthy = is_healthy(seed, index, DEFAULT_HEALTHY_FRACTION)
    rng = np.random.default_rng([seed, index])
    template = brats_template(shape)
    mm = voxels_per_mm(shape)
    style = draw_style(rng)
    drawn_lesions = [] if healthy else draw_lesions(rng, template, mm, kind, lesions)
    largest = max(drawn_lesions, key=lambda lesion: lesion.core_radius, default=None)
    mass = 0.0 if largest is None else 0.35 * largest.core_radius
    maps = warp(template, rng, mm, largest.centre if largest else (0, 0, 0), mass, style.degrees,
                style.scale_range, style.shift_mm)  # brain box (D, H, W, 3): gm, wm, brain
    brain = maps[..., 2] > 0.5
    box_labels, low_grade = _tumour_labels(rng, template, drawn_lesions, maps, mm)
    labels = np.zeros(shape, np.uint8)
    labels[template.box] = box_labels
    image = np.zeros((len(MODALITIES), *shape), np.float32)
    strength = style.bias if shading_strength is None else float(shading_strength)
    field = BiasField(np.random.default_rng([seed, index, 3]), brain.shape, len(MODALITIES),
                      brain[sample_box(brain.shape)], SHADING, spacing_mm=1.0 / mm, strength=strength)
    image[(slice(None), *template.box)] = render(rng, maps, box_labels, low_grade, brain, mm, style, field)
    drawn = _drawn(labels, brain, healthy, drawn_lesions)
    drawn["shading_strength"] = strength
    return PhantomCase(seed, index, image, labels, brats_geometry(shape), drawn)


def _drawn(labels: np.ndarray, brain: np.ndarray, healthy: bool, lesions) -> dict:
    present = set(np.unique(labels).tolist())
    core = (labels == NECROSIS) | (labels == ENHANCING)
    volumes = {"necrosis": int(np.count_nonzero(labels == NECROSIS)), "edema": int(np.count_nonzero(labels == EDEMA)),
               "enhancing": int(np.count_nonzero(labels == ENHANCING)), "WT": int(np.count_nonzero(labels)),
               "TC": int(np.count_nonzero(core)), "ET": int(np.count_nonzero(labels == ENHANCING)),
               "brain": int(np.count_nonzero(brain))}
    return {"healthy": bool(healthy), "kind": lesions[0].kind if lesions else None,
            "kinds": [lesion.kind for lesion in lesions], "lesions": len(lesions), "tumour": bool(present - {0}),
            "necrosis": NECROSIS in present, "enhancing": ENHANCING in present,
            "core_radius_voxels": max((lesion.core_radius for lesion in lesions), default=0.0), "volumes": volumes}


def write_case(case: PhantomCase, out: Path | str, naming: str = "2023") -> Path:
    """Write ``case`` as a case folder ``out/<ID>/`` (int16 modalities, uint8 labels); returns the folder."""
    identifier = case_id(case.index, naming)
    folder = Path(out) / identifier
    folder.mkdir(parents=True, exist_ok=True)
    for channel, name in enumerate(MODALITIES):
        image = array_to_image(case.image[channel].astype(np.int16), case.geometry)
        atomic_write_image(image, folder / f"{identifier}{SCHEME_SUFFIXES[naming][name]}.nii.gz")
    labels = convert_scheme(case.labels, "2021", naming) if naming != "2021" else case.labels
    atomic_write_image(array_to_image(labels.astype(np.uint8), case.geometry),
                       folder / f"{identifier}{SEG_SUFFIXES[naming]}.nii.gz")
    return folder


def write_cases(
    out: Path | str,
    n: int,
    seed: int,
    naming: str = "2023",
    healthy_fraction: float = DEFAULT_HEALTHY_FRACTION,
    start_index: int = 1,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    healthy_indices: Collection[int] | None = None,
    progress: bool = True,
    forced: Mapping[int, dict] | None = None,
) -> list[Path]:
    """Write cases ``start_index .. start_index + n - 1`` of ``seed`` under ``out``; returns their folders.

    A case is healthy when :func:`is_healthy` says so for ``healthy_fraction``, or, when
    ``healthy_indices`` is given, exactly when its index is in it. ``forced`` maps an index to
    :func:`make_case` keywords (``kind``, ``lesions``) for that case.
    """
    from tqdm import tqdm

    case_id(start_index, naming)  # validates the naming before any work
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy fraction must lie in [0, 1], got {healthy_fraction}")
    if n < 0 or start_index < 0:
        raise ValueError(f"number of cases and start index must be non-negative, got {n} and {start_index}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for index in tqdm(range(start_index, start_index + n), desc="phantom cases", unit="case", disable=not progress):
        if healthy_indices is not None:
            healthy = index in healthy_indices
        else:
            healthy = is_healthy(seed, index, healthy_fraction)
        case = make_case(seed, index, healthy=healthy, shape=shape, **(forced or {}).get(index, {}))
        folders.append(write_case(case, out, naming))
    return folders
