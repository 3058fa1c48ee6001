"""Phantom BraTS cases on real anatomy, for tests, the demo and training the shipped weights.

Real BraTS data cannot be downloaded here, so :func:`make_case` builds BraTS-like cases from the MNI
ICBM152 2009a symmetric template (skull-stripped T1, grey- and white-matter probability maps) that ships
inside the ``nilearn`` wheel. nilearn is a development dependency only: it is imported lazily, and a
missing nilearn raises :class:`ImportError` telling the user to ``pip install -r requirements-dev.txt``.

What a case is made of (decisions; the paper is silent on all of it):

* **Anatomy.** The template is resampled once per process and grid shape (:func:`brats_template`) into
  the BraTS grid, 240 x 240 x 155 voxels of 1 mm, origin (0, -239, 0), direction diag(-1, -1, 1), by
  an integer shift that centres the brain in x and y and cuts three slices of brain stem at the bottom,
  as in BraTS. CSF is the brain mask minus grey and white matter. A smaller ``shape`` keeps 1 mm
  spacing and a BraTS-like origin/direction but scales the brain down so that it fills the grid the
  same way (used for fast tests).
* **Work region.** All per-case work (warp, tumour, contrast) happens in the brain's bounding box
  plus a 12 mm margin, then is placed into the grid; this keeps a full-size case near 2 s.
* **Per-case warp.** A smooth random displacement (random affine: +-6 degrees about each axis, +-6 %
  scale, +-4 mm shift; plus a small elastic field and the tumour's mass effect) applied with SimpleITK.
* **Tumour.** An irregular core (a few random ellipsoid blobs plus smooth noise, thresholded, largest
  component kept), centred in white matter well inside the brain, equivalent core radius 4-22 mm. Kinds:
  ``ring`` (necrotic centre, enhancing rim of irregular 1.5-4.5 mm thickness, 55 %), ``solid``
  (enhancing, no necrosis, 15 %), ``nonenhancing`` (non-enhancing core, label 1, no ET, as in low-grade
  glioma, 30 %; its core 1.4 times larger and its edema 0.4 times as far-reaching). Edema surrounds the core and spreads about three times further in white matter than in
  grey matter, never into CSF. A case is healthy (all labels 0) with probability ``healthy_fraction``.
* **Contrast** (relative to white matter; each value jittered per case by about 6 %): FLAIR dark CSF,
  bright edema and non-enhancing core; T1 tumour hypointense; T1ce enhancing rim bright, necrosis dark;
  T2 CSF, edema and necrosis bright. See :data:`CONTRAST`.
* **Nuisances.** Smooth tissue texture, a multiplicative bias field per modality (about +-20 %),
  Rician noise (2-5 % of white matter), and a per-case scale per modality (white matter at 150-1500),
  so a model cannot key on exact values.
* **Storage.** Modalities are int16 (as in BraTS 2021), integer-valued, at least 1 inside the brain and
  exactly 0 outside it; labels uint8. :attr:`PhantomCase.image` holds exactly the values written.

Case ``k``'s content depends only on ``(seed, k)`` (and on whether it is healthy), so cases written
with ``start_index`` extend an earlier set, and the same seed gives the same bytes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import click
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .cases import MODALITIES, SCHEME_SUFFIXES, SEG_SUFFIXES
from .cliutil import shape_callback
from .io import Geometry, array_to_image, atomic_write_image
from .regions import EDEMA, NECROSIS, convert_scheme, et_label_of

log = logging.getLogger(__name__)

#: The BraTS grid as an array shape ``(D, H, W)``.
BRATS_SHAPE = (155, 240, 240)
#: A small grid (D, H, W) for fast tests: the brain scaled down about 3.5 times, still 1 mm spacing.
SMALL_SHAPE = (48, 64, 64)
#: Where the template's voxel (0, 0, 0) (x, y, z) lands in the full BraTS grid.
_TEMPLATE_OFFSET = (22, 2, -3)
_TEMPLATE_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
#: nilearn's own brain-mask threshold (0.2 of the template's range).
_BRAIN_THRESHOLD = 0.2 * 255

ENHANCING_2021 = et_label_of("2021")  # the labels a PhantomCase holds are in the 2021 scheme
DEFAULT_HEALTHY_FRACTION = 0.1
KINDS = ("ring", "solid", "nonenhancing")
_KIND_PROBABILITIES = (0.55, 0.15, 0.30)

#: Mean intensity of each tissue per modality, white matter of T1 ~ 1 (rows in MODALITIES order).
CONTRAST = {
    #          csf   gm    wm    edema necro enh   non-enh core
    "flair": (0.12, 0.80, 0.60, 1.30, 0.70, 1.00, 1.20),
    "t1": (0.22, 0.62, 0.92, 0.55, 0.28, 0.62, 0.48),
    "t1ce": (0.22, 0.64, 0.90, 0.57, 0.25, 1.60, 0.50),
    "t2": (1.45, 0.62, 0.40, 1.10, 1.35, 0.85, 1.05),
}
_CSF, _GM, _WM, _EDEMA, _NECROSIS, _ENHANCING, _NONENHANCING = range(7)


@dataclass
class PhantomCase:
    """One phantom case.

    ``image``: ``(4, D, H, W)`` float32 in :data:`~brats_cls.cases.MODALITIES` order (flair, t1, t1ce,
    t2), integer-valued, 0 outside the brain. ``labels``: ``(D, H, W)`` uint8 in the 2021 scheme
    (1 necrosis / non-enhancing core, 2 edema, 4 enhancing). ``drawn``: what was drawn and what came
    out: ``healthy``, ``kind``, ``tumour``, ``necrosis``, ``enhancing`` (bools for the labels actually
    present) and ``volumes`` (voxels per label class and region).
    """

    seed: int
    index: int
    image: np.ndarray
    labels: np.ndarray
    geometry: Geometry
    drawn: dict = field(default_factory=dict)


def brats_geometry(shape: tuple[int, int, int] = BRATS_SHAPE) -> Geometry:
    """BraTS geometry for an array ``shape`` (D, H, W): spacing 1 mm, direction diag(-1, -1, 1),
    origin (0, -(H - 1), 0), i.e. (0, -239, 0) for the real 240 x 240 x 155 grid."""
    depth, height, width = (int(s) for s in shape)
    return Geometry((width, height, depth), (1.0, 1.0, 1.0), (0.0, -(height - 1.0), 0.0),
                    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def case_id(index: int, naming: str) -> str:
    """``BraTS2021_00001`` (2021 naming) or ``BraTS-GLI-00001-000`` (2023 naming) for index 1."""
    if naming == "2021":
        return f"BraTS2021_{index:05d}"
    if naming == "2023":
        return f"BraTS-GLI-{index:05d}-000"
    raise ValueError(f"unknown naming {naming!r}; expected '2021' or '2023'")


def _template_folder() -> Path:
    try:
        import nilearn
    except ImportError:
        raise ImportError(
            "phantom cases need the MNI template shipped with nilearn, a development dependency: "
            "pip install -r requirements-dev.txt"
        ) from None
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [name for name in _TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn at {folder} lacks the MNI template files {missing}")
    return folder


@dataclass(frozen=True)
class _Template:
    """The template in an output grid, cut to ``box`` (the brain's bounding box plus room for the
    warp; all per-case work happens there): a 3-component image (gm, wm, brain) to warp, and what
    tumour placement needs (white-matter voxels with their depth inside the brain)."""

    image: sitk.Image  # the box only, with its physical position in the grid
    box: tuple[slice, slice, slice]  # (D, H, W) slices of the full grid
    wm_voxels: np.ndarray  # flat indices, within the box, of voxels with wm > 0.5
    wm_depth: np.ndarray  # their distance (voxels) to the outside of the brain

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)


@functools.lru_cache(maxsize=4)
def brats_template(shape: tuple[int, int, int] = BRATS_SHAPE) -> _Template:
    """The MNI template resampled into the BraTS-like grid of ``shape``; cached per process."""
    folder = _template_folder()
    maps = {name: sitk.ReadImage(str(folder / file), sitk.sitkFloat32) for name, file in _TEMPLATE_FILES.items()}
    source = maps["t1"]
    brain = sitk.GetArrayFromImage(source) > _BRAIN_THRESHOLD
    brain = ndimage.binary_fill_holes(brain)
    arrays = [sitk.GetArrayFromImage(maps["gm"]) / 255.0, sitk.GetArrayFromImage(maps["wm"]) / 255.0, brain]
    geometry = brats_geometry(shape)
    # Output index p (x, y, z) -> template index q = S p + q0, S = full / shape (voxel centres aligned).
    scale = np.array(BRATS_SHAPE[::-1], float) / np.array(geometry.size, float)
    q0 = 0.5 * scale - 0.5 - np.array(_TEMPLATE_OFFSET, float)
    components = []
    for array in arrays:
        array = array.astype(np.float32)
        if np.any(scale > 1):  # anti-alias before shrinking
            array = ndimage.gaussian_filter(array, sigma=0.4 * scale[::-1])
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(source)
        components.append(image)
    vector = sitk.Compose(components)
    direction = np.array(source.GetDirection()).reshape(3, 3)
    # Both grids share the direction diag(-1, -1, 1), so the physical map is the same diagonal scaling.
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(np.diag(scale).ravel().tolist())
    affine.SetCenter(geometry.origin)
    affine.SetTranslation((np.array(source.GetOrigin()) + direction @ q0 - np.array(geometry.origin)).tolist())
    reference = geometry.apply(sitk.Image(list(geometry.size), sitk.sitkUInt8))
    image = sitk.Resample(vector, reference, affine, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
    stacked = sitk.GetArrayFromImage(image)  # (D, H, W, 3)
    mask = stacked[..., 2] > 0.01
    margin = int(np.ceil(12 * _voxels_per_mm(shape)))  # the warp moves the brain by up to ~11 mm
    box = tuple(
        slice(max(0, int(np.flatnonzero(mask.any(axis=other)).min()) - margin),
              min(size, int(np.flatnonzero(mask.any(axis=other)).max()) + margin + 1))
        for size, other in zip(shape, ((1, 2), (0, 2), (0, 1)))
    )
    stacked = stacked[box]
    image = sitk.RegionOfInterest(image, [s.stop - s.start for s in box[::-1]], [s.start for s in box[::-1]])
    depth = ndimage.distance_transform_edt(stacked[..., 2] > 0.5)
    wm_voxels = np.flatnonzero(stacked[..., 1] > 0.5)
    return _Template(image, box, wm_voxels, depth.ravel()[wm_voxels].astype(np.float32))


def _voxels_per_mm(shape) -> float:
    """How many voxels of ``shape`` span one millimetre of the BraTS brain (1 for the BraTS grid)."""
    return float(np.exp(np.mean(np.log(np.array(shape, float) / np.array(BRATS_SHAPE, float)))))


def _smooth_noise(rng: np.random.Generator, shape, cell: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of ``shape`` with features about ``cell`` voxels across."""
    coarse_shape = [max(2, int(np.ceil(s / cell)) + 2) for s in shape]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 0.7, mode="wrap")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-6)
    zoom = [s / c for s, c in zip(shape, coarse_shape)]
    return ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="grid-constant", cval=0.0)[
        tuple(slice(0, s) for s in shape)
    ]


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warp(template: _Template, rng: np.random.Generator, mm: float, centre, mass: float) -> np.ndarray:
    """Warp (gm, wm, brain) by a random smooth displacement; returns the box ``(D, H, W, 3)`` float32.

    The displacement lives on a coarse grid (trilinear between nodes, exact for the affine part) in
    index space (z, y, x); ``mm`` is voxels per millimetre, ``mass`` the mass-effect push in voxels.
    """
    shape = template.shape
    step = max(2, int(round(8 * mm)))
    nodes = [int(np.ceil((s - 1) / step)) + 1 for s in shape]
    grid = np.stack(np.meshgrid(*[np.arange(n) * step for n in nodes], indexing="ij"), axis=-1).astype(float)
    middle = (np.array(shape, float) - 1) / 2
    linear = _random_rotation(rng, 6.0) * rng.uniform(0.94, 1.06, 3)
    shift = rng.uniform(-4, 4, 3) * mm
    displacement = (grid - middle) @ (linear.T - np.eye(3)) + shift  # pull-back: sample at p + d(p)
    elastic = np.stack([_smooth_noise(rng, nodes, 2.5) for _ in range(3)], axis=-1)
    displacement += elastic * 1.5 * mm
    if mass > 0:
        offset = grid - np.asarray(centre, float)
        distance = np.linalg.norm(offset, axis=-1, keepdims=True)
        # Pull samples towards the centre: tissue around the tumour looks pushed outwards.
        falloff = np.exp(-((distance / (3 * mass + 1e-6)) ** 2))
        displacement -= offset / np.maximum(distance, 1e-6) * mass * falloff * np.minimum(distance / mass, 1.0)
    physical = displacement[..., ::-1] * np.array([-1.0, -1.0, 1.0])  # (z, y, x) index -> (x, y, z) mm
    field_image = sitk.GetImageFromArray(physical.astype(np.float64), isVector=True)
    field_image.SetSpacing((float(step),) * 3)
    field_image.SetOrigin(template.image.GetOrigin())
    field_image.SetDirection(template.image.GetDirection())
    transform = sitk.DisplacementFieldTransform(field_image)
    warped = sitk.Resample(template.image, template.image, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(warped)


def _draw_kind(rng: np.random.Generator) -> str:
    return KINDS[int(rng.choice(len(KINDS), p=_KIND_PROBABILITIES))]


def _choose_centre(template: _Template, rng: np.random.Generator, margin: float) -> tuple[int, int, int]:
    """A white-matter voxel at least ``margin`` voxels deep inside the brain (the deepest ones if none)."""
    candidates = template.wm_voxels[template.wm_depth >= margin]
    if candidates.size == 0:
        candidates = template.wm_voxels[template.wm_depth >= np.quantile(template.wm_depth, 0.9)]
    return tuple(int(i) for i in np.unravel_index(candidates[rng.integers(candidates.size)], template.shape))


def _box(centre, radius: float, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, c - int(radius)), min(s, c + int(radius) + 1)) for c, s in zip(centre, shape))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def _grow_tumour(rng, kind: str, core_radius: float, edema_extent: float, centre, box, maps, mm: float):
    """Label map (2021 scheme, uint8) of the box around ``centre``; ``maps`` = warped (gm, wm, brain)."""
    box_shape = maps.shape[:3]
    local = np.array([c - s.start for c, s in zip(centre, box)], float)
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in box_shape], indexing="ij"), axis=-1)
    blobs = np.zeros(box_shape, np.float32)
    for _ in range(int(rng.integers(2, 6))):
        blob_centre = local + np.clip(rng.normal(0, 0.45 * core_radius, 3), -0.6 * core_radius, 0.6 * core_radius)
        axes = core_radius * rng.uniform(0.45, 0.95, 3)
        rotation = _random_rotation(rng, 90.0)
        relative = (coords - blob_centre) @ rotation.T / axes
        blobs = np.maximum(blobs, np.exp(-0.5 * np.sum(relative**2, axis=-1)))
    texture = _smooth_noise(rng, box_shape, max(2.0, 0.6 * core_radius))
    brain = maps[..., 2] > 0.5
    deep = ndimage.binary_erosion(brain, iterations=max(1, int(round(2 * mm))))
    core = _largest_component((blobs + 0.12 * texture > 0.45) & deep)
    if not core.any():  # the blobs fell outside the brain: keep the centre voxel's neighbourhood
        core = np.zeros(box_shape, bool)
        core[tuple(slice(max(0, int(c) - 1), int(c) + 2) for c in local)] = True
        core &= brain
    labels = np.zeros(box_shape, np.uint8)
    # Edema: distance from the core, reaching further along white matter and never into CSF.
    outside = ndimage.distance_transform_edt(~core)
    wm, gm = maps[..., 1], maps[..., 0]
    csf = np.clip(maps[..., 2] - gm - wm, 0, 1)
    wobble = np.clip(1 + 0.3 * _smooth_noise(rng, box_shape, max(2.0, 0.5 * edema_extent)), 0.5, 1.5)
    reach = edema_extent * (0.3 + 0.9 * wm) * wobble  # at most 1.8 * edema_extent: inside the box
    edema = (outside < reach) & brain & (csf < 0.5)
    whole = _largest_component(edema | core)
    labels[whole] = EDEMA
    if kind == "nonenhancing":
        labels[core] = NECROSIS
    else:
        labels[core] = ENHANCING_2021
        if kind == "ring":
            inside = ndimage.distance_transform_edt(core)
            rim = min(rng.uniform(1.5, 4.5) * mm, 0.4 * core_radius) * (1 + 0.35 * _smooth_noise(rng, box_shape, max(2.0, 0.5 * core_radius)))
            labels[core & (inside > np.maximum(rim, 1.0))] = NECROSIS
    return labels


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


