"""The per-case QC picture (brats_cls.qc): radiological orientation pinned against SimpleITK's
DICOMOrient, boundaries from scikit-image's find_boundaries, and the written figure read back as
pixels, for a phantom with every region and for a tumour-free phantom (brats_cls.synth, small grid)."""

from __future__ import annotations

import itertools

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
from skimage.segmentation import find_boundaries

from brats_cls.io import Geometry
from brats_cls.qc import REGION_COLOURS, contoured, lps_orientation, view_slices, write_qc_figure
from brats_cls.regions import REGIONS, labels_to_regions, slice_targets
from brats_cls.synth import SMALL_SHAPE, brats_geometry, make_case

GREY_SHADE = (0.75, 0.75, 0.75)  # matplotlib "0.75", the suppressed slices


def signed_permutations():
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            direction = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(permutation, signs)):
                direction[row, column] = sign
            yield tuple(direction.ravel())


def test_lps_orientation_is_simpleitk_dicom_orient_for_every_axis_permutation_and_flip():
    array = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    checked = 0
    for direction in signed_permutations():
        geometry = Geometry((5, 4, 3), (0.5, 1.0, 2.5), (0.0, 0.0, 0.0), direction)
        reference = sitk.DICOMOrient(geometry.apply(sitk.GetImageFromArray(array)), "LPS")
        orientation = lps_orientation(geometry)
        np.testing.assert_array_equal(orientation.volume(array), sitk.GetArrayFromImage(reference))
        assert orientation.spacing == pytest.approx(reference.GetSpacing()[::-1])
        point = (2, 1, 3)
        lps = orientation.index(point, array.shape)
        assert orientation.volume(array)[lps] == array[point]
        checked += 1
    assert checked == 48


def test_views_are_radiological_on_the_brats_grid():
    """On the BraTS grid a larger W index is further right, a larger H index further anterior, a larger
    D index further superior. A marker 3 voxels from the right, 2 from the front and 1 from the top
    must show 3 columns from the image's left, 2 rows from the top in the axial view, and so on."""
    depth, height, width = SMALL_SHAPE
    volume = np.zeros(SMALL_SHAPE, np.uint8)
    point = (depth - 2, height - 3, width - 4)
    volume[point] = 1
    orientation = lps_orientation(brats_geometry(SMALL_SHAPE))
    views = view_slices(orientation.volume(volume), orientation.index(point, SMALL_SHAPE))
    assert np.argwhere(views["axial"]).tolist() == [[2, 3]]  # anterior up, patient's right on the left
    assert np.argwhere(views["coronal"]).tolist() == [[1, 3]]  # superior up, patient's right on the left
    assert np.argwhere(views["sagittal"]).tolist() == [[1, 2]]  # superior up, anterior on the left


def test_contoured_paints_each_region_boundary_in_its_colour_smaller_regions_on_top():
    slice_ = np.full((12, 12), 100.0)
    regions = np.zeros((3, 12, 12), bool)
    regions[0, 1:11, 1:11] = True  # WT
    regions[1, 3:9, 3:9] = True  # TC
    regions[2, 3:9, 3:6] = True  # ET shares TC's left edge
    rgb = contoured(slice_, regions)
    colour_of = {tuple(np.round(rgb[r, c], 6)) for r, c in np.argwhere(find_boundaries(regions[0], mode="inner"))}
    assert colour_of == {REGION_COLOURS["WT"]}
    et_edge = find_boundaries(regions[2], mode="inner")
    tc_only = find_boundaries(regions[1], mode="inner") & ~et_edge
    assert np.all(rgb[et_edge] == REGION_COLOURS["ET"]) and np.all(rgb[tc_only] == REGION_COLOURS["TC"])
    inside = ~(find_boundaries(regions[0], mode="inner") | find_boundaries(regions[1], mode="inner") | et_edge)
    assert np.all(rgb[inside] == rgb[inside][:, :1])  # everything else stays grey
    plain = contoured(slice_, None)  # no regions: a uniform grey slice, nothing painted
    assert np.all(plain == plain[0, 0]) and plain[0, 0, 0] == plain[0, 0, 1] == plain[0, 0, 2]


