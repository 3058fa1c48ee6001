"""Array axes in the BraTS orientation, whatever the file's direction cosines.

The networks were trained on arrays laid out as BraTS stores them (SimpleITK index axes x, y, z with
direction diag(-1, -1, 1), orientation code ``RAS`` in ITK's DICOMOrient terms): D, the first numpy axis,
is the axial slice axis, and the slice classifier works along it. A file stored another way (another
axis order, such as sagittal slices, or other signs) is brought to that layout by permuting and
flipping axes before the networks (no resampling: every voxel is kept), and the labels are brought
back the same way, so the mask keeps the file's own grid. Decision: the axis whose direction is
closest to each BraTS axis is used (ITK's DICOMOrient rule), so oblique grids are handled like their
nearest axis-aligned layout. Flips alone (``LPS`` files) are covered by the flip TTA and training
augmentation anyway; an axis permutation is what this protects against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .io import Geometry

BRATS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
CANONICAL = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(BRATS_DIRECTION)


@dataclass(frozen=True)
class Orientation:
    """How a file's array axes map to the BraTS layout: ``axes`` (numpy order) and ``flips`` per output axis."""

    code: str
    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_canonical(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """``(..., D, H, W)`` in the file's layout -> the BraTS layout."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + axis for axis in self.axes)))
        flipped = tuple(lead + axis for axis, flip in enumerate(self.flips) if flip)
        return np.ascontiguousarray(np.flip(out, flipped) if flipped else out)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_canonical`."""
        lead = array.ndim - 3
        flipped = tuple(lead + axis for axis, flip in enumerate(self.flips) if flip)
        out = np.flip(array, flipped) if flipped else array
        inverse = np.argsort(self.axes)
        return np.ascontiguousarray(np.transpose(out, (*range(lead), *(lead + int(axis) for axis in inverse))))


def axis_mapping(direction, code: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The numpy axes (in output order) and the flips (per output axis) that bring an array on a grid
    of ``direction`` to ITK orientation ``code``: what SimpleITK's ``DICOMOrient`` does to the image,
    asked of the filter on a tiny probe image and applied to numpy arrays."""
    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation(code)
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    probe.SetDirection(tuple(direction))
    orient.Execute(probe)
    permute = orient.GetPermuteOrder()  # ITK axes (x, y, z): output axis i comes from input axis permute[i]
    flips = orient.GetFlipAxes()  # per output ITK axis
    # numpy axes are ITK's reversed: numpy axis a <-> ITK axis 2 - a
    return tuple(2 - permute[2 - a] for a in range(3)), tuple(bool(flips[2 - a]) for a in range(3))


def orientation_of(geometry: Geometry) -> Orientation:
    """The mapping of a grid with ``geometry`` to the BraTS layout (identity for a BraTS grid)."""
    code = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(geometry.direction)
    if code == CANONICAL:
        return Orientation(code)
    return Orientation(code, *axis_mapping(geometry.direction, CANONICAL))