def is_healthy(seed: int, index: int, healthy_fraction: float) -> bool:
    """Whether case ``index`` of ``seed`` is tumour-free, drawn from its own stream of ``(seed, index)``."""
    return bool(np.random.default_rng([seed, index, 1]).random() < healthy_fraction)


def make_case(
    seed: int,
    index: int,
    healthy: bool | None = None,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    kind: str | None = None,
) -> PhantomCase:
    """Phantom case ``index`` of ``seed`` on a grid of ``shape`` (D, H, W).

    ``healthy`` None draws it with :data:`DEFAULT_HEALTHY_FRACTION` (:func:`is_healthy`); ``kind``
    (one of :data:`KINDS`) forces the tumour kind, None draws it. Everything else is drawn from
    ``(seed, index)`` alone.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown tumour kind {kind!r}; expected one of {KINDS}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes (D, H, W) of at least 16 voxels, got {shape}")
    if healthy is None:
        healthy = is_healthy(seed, index, DEFAULT_HEALTHY_FRACTION)
    rng = np.random.default_rng([seed, index])
    template = brats_template(shape)
    mm = _voxels_per_mm(shape)

    drawn_kind = _draw_kind(rng)
    kind = kind or drawn_kind
    core_radius = max(float(np.exp(rng.uniform(np.log(4), np.log(22)))) * mm, 3.0 if kind == "ring" else 2.0)
    edema_extent = rng.uniform(0.2, 1.3) * core_radius + rng.uniform(2, 10) * mm
    if kind == "nonenhancing":  # low-grade glioma: a large core with little edema
        core_radius, edema_extent = 1.4 * core_radius, 0.4 * edema_extent
    centre = _choose_centre(template, rng, margin=core_radius + 4 * mm)  # within the brain box
    mass = 0.0 if healthy else 0.35 * core_radius
    maps = _warp(template, rng, mm, centre, mass)  # brain box (D, H, W, 3): gm, wm, brain
    brain = maps[..., 2] > 0.5

    box_labels = np.zeros(template.shape, np.uint8)
    if not healthy:
        box = _box(centre, 2.0 * core_radius + 1.9 * edema_extent + 4, template.shape)
        box_labels[box] = _grow_tumour(rng, kind, core_radius, edema_extent, centre, box, maps[box], mm)
    labels = np.zeros(shape, np.uint8)
    labels[template.box] = box_labels
    image = np.zeros((len(MODALITIES), *shape), np.float32)
    image[(slice(None), *template.box)] = _render(rng, maps, box_labels, brain, mm)
    present = set(np.unique(labels).tolist())
    volumes = {
        "necrosis": int(np.count_nonzero(labels == NECROSIS)),
        "edema": int(np.count_nonzero(labels == EDEMA)),
        "enhancing": int(np.count_nonzero(labels == ENHANCING_2021)),
        "WT": int(np.count_nonzero(labels)),
        "TC": int(np.count_nonzero((labels == NECROSIS) | (labels == ENHANCING_2021))),
        "ET": int(np.count_nonzero(labels == ENHANCING_2021)),
        "brain": int(np.count_nonzero(brain)),
    }
    drawn = {
        "healthy": bool(healthy),
        "kind": None if healthy else kind,
        "tumour": bool(present - {0}),
        "necrosis": NECROSIS in present,
        "enhancing": ENHANCING_2021 in present,
        "core_radius_voxels": 0.0 if healthy else core_radius,
        "volumes": volumes,
    }
    return PhantomCase(seed, index, image, labels, brats_geometry(shape), drawn)


def _render(rng: np.random.Generator, maps: np.ndarray, labels: np.ndarray, brain: np.ndarray, mm: float) -> np.ndarray:
    """The four modalities ``(4, D, H, W)`` float32, integer-valued, from tissue maps and labels.

    Tissue is computed only on brain voxels (a flat vector), tumour painting only in the tumour's box.
    """
    shape = labels.shape
    inside = np.flatnonzero(brain)
    gm = maps[..., 0].ravel()[inside]
    wm = maps[..., 1].ravel()[inside]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    total = gm + wm + csf
    gm, wm, csf = gm / total, wm / total, csf / total
    # Bias-field basis: per axis, a linear and a quadratic term of the position in [-1, 1].
    points = np.unravel_index(inside, shape)
    basis = []
    for axis_points, size in zip(points, shape):
        position = (axis_points.astype(np.float32) - (size - 1) / 2) / (size / 2)
        basis += [position, position * position - np.float32(0.3)]
    texture = _smooth_noise(rng, shape, max(2.0, 8 * mm)).ravel()[inside]

    tumour = labels.any()
    if tumour:
        box = ndimage.find_objects((labels > 0).astype(np.uint8))[0]
        box = tuple(slice(max(0, s.start - 3), min(n, s.stop + 3)) for s, n in zip(box, shape))
        box_labels = labels[box]
        box_brain = brain[box]
        in_box = np.zeros(shape, bool)
        in_box[box] = True
        in_box = in_box.ravel()[inside]  # which brain voxels lie in the box, in box C order
        sigma = max(0.5, 0.8 * mm)
        soft_whole = _soft(box_labels > 0, sigma)[box_brain]
        soft_core = _soft((box_labels == NECROSIS) | (box_labels == ENHANCING_2021), sigma)[box_brain]
        soft_necrosis = _soft(box_labels == NECROSIS, sigma)[box_brain]
        core_is_enhancing = bool((box_labels == ENHANCING_2021).any())
        distance = ndimage.distance_transform_edt(box_labels == EDEMA)
        # Edema is brightest next to the core and fades towards its border.
        near_core = np.exp(-distance / max(2.0, 6 * mm)).astype(np.float32)[box_brain]
        tumour_texture = _smooth_noise(rng, box_labels.shape, max(2.0, 3 * mm))[box_brain]

    image = np.zeros((len(MODALITIES), *shape), np.float32)
    for channel, name in enumerate(MODALITIES):
        contrast = (np.array(CONTRAST[name]) * np.exp(rng.normal(0, 0.06, 7))).astype(np.float32)
        values = csf * contrast[_CSF] + gm * contrast[_GM] + wm * contrast[_WM]
        values *= 1 + np.float32(0.04 * rng.choice([-1.0, 1.0])) * texture
        if tumour:
            tissue = values[in_box]
            edema_value = np.float32(0.3) * tissue + np.float32(0.7) * contrast[_EDEMA] * (
                np.float32(0.85) + np.float32(0.15) * near_core) * (1 + np.float32(0.06) * tumour_texture)
            core_value = contrast[_ENHANCING if core_is_enhancing else _NONENHANCING] * (
                1 + np.float32(0.10) * tumour_texture)
            painted = (1 - soft_whole) * tissue + soft_whole * edema_value
            painted = (1 - soft_core) * painted + soft_core * core_value
            painted = (1 - soft_necrosis) * painted + soft_necrosis * contrast[_NECROSIS] * (
                1 + np.float32(0.08) * tumour_texture)
            values[in_box] = painted
        log_bias = np.zeros_like(values)
        for term, coefficient in zip(basis, rng.normal(0, 0.12, len(basis)).astype(np.float32)):
            log_bias += coefficient * term
        scale = np.float32(np.exp(rng.uniform(np.log(150), np.log(1500))))
        sigma_noise = np.float32(rng.uniform(0.02, 0.05)) * contrast[_WM]
        values *= np.exp(log_bias)
        values += sigma_noise * rng.standard_normal(values.size, dtype=np.float32)
        imaginary = sigma_noise * rng.standard_normal(values.size, dtype=np.float32)
        magnitude = np.sqrt(values * values + imaginary * imaginary) * scale  # Rician
        image[channel].ravel()[inside] = np.clip(np.round(magnitude), 1, np.iinfo(np.int16).max)
    return image


def write_case(case: PhantomCase, out: Path | str, naming: str = "2023") -> Path:
    """Write ``case`` as a case folder ``out/<ID>/`` (int16 modalities, uint8 labels); returns the folder."""
    identifier = case_id(case.index, naming)
    folder = Path(out) / identifier
    folder.mkdir(parents=True, exist_ok=True)
    for channel, name in enumerate(MODALITIES):
        image = array_to_image(case.image[channel].astype(np.int16), case.geometry)
        atomic_write_image(image, folder / f"{identifier}{SCHEME_SUFFIXES[naming][name]}.nii.gz")
    labels = convert_scheme(case.labels, "2021", naming) if et_label_of(naming) != ENHANCING_2021 else case.labels
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
) -> list[Path]:
    """Write cases ``start_index .. start_index + n - 1`` of ``seed`` under ``out``; returns their folders.

    A case is healthy when :func:`is_healthy` says so for ``healthy_fraction``, or, when
    ``healthy_indices`` is given, exactly when its index is in it.
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
        folders.append(write_case(make_case(seed, index, healthy=healthy, shape=shape), out, naming))
    return folders