def _pixels_of(pixels: np.ndarray, colour) -> np.ndarray:
    return np.all(np.abs(pixels - np.asarray(colour)) < 0.02, axis=-1)


def _phantom_inputs(healthy: bool):
    case = make_case(44, 1, healthy=healthy, shape=SMALL_SHAPE, kind=None if healthy else "ring")
    regions = labels_to_regions(case.labels, "2021")
    noise = np.random.default_rng(3).uniform(0.0, 0.3, (3, SMALL_SHAPE[0]))
    probability = np.clip(noise + 0.7 * slice_targets(regions), 0, 1)
    suppressed = np.zeros_like(probability, dtype=bool)
    probability[2, 5:9] = 0.3  # the classifier erased ET on four slices far from the tumour
    suppressed[2, 5:9] = True
    return case, regions, probability, suppressed


def _write(tmp_path, case, regions, probability, suppressed, removed):
    path = tmp_path / "BraTS2021_00001.png"
    write_qc_figure(path, "BraTS2021_00001", case.image[0], case.image[2], regions, probability, suppressed,
                    removed, case.geometry)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # atomic: no temporary left
    return matplotlib.image.imread(path)[..., :3]


def test_qc_figure_of_a_case_with_every_region(tmp_path):
    case, regions, probability, suppressed = _phantom_inputs(healthy=False)
    assert all(regions[i].any() for i in range(3))
    pixels = _write(tmp_path, case, regions, probability, suppressed, {"WT": 12, "TC": 0, "ET": 345})
    views, curves = pixels[: int(0.7 * len(pixels))], pixels[int(0.7 * len(pixels)):]
    for region in ("WT", "ET"):  # a ring tumour: TC's boundary is ET's outer one, ET is drawn on top
        assert _pixels_of(views, REGION_COLOURS[region]).sum() > 40, region
    for region in REGIONS:
        assert _pixels_of(curves, REGION_COLOURS[region]).sum() > 40, region
    unshaded = _write(tmp_path, case, regions, probability, np.zeros_like(suppressed), {})
    shade = _pixels_of(curves, GREY_SHADE).sum() - _pixels_of(unshaded[len(views):], GREY_SHADE).sum()
    assert shade > 500  # the four suppressed ET slices are shaded


def test_qc_figure_of_a_tumour_free_case_has_views_without_boundaries_and_the_curves(tmp_path):
    case, regions, probability, suppressed = _phantom_inputs(healthy=True)
    assert not regions.any()
    pixels = _write(tmp_path, case, regions, probability, suppressed, {"WT": 0, "TC": 0, "ET": 0})
    views, curves = pixels[: int(0.7 * len(pixels))], pixels[int(0.7 * len(pixels)):]
    assert views.std() > 0.1  # the brain is drawn
    for region in REGIONS:
        assert _pixels_of(views, REGION_COLOURS[region]).sum() == 0, region
        assert _pixels_of(curves, REGION_COLOURS[region]).sum() > 40, region


def test_qc_figure_rejects_arrays_of_the_wrong_shape_naming_the_case(tmp_path):
    case, regions, probability, suppressed = _phantom_inputs(healthy=True)
    with pytest.raises(ValueError, match="BraTS2021_00001.*slice_probability"):
        write_qc_figure(tmp_path / "x.png", "BraTS2021_00001", case.image[0], case.image[2], regions,
                        probability[:, :-1], suppressed, {}, case.geometry)
    with pytest.raises(FileNotFoundError):  # an ordinary exception the caller can log, no exit
        write_qc_figure(tmp_path / "missing" / "x.png", "BraTS2021_00001", case.image[0], case.image[2],
                        regions, probability, suppressed, {}, case.geometry)
    assert list(tmp_path.iterdir()) == []
