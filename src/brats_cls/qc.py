"""A per-case QC picture of what the segmentation and its slice classifier did, and the drawing
helpers that evaluate's overlays share.

``infer --report DIR`` writes ``DIR/<ID>.png`` with :func:`write_qc_figure`:

* top two rows: FLAIR, then T1ce, in three orthogonal views (axial, coronal, sagittal) through the
  centre of the predicted whole tumour (the WT voxel nearest its centroid, so the views cut the
  tumour even when it is not convex), or through the middle of the brain when nothing is predicted;
  the final WT (green), TC (yellow) and ET (red) boundaries drawn on them;
* bottom row: per region, the ensemble's averaged slice-classifier probability along the axial
  axis, the 0.5 line, the slices whose voxels the suppression erased shaded grey, a strip along the
  bottom where the final mask has the region, and a dotted line at the axial slice shown above;
* the voxels removed per region, in the title of each curve.

Views are in radiological orientation: the volume is read in LPS index order, exactly as SimpleITK's
``DICOMOrient(image, "LPS")`` orders it, so an axial view has anterior up and the patient's right on
the image's left. The reorientation is a numpy view (no copy of the volume): only the six slices
shown are ever materialised, which keeps a 240x240x155 case well under a second.

Boundaries are ``skimage.segmentation.find_boundaries`` (pixels of the mask next to its outside,
``mode="inner"``) painted into the slice's pixels, one colour per region, ET over TC over WT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from .io import Geometry, replaced_atomically
from .orientation import axis_mapping
from .predictor import THRESHOLD
from .regions import REGIONS

#: One colour per region (RGB in [0, 1]), shared by every picture of the package.
REGION_COLOURS = {"WT": (0.17, 0.63, 0.17), "TC": (1.0, 0.8, 0.0), "ET": (0.84, 0.15, 0.16)}
VIEWS = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Orientation:
    """How a ``(D, H, W)`` array becomes LPS index order: axes permuted, then some flipped."""

    axes: tuple[int, int, int]  # numpy axes of the source, in the order of the LPS array's axes
    flips: tuple[bool, bool, bool]  # flip of each LPS array axis
    spacing: tuple[float, float, float]  # mm along each LPS array axis (S, P, L)

    def volume(self, array: np.ndarray) -> np.ndarray:
        """The last three axes of ``array`` in LPS order (S, P, L): a view, no copy."""
        lead = tuple(range(array.ndim - 3))
        view = array.transpose(*lead, *(len(lead) + a for a in self.axes))
        flips = tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips)
        return view[(Ellipsis, *flips)]

    def index(self, point: tuple[int, int, int], shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """A voxel index of the source array -> its index in the LPS array."""
        lps = []
        for axis, flip in zip(self.axes, self.flips):
            lps.append(shape[axis] - 1 - point[axis] if flip else point[axis])
        return tuple(lps)


def lps_orientation(geometry: Geometry) -> Orientation:
    """The permutation and flips that SimpleITK's ``DICOMOrient(..., "LPS")`` applies for ``geometry``
    (:func:`brats_cls.orientation.axis_mapping`), with the spacing along each LPS axis."""
    axes, flips = axis_mapping(geometry.direction, "LPS")
    return Orientation(axes, flips, tuple(geometry.spacing[::-1][axis] for axis in axes))


def display_window(slice_: np.ndarray) -> np.ndarray:
    """Intensities scaled to [0, 1] between the 1st and 99th percentiles of the nonzero pixels."""
    slice_ = np.asarray(slice_, dtype=np.float32)
    inside = slice_[slice_ > 0]
    if inside.size == 0:
        return np.zeros_like(slice_)
    low, high = np.percentile(inside, [1, 99])
    return np.clip((slice_ - low) / max(high - low, 1e-6), 0, 1)


def paint_boundaries(rgb: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float]) -> None:
    """Colour, in place, the pixels of ``mask`` that touch its outside (``find_boundaries`` inner)."""
    if mask.any():
        rgb[find_boundaries(mask, mode="inner")] = colour


def contoured(slice_: np.ndarray, regions: np.ndarray | None) -> np.ndarray:
    """``(H, W)`` image + ``(3, H, W)`` regions (WT, TC, ET) or None -> ``(H, W, 3)`` RGB with boundaries."""
    rgb = np.repeat(display_window(slice_)[..., None], 3, axis=2)
    if regions is not None:
        for channel, region in enumerate(REGIONS):
            paint_boundaries(rgb, regions[channel], REGION_COLOURS[region])
    return rgb


def view_slices(volume: np.ndarray, centre: tuple[int, int, int], box=None) -> dict[str, np.ndarray]:
    """The three orthogonal slices through ``centre`` of an LPS-ordered ``(..., S, P, L)`` volume,
    rows and columns as a radiologist reads them (superior up; anterior up / left), cropped to
    ``box`` (``(start, stop)`` per LPS axis; None: the whole volume)."""
    s, p, l = centre
    (s0, s1), (p0, p1), (l0, l1) = box or [(0, n) for n in volume.shape[-3:]]
    return {
        "axial": volume[..., s, p0:p1, l0:l1],  # rows anterior -> posterior, columns right -> left
        "coronal": volume[..., s0:s1, p, l0:l1][..., ::-1, :],  # rows superior -> inferior, columns right -> left
        "sagittal": volume[..., s0:s1, p0:p1, l][..., ::-1, :],  # rows superior -> inferior, columns anterior -> posterior
    }


def view_aspects(spacing: tuple[float, float, float]) -> dict[str, float]:
    """Height / width of one pixel of each view, from the LPS spacing (S, P, L)."""
    s, p, l = spacing
    return {"axial": p / l, "coronal": s / l, "sagittal": s / p}


def _extent(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """``(first, last + 1)`` of ``mask`` along each axis, or None when it is empty."""
    extent = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        extent.append((int(present[0]), int(present[-1]) + 1))
    return extent


def _centre(whole: np.ndarray, brain_extent: list[tuple[int, int]] | None) -> tuple[int, int, int]:
    """The WT voxel nearest the WT centroid; else the centre of the brain's box; else the array's."""
    points = np.argwhere(whole)
    if points.size:
        nearest = np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1))
        return tuple(int(v) for v in points[nearest])
    if brain_extent is not None:
        return tuple((low + high - 1) // 2 for low, high in brain_extent)
    return tuple(s // 2 for s in whole.shape)


def _lps_box(extent, orientation: Orientation, shape, margin: int = 4) -> list[tuple[int, int]] | None:
    """A source-array extent (plus ``margin`` voxels) as ``(start, stop)`` along each LPS axis."""
    if extent is None:
        return None
    box = []
    for axis, flip in zip(orientation.axes, orientation.flips):
        low, high = max(extent[axis][0] - margin, 0), min(extent[axis][1] + margin, shape[axis])
        box.append((shape[axis] - high, shape[axis] - low) if flip else (low, high))
    return box


def _check_inputs(case_id, flair, t1ce, regions, slice_probability, suppressed, geometry) -> None:
    shape = tuple(geometry.shape)
    expected = {"flair": (flair, shape), "t1ce": (t1ce, shape), "regions": (regions, (len(REGIONS), *shape)),
                "slice_probability": (slice_probability, (len(REGIONS), shape[0])),
                "suppressed": (suppressed, (len(REGIONS), shape[0]))}
    for name, (array, wanted) in expected.items():
        if np.shape(array) != wanted:
            raise ValueError(f"case {case_id}: QC figure: {name} has shape {np.shape(array)}, expected {wanted}")


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``(first, last)`` index of each run of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def _draw_views(figure, grid, panels: dict[str, np.ndarray], row: int, aspects: dict[str, float], name: str) -> None:
    for column, view in enumerate(VIEWS):
        axes = figure.add_subplot(grid[row, column])
        axes.imshow(panels[view], interpolation="nearest", aspect=aspects[view])
        axes.set_title(f"{name} {view}", fontsize=9)
        axes.set(xticks=[], yticks=[])  # no tick objects to lay out: a third of the drawing time
        axes.set_axis_off()


def _draw_curve(axes, region: str, probability, suppressed, present, shown_slice: int, removed: int) -> None:
    slices = np.arange(probability.shape[0])
    for first, last in _runs(suppressed):
        axes.axvspan(first - 0.5, last + 0.5, color="0.75", linewidth=0)
    axes.fill_between(slices, -0.02, 0.04, where=present, step="mid", color=REGION_COLOURS[region], linewidth=0)
    axes.plot(slices, probability, color=REGION_COLOURS[region], linewidth=1.2)
    axes.axhline(THRESHOLD, color="black", linestyle="--", linewidth=0.8)
    axes.axvline(shown_slice, color="0.3", linestyle=":", linewidth=0.8)
    axes.set_xlim(-0.5, probability.shape[0] - 0.5)
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(f"{region}: {removed} voxels removed", fontsize=9)
    axes.set_xlabel("axial slice (array index)", fontsize=8)
    axes.tick_params(labelsize=7)


def write_qc_figure(
    path: Path | str,
    case_id: str,
    flair: np.ndarray,
    t1ce: np.ndarray,
    regions: np.ndarray,
    slice_probability: np.ndarray,
    suppressed: np.ndarray,
    removed: dict[str, int],
    geometry: Geometry,
) -> None:
    """Write the QC picture of one case to ``path`` (PNG, atomically; module docstring for the layout).

    ``flair``, ``t1ce``: ``(D, H, W)`` on the case's grid (SimpleITK array order, D axial).
    ``regions``: final ``(3, D, H, W)`` bool in channel order (WT, TC, ET). ``slice_probability``:
    ``(3, D)`` in [0, 1]. ``suppressed``: ``(3, D)`` bool, slices the classifier erased.
    ``removed``: voxels removed by suppression per region name. Raises ValueError (naming the case)
    for arrays of the wrong shape; never exits.
    """
    from matplotlib.figure import Figure

    _check_inputs(case_id, flair, t1ce, regions, slice_probability, suppressed, geometry)
    regions = np.asarray(regions, dtype=bool)
    brain_extent = _extent((flair > 0) | (t1ce > 0) | regions[0])
    centre = _centre(regions[0], brain_extent)
    orientation = lps_orientation(geometry)
    lps_centre = orientation.index(centre, flair.shape)
    box = _lps_box(brain_extent, orientation, flair.shape)  # crop the background: larger pictures
    region_views = view_slices(orientation.volume(regions), lps_centre, box) if regions.any() else None
    aspects = view_aspects(orientation.spacing)

    figure = Figure(figsize=(9, 8.4), dpi=100)
    grid = figure.add_gridspec(3, 3, height_ratios=(1, 1, 0.62))
    for row, (name, volume) in enumerate((("FLAIR", flair), ("T1ce", t1ce))):
        slices = view_slices(orientation.volume(volume), lps_centre, box)
        panels = {view: contoured(slices[view], None if region_views is None else region_views[view])
                  for view in VIEWS}
        _draw_views(figure, grid, panels, row, aspects, name)
    present = regions.reshape(len(REGIONS), regions.shape[1], -1).any(axis=2)
    for column, region in enumerate(REGIONS):
        channel = REGIONS.index(region)
        _draw_curve(figure.add_subplot(grid[2, column]), region, np.asarray(slice_probability[channel]),
                    np.asarray(suppressed[channel], dtype=bool), present[channel], centre[0],
                    int(removed.get(region, 0)))
    where = "the WT centre" if regions[0].any() else "the brain's centre (no tumour predicted)"
    removed_text = ", ".join(f"{r} {int(removed.get(r, 0))}" for r in REGIONS)
    figure.suptitle(f"{case_id}: final WT / TC / ET boundaries (green / yellow / red), views through {where}, "
                    f"radiological (LPS)\nvoxels removed by the slice classifier: {removed_text}; "
                    f"grey: suppressed slices, dashed: 0.5", fontsize=9)
    figure.subplots_adjust(left=0.05, right=0.98, top=0.91, bottom=0.07, hspace=0.3, wspace=0.12)
    with replaced_atomically(path) as handle:
        figure.savefig(handle, format="png")