_LABEL_COLOURS = {NECROSIS: (1.0, 0.15, 0.1), EDEMA: (0.1, 0.9, 0.2), 3: (1.0, 0.9, 0.0), ENHANCING_2021: (1.0, 0.9, 0.0)}


def _load_for_preview(source) -> tuple[np.ndarray, np.ndarray, str]:
    if isinstance(source, PhantomCase):
        return source.image, source.labels, f"phantom seed {source.seed} case {source.index}"
    if isinstance(source, (tuple, list)):
        image, labels = source
        return np.asarray(image), np.asarray(labels), ""
    from .cases import find_cases
    from .io import read_case, read_label

    found = find_cases(source)
    if not found.cases:
        problems = "; ".join(str(e) for e in found.errors) or "no BraTS case found"
        raise FileNotFoundError(f"cannot preview {source}: {problems}")
    case = found.cases[0]
    images = read_case(case)
    labels = read_label(case.seg, case.case_id, images.geometry) if case.seg else np.zeros(images.geometry.shape, np.uint8)
    return images.image, labels, case.case_id


def write_preview(source, png_path: Path | str) -> Path:
    """A montage PNG: the four modalities and the labels on the axial slice with most tumour.

    ``source``: a case folder (the first case found in it), a :class:`PhantomCase`, or a pair
    ``(image (4, D, H, W), labels (D, H, W))``. The middle slice is shown when there is no tumour.
    Slices are shown in radiological convention (anterior up, patient's left on the right).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, labels, title = _load_for_preview(source)
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    z = int(per_slice.argmax()) if per_slice.any() else labels.shape[0] // 2

    def view(array):  # SimpleITK (y, x) rows run posterior -> anterior and left -> right
        return array[::-1, ::-1]

    figure, axes = plt.subplots(1, 5, figsize=(15, 3.4), dpi=72)
    for axis, name, channel in zip(axes, ("FLAIR", "T1", "T1ce", "T2"), image):
        brain = channel[z][channel[z] > 0]
        top = np.percentile(brain, 99.5) if brain.size else 1.0
        axis.imshow(view(channel[z]), cmap="gray", vmin=0, vmax=top, interpolation="nearest")
        axis.set_title(name)
    overlay = np.zeros((*labels.shape[1:], 4))
    for value, colour in _LABEL_COLOURS.items():
        overlay[labels[z] == value] = (*colour, 0.55)
    flair = image[0][z]
    axes[4].imshow(view(flair), cmap="gray", vmin=0, vmax=max(1.0, np.percentile(flair[flair > 0], 99.5)) if flair.any() else 1)
    axes[4].imshow(view(overlay), interpolation="nearest")
    axes[4].set_title("labels: necrosis red, edema green, ET yellow", fontsize=8)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(f"{title} axial slice {z}".strip(), fontsize=10)
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path


@click.command("synth")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the case folders.")
@click.option("--cases", "count", type=click.IntRange(min=1), default=1, show_default=True, help="Number of cases.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--naming", type=click.Choice(["2021", "2023"]), default="2023", show_default=True,
              help="2021: BraTS2021_00001_flair.nii.gz, ET=4; 2023: BraTS-GLI-00001-000-t2f.nii.gz, ET=3.")
@click.option("--healthy-fraction", type=click.FloatRange(0, 1), default=DEFAULT_HEALTHY_FRACTION, show_default=True,
              help="Probability that a case has no tumour.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG montage of the first case with a tumour.")
@click.option("--start-index", type=click.IntRange(min=0), default=1, show_default=True,
              help="Index (ID number) of the first case; case k depends only on (seed, k).")
@click.option("--shape", default="155,240,240", show_default=True, callback=shape_callback,
              help="Grid D,H,W; smaller grids scale the brain down (for quick tests).")
def synth_command(out, count, seed, naming, healthy_fraction, preview, start_index, shape) -> None:
    """Write phantom BraTS cases (four modalities and ground truth) on the MNI template anatomy."""
    try:
        folders = write_cases(out, count, seed, naming, healthy_fraction, start_index, shape=shape)
    except ImportError as error:
        raise click.ClickException(str(error)) from None
    if preview is not None:
        from .cases import find_cases
        from .io import read_label

        chosen = folders[0]
        for folder in folders:
            case = find_cases(folder).cases[0]
            if read_label(case.seg, case.case_id).any():
                chosen = folder
                break
        write_preview(chosen, preview)
    click.echo(f"wrote {len(folders)} case(s) to {out}")
