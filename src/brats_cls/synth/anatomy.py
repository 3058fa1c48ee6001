"""The anatomy of a phantom: the MNI ICBM152 2009a symmetric template (skull-stripped T1, grey- and
white-matter probability maps, shipped in the ``nilearn`` wheel or in ``$BRATS_CLS_TEMPLATE_DIR``)
resampled into the BraTS grid, and a smooth random warp per case.

* The template is resampled once per process and grid shape (:func:`brats_template`) into the BraTS
  grid, 240 x 240 x 155 voxels of 1 mm, origin (0, -239, 0), direction diag(-1, -1, 1), by an integer
  shift that centres the brain in x and y and cuts three slices of brain stem at the bottom, as in
  BraTS. CSF is the brain mask minus grey and white matter. A smaller ``shape`` keeps 1 mm spacing and
  a BraTS-like origin/direction but scales the brain down so that it fills the grid the same way.
* All per-case work happens in the brain's bounding box plus a margin for the warp, then is placed
  into the grid; this keeps a full-size case near 3 s.
* The warp (:func:`warp`) is a random affine (rotation, scale, shift within :class:`~.style.Style`'s
  ranges), a small elastic field and the tumour's mass effect, applied with SimpleITK.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..io import Geometry

#: The BraTS grid as an array shape ``(D, H, W)``.
BRATS_SHAPE = (155, 240, 240)
#: A small grid (D, H, W) for fast tests: the brain scaled down about 3.5 times, still 1 mm spacing.
SMALL_SHAPE = (48, 64, 64)
#: Where the template's voxel (0, 0, 0) (x, y, z) lands in the full BraTS grid.
_TEMPLATE_OFFSET = (22, 2, -3)
TEMPLATE_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
TEMPLATE_ENV = "BRATS_CLS_TEMPLATE_DIR"
#: nilearn's own brain-mask threshold (0.2 of the template's range).
_BRAIN_THRESHOLD = 0.2 * 255


def brats_geometry(shape: tuple[int, int, int] = BRATS_SHAPE) -> Geometry:
    """BraTS geometry for an array ``shape`` (D, H, W): spacing 1 mm, direction diag(-1, -1, 1),
    origin (0, -(H - 1), 0), i.e. (0, -239, 0) for the real 240 x 240 x 155 grid."""
    depth, height, width = (int(s) for s in shape)
    return Geometry((width, height, depth), (1.0, 1.0, 1.0), (0.0, -(height - 1.0), 0.0),
                    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def template_folder() -> Path:
    """``$BRATS_CLS_TEMPLATE_DIR``, else the data folder of the installed nilearn wheel."""
    if os.environ.get(TEMPLATE_ENV):
        folder = Path(os.environ[TEMPLATE_ENV])
    else:
        try:
            import nilearn
        except ImportError:
            raise ImportError(
                "phantom cases need the MNI template shipped with nilearn, a development dependency: "
                f"pip install -r requirements-dev.txt (or set ${TEMPLATE_ENV} to a folder holding "
                f"{', '.join(TEMPLATE_FILES.values())})") from None
        folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"template folder {folder} lacks the MNI template files {missing}")
    return folder


@dataclass(frozen=True)
class Template:
    """The template in an output grid, cut to ``box`` (the brain's bounding box plus room for the
    warp; all per-case work happens there): a 3-component image (gm, wm, brain) to warp, and what
    tumour placement needs (grey- or white-matter voxels with their depth inside the brain)."""

    image: sitk.Image  # the box only, with its physical position in the grid
    box: tuple[slice, slice, slice]  # (D, H, W) slices of the full grid
    tissue_voxels: np.ndarray  # flat indices, within the box, of voxels with gm + wm > 0.5
    tissue_depth: np.ndarray  # their distance (voxels) to the outside of the brain
    tissue_is_white: np.ndarray  # whether each is mostly white matter

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)


@functools.lru_cache(maxsize=4)
def brats_template(shape: tuple[int, int, int] = BRATS_SHAPE) -> Template:
    """The MNI template resampled into the BraTS-like grid of ``shape``; cached per process."""
    folder = template_folder()
    maps = {name: sitk.ReadImage(str(folder / file), sitk.sitkFloat32) for name, file in TEMPLATE_FILES.items()}
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
    margin = int(np.ceil(20 * voxels_per_mm(shape)))  # the warp moves the brain's edge by up to ~18 mm
    box = tuple(
        slice(max(0, int(np.flatnonzero(mask.any(axis=other)).min()) - margin),
              min(size, int(np.flatnonzero(mask.any(axis=other)).max()) + margin + 1))
        for size, other in zip(shape, ((1, 2), (0, 2), (0, 1)))
    )
    stacked = stacked[box]
    image = sitk.RegionOfInterest(image, [s.stop - s.start for s in box[::-1]], [s.start for s in box[::-1]])
    depth = ndimage.distance_transform_edt(stacked[..., 2] > 0.5)
    tissue = np.flatnonzero((stacked[..., 0] + stacked[..., 1]).ravel() > 0.5)
    white = stacked[..., 1].ravel()[tissue] > stacked[..., 0].ravel()[tissue]
    return Template(image, box, tissue, depth.ravel()[tissue].astype(np.float32), white)


def voxels_per_mm(shape) -> float:
    """How many voxels of ``shape`` span one millimetre of the BraTS brain (1 for the BraTS grid)."""
    return float(np.exp(np.mean(np.log(np.array(shape, float) / np.array(BRATS_SHAPE, float)))))


def smooth_noise(rng: np.random.Generator, shape, cell: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of ``shape`` with features about ``cell`` voxels across."""
    coarse_shape = [max(2, int(np.ceil(s / cell)) + 2) for s in shape]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 0.7, mode="wrap")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-6)
    zoom = [s / c for s, c in zip(shape, coarse_shape)]
    return ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="grid-constant", cval=0.0)[
        tuple(slice(0, s) for s in shape)
    ]


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def warp(template: Template, rng: np.random.Generator, mm: float, centre, mass: float,
         degrees: float = 6.0, scale: float = 0.06, shift_mm: float = 4.0) -> np.ndarray:
    """Warp (gm, wm, brain) by a random smooth displacement; returns the box ``(D, H, W, 3)`` float32.

    The displacement lives on a coarse grid (trilinear between nodes, exact for the affine part) in
    index space (z, y, x); ``mm`` is voxels per millimetre, ``mass`` the mass-effect push in voxels.
    """
    shape = template.shape
    step = max(2, int(round(8 * mm)))
    nodes = [int(np.ceil((s - 1) / step)) + 1 for s in shape]
    grid = np.stack(np.meshgrid(*[np.arange(n) * step for n in nodes], indexing="ij"), axis=-1).astype(float)
    middle = (np.array(shape, float) - 1) / 2
    linear = random_rotation(rng, degrees) * rng.uniform(1 - scale, 1 + scale, 3)
    shift = rng.uniform(-shift_mm, shift_mm, 3) * mm
    displacement = (grid - middle) @ (linear.T - np.eye(3)) + shift  # pull-back: sample at p + d(p)
    elastic = np.stack([smooth_noise(rng, nodes, 2.5) for _ in range(3)], axis=-1)
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


