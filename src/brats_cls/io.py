"""Geometry-exact NIfTI input and output through SimpleITK.

Arrays are laid out ``(D, H, W)`` = SimpleITK's ``(z, y, x)``; D is the axial slice axis everywhere in
this project. A label map is written as uint8 carrying the reference image's size, spacing, origin and
direction exactly, through a temporary name that does not end in ``.nii.gz`` and an atomic rename, so
no reader ever sees a partial mask.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .cases import MODALITIES, Case, CaseError

log = logging.getLogger(__name__)

#: Modalities must agree in spacing and origin (mm) and direction cosines to within these tolerances.
SPACING_TOLERANCE = 1e-3
ORIGIN_TOLERANCE = 1e-2
DIRECTION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Geometry:
    """Size ``(x, y, z)``, spacing, origin and direction of an image, as SimpleITK gives them."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(D, H, W)``."""
        return self.size[::-1]

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass
class CaseImages:
    """The four modalities of a case as one float32 array ``(4, D, H, W)`` in MODALITIES order."""

    case: Case
    image: np.ndarray
    geometry: Geometry


def read_image(path: Path, case_id: str) -> sitk.Image:
    """Read one NIfTI file; any failure becomes a CaseError naming the case and the file."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise CaseError(case_id, f"cannot read image: {first_line}", path) from None


def _check_3d(image: sitk.Image, case_id: str, path: Path) -> None:
    if image.GetDimension() != 3:
        raise CaseError(case_id, f"not a 3-D image ({image.GetDimension()}-D, size {image.GetSize()})", path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(case_id, f"not a scalar image ({image.GetNumberOfComponentsPerPixel()} components)", path)


def _check_same_grid(reference: Geometry, other: Geometry, case_id: str, path: Path) -> None:
    if other.size != reference.size:
        raise CaseError(case_id, f"size {other.size} differs from the other modalities' {reference.size}", path)
    checks = (
        ("spacing", other.spacing, reference.spacing, SPACING_TOLERANCE),
        ("origin", other.origin, reference.origin, ORIGIN_TOLERANCE),
        ("direction", other.direction, reference.direction, DIRECTION_TOLERANCE),
    )
    for name, value, expected, tolerance in checks:
        if not np.allclose(value, expected, atol=tolerance, rtol=0):
            raise CaseError(case_id, f"{name} {value} differs from the other modalities' {expected}", path)


def read_case(case: Case) -> CaseImages:
    """Read and check the four modalities of ``case``.

    Raises CaseError for an unreadable or truncated file, an image that is not 3-D scalar, modalities
    that disagree in size, spacing, origin or direction, or a case with no nonzero voxel. Non-finite
    voxels are set to 0 with a warning that names the case.
    """
    arrays = []
    reference: Geometry | None = None
    for name in MODALITIES:
        path = case.modalities[name]
        image = read_image(path, case.case_id)
        _check_3d(image, case.case_id, path)
        geometry = Geometry.of(image)
        if reference is None:
            reference = geometry
        else:
            _check_same_grid(reference, geometry, case.case_id, path)
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        bad = ~np.isfinite(array)
        if bad.any():
            log.warning("case %s: %d non-finite voxels in %s set to 0", case.case_id, int(bad.sum()), path.name)
            array = np.where(bad, np.float32(0), array)
        arrays.append(array)
    stacked = np.stack(arrays)
    if not stacked.any():
        raise CaseError(case.case_id, "no nonzero voxel in any modality", case.folder)
    return CaseImages(case, stacked, reference)


def read_label(path: Path, case_id: str, geometry: Geometry | None = None) -> np.ndarray:
    """Read a label map as a uint8 ``(D, H, W)`` array, checked against ``geometry`` when given."""
    image = read_image(path, case_id)
    _check_3d(image, case_id, path)
    if geometry is not None:
        _check_same_grid(geometry, Geometry.of(image), case_id, path)
    array = sitk.GetArrayFromImage(image)
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255 or np.any(array != np.round(array)):
        raise CaseError(case_id, "label map holds values that are not small non-negative integers", path)
    return array.astype(np.uint8)


def atomic_write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    """Write ``image`` to ``path`` through a temporary file in the same folder and a rename.

    The temporary name ends in ``.tmp`` (never ``.nii.gz``), so a reader that lists the folder never
    takes a half-written file for a result; on any failure (disk full included) it is removed.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(tmp_name)
        writer.SetImageIO("NiftiImageIO")
        writer.SetUseCompression(compress)
        writer.Execute(image)
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def array_to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from a ``(D, H, W)`` array, with ``geometry`` copied exactly."""
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {geometry.shape}")
    return geometry.apply(sitk.GetImageFromArray(array))


def write_label(labels: np.ndarray, geometry: Geometry, path: Path | str) -> None:
    """Write a uint8 label map with the reference geometry, atomically."""
    atomic_write_image(array_to_image(np.ascontiguousarray(labels, dtype=np.uint8), geometry), path)
