"""Phantom cases: geometry, naming, labels, determinism, anatomy and contrast, CLI and preview."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from scipy import ndimage

from brats_cls.cases import MODALITIES, find_cases
from brats_cls.cli import main
from brats_cls.io import Geometry, read_case, read_label
from brats_cls.regions import labels_to_regions
from brats_cls.synth import (
    BRATS_SHAPE,
    KINDS,
    SMALL_SHAPE,
    brats_geometry,
    case_id,
    is_healthy,
    make_case,
    write_case,
    write_cases,
    write_preview,
)

BRATS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def batch():
    """Tumour cases 1..12 of seed 5 on the small grid, with their drawn kinds."""
    return [make_case(5, index, healthy=False, shape=SMALL_SHAPE) for index in range(1, 13)]


def test_brats_geometry_is_the_brats_grid():
    geometry = brats_geometry()
    assert geometry == Geometry((240, 240, 155), (1.0, 1.0, 1.0), (0.0, -239.0, 0.0), BRATS_DIRECTION)
    assert geometry.shape == BRATS_SHAPE
    small = brats_geometry(SMALL_SHAPE)
    assert small.size == (64, 64, 48) and small.spacing == (1.0, 1.0, 1.0) and small.direction == BRATS_DIRECTION


def test_full_size_case_has_brats_geometry_and_fills_the_grid(tmp_path):
    case = make_case(3, 1, healthy=False, kind="ring")
    assert case.image.shape == (4, *BRATS_SHAPE) and case.image.dtype == np.float32
    assert case.labels.shape == BRATS_SHAPE and case.labels.dtype == np.uint8
    folder = write_case(case, tmp_path, "2021")
    image = sitk.ReadImage(str(folder / "BraTS2021_00001_t1ce.nii.gz"))
    assert Geometry.of(image) == brats_geometry()
    assert image.GetPixelID() == sitk.sitkInt16
    seg = sitk.ReadImage(str(folder / "BraTS2021_00001_seg.nii.gz"))
    assert Geometry.of(seg) == brats_geometry() and seg.GetPixelID() == sitk.sitkUInt8
    # The brain sits inside the grid as in BraTS: an adult brain volume, margins in x and y.
    brain = case.image[0] > 0
    assert 1.2e6 < brain.sum() < 2.2e6
    rows, columns = np.nonzero(brain.any(axis=0))
    assert 5 <= rows.min() and rows.max() <= 234 and 20 <= columns.min() and columns.max() <= 219
    assert abs((columns.min() + columns.max()) / 2 - 119.5) < 12


def test_same_seed_same_bytes(tmp_path):
    first = write_cases(tmp_path / "a", 2, seed=9, naming="2023", shape=SMALL_SHAPE, progress=False)
    second = write_cases(tmp_path / "b", 2, seed=9, naming="2023", shape=SMALL_SHAPE, progress=False)
    assert [f.name for f in first] == [f.name for f in second]
    for folder_a, folder_b in zip(first, second):
        files = sorted(p.name for p in folder_a.iterdir())
        assert files == sorted(p.name for p in folder_b.iterdir()) and len(files) == 5
        for name in files:
            assert (folder_a / name).read_bytes() == (folder_b / name).read_bytes(), name
    other = make_case(10, 1, healthy=False, shape=SMALL_SHAPE)
    assert not np.array_equal(other.image, make_case(9, 1, healthy=False, shape=SMALL_SHAPE).image)


def test_start_index_extends_an_earlier_set(tmp_path):
    write_cases(tmp_path / "all", 3, seed=4, naming="2021", shape=SMALL_SHAPE, progress=False)
    later = write_cases(tmp_path / "later", 1, seed=4, naming="2021", start_index=3, shape=SMALL_SHAPE,
                        progress=False)
    assert [f.name for f in later] == ["BraTS2021_00003"]
    for suffix in ("flair", "seg"):
        name = f"BraTS2021_00003_{suffix}.nii.gz"
        assert (tmp_path / "all" / "BraTS2021_00003" / name).read_bytes() == (later[0] / name).read_bytes()


@pytest.mark.parametrize("naming, scheme_labels", [("2021", {0, 1, 2, 4}), ("2023", {0, 1, 2, 3})])
def test_naming_and_labels_found_by_find_cases(tmp_path, naming, scheme_labels):
    write_cases(tmp_path, 2, seed=1, naming=naming, shape=SMALL_SHAPE, healthy_indices=set(), progress=False)
    found = find_cases(tmp_path)
    assert not found.errors
    assert [c.case_id for c in found.cases] == [case_id(1, naming), case_id(2, naming)]
    expected = ["BraTS2021_00001", "BraTS2021_00002"] if naming == "2021" else [
        "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    assert [c.case_id for c in found.cases] == expected
    for case in found.cases:
        assert case.scheme == naming and case.seg is not None
        images = read_case(case)
        labels = read_label(case.seg, case.case_id, images.geometry)
        assert set(np.unique(labels).tolist()) <= scheme_labels
        assert {1, 2} <= set(np.unique(labels).tolist())
        labels_to_regions(labels, naming)  # raises on a label foreign to the scheme


def test_written_files_hold_the_case_arrays(tmp_path):
    case = make_case(2, 7, healthy=False, shape=SMALL_SHAPE, kind="ring", lesions=1)
    folder = write_case(case, tmp_path, "2023")
    found = find_cases(folder).cases[0]
    images = read_case(found)
    np.testing.assert_array_equal(images.image, case.image)
    labels = read_label(found.seg, found.case_id)
    np.testing.assert_array_equal(labels, np.where(case.labels == 4, 3, case.labels))


def test_regions_nested_tumour_inside_brain_background_zero(batch):
    for case in batch:
        brain = case.image[0] > 0
        for channel in case.image:  # every modality: 0 exactly outside the brain, >= 1 inside
            assert np.array_equal(channel > 0, brain)
            assert np.all(channel == np.round(channel))
        assert case.drawn["tumour"] and not case.labels[~brain].any()
        assert set(np.unique(case.labels).tolist()) <= {0, 1, 2, 4}
        whole, core, active = labels_to_regions(case.labels, "2021")
        assert np.all(core <= whole) and np.all(active <= core)
        volumes = case.drawn["volumes"]
        assert volumes["WT"] == whole.sum() and volumes["TC"] == core.sum() and volumes["ET"] == active.sum()
        assert case.drawn["enhancing"] == bool(active.any())
        # one connected tumour per lesion at most (lesions may touch)
        assert 1 <= ndimage.label(whole)[1] <= case.drawn["lesions"] == len(case.drawn["kinds"])


def test_batch_spans_kinds_and_sizes(batch):
    kinds = {kind for case in batch for kind in case.drawn["kinds"]}
    assert kinds == set(KINDS)
    assert {case.drawn["lesions"] for case in batch} >= {1, 2}  # several lesions, as the metric needs
    assert any(not case.drawn["enhancing"] for case in batch)  # ET absent, as in low-grade glioma
    assert any(case.drawn["necrosis"] and case.drawn["enhancing"] for case in batch)
    sizes = sorted(case.drawn["volumes"]["WT"] for case in batch)
    assert sizes[-1] > 4 * sizes[0]


def test_forced_kinds_give_their_labels():
    ring = make_case(8, 1, healthy=False, shape=SMALL_SHAPE, kind="ring", lesions=1).drawn
    solid = make_case(8, 1, healthy=False, shape=SMALL_SHAPE, kind="solid", lesions=1).drawn
    low_grade = make_case(8, 1, healthy=False, shape=SMALL_SHAPE, kind="nonenhancing", lesions=1).drawn
    assert ring["necrosis"] and ring["enhancing"]
    assert solid["enhancing"] and not solid["necrosis"]
    assert low_grade["necrosis"] and not low_grade["enhancing"]
    with pytest.raises(ValueError, match="unknown tumour kind"):
        make_case(8, 1, shape=SMALL_SHAPE, kind="meningioma")


def test_healthy_cases_have_no_tumour(tmp_path):
    case = make_case(6, 2, healthy=True, shape=SMALL_SHAPE)
    assert not case.labels.any() and not case.drawn["tumour"] and case.drawn["healthy"]
    assert case.image[0].any()
    folders = write_cases(tmp_path, 4, seed=6, naming="2023", healthy_fraction=1.0, shape=SMALL_SHAPE,
                          progress=False)
    for folder in folders:
        case = find_cases(folder).cases[0]
        assert not read_label(case.seg, case.case_id).any()


def test_healthy_fraction_is_respected_per_index():
    draws = [is_healthy(0, index, 0.3) for index in range(400)]
    assert 0.2 < np.mean(draws) < 0.4
    assert draws == [is_healthy(0, index, 0.3) for index in range(400)]
    assert not any(is_healthy(0, index, 0.0) for index in range(50))


def _tissue_masks(case):
    """White matter far from the tumour, as the generator's contrast defines it (T1 brightest)."""
    brain = case.image[0] > 0
    far = ndimage.distance_transform_edt(case.labels == 0) > 6
    t1 = case.image[1]
    white = brain & far & (t1 > np.percentile(t1[brain], 70))
    return white


def test_contrast_follows_radiological_appearance():
    case = make_case(12, 3, healthy=False, shape=(96, 128, 128), kind="ring", lesions=1)
    flair, t1, t1ce, t2 = case.image
    labels = case.labels
    edema, necrosis, rim = labels == 2, labels == 1, labels == 4
    assert edema.sum() > 50 and necrosis.sum() > 20 and rim.sum() > 20
    white = _tissue_masks(case)
    # CSF: the darkest FLAIR voxels are the brightest on T2.
    brain = flair > 0
    dark_flair = brain & (flair < np.percentile(flair[brain], 5))
    assert t2[dark_flair].mean() > t2[white].mean()
    assert flair[edema].mean() > 1.08 * flair[white].mean()
    assert t2[edema].mean() > t2[white].mean()
    assert t1[edema | necrosis].mean() < t1[white].mean()
    assert t1ce[rim].mean() > 2 * t1ce[necrosis].mean()
    assert t1ce[rim].mean() > t1ce[white].mean()
    assert t2[necrosis].mean() > t2[white].mean()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="naming"):
        write_cases("/nonexistent", 1, seed=0, naming="2019")
    with pytest.raises(ValueError, match="healthy fraction"):
        write_cases("/nonexistent", 1, seed=0, healthy_fraction=1.5)
    with pytest.raises(ValueError, match="shape"):
        make_case(0, 1, shape=(8, 8, 8))


def test_cli_writes_cases_and_preview(tmp_path):
    preview = tmp_path / "preview.png"
    result = CliRunner().invoke(main, [
        "synth", "--out", str(tmp_path / "cases"), "--cases", "2", "--seed", "3", "--naming", "2021",
        "--healthy-fraction", "0", "--start-index", "5", "--shape", "48,64,64", "--preview", str(preview)])
    assert result.exit_code == 0, result.output
    found = find_cases(tmp_path / "cases")
    assert [c.case_id for c in found.cases] == ["BraTS2021_00005", "BraTS2021_00006"]
    assert all(c.scheme == "2021" for c in found.cases) and not found.errors
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "x"), "--shape", "4,4"])
    assert bad.exit_code == 2 and "D,H,W" in bad.output


def test_preview_from_folder_and_arrays(tmp_path, phantom_cases):
    from_folder = write_preview(phantom_cases / "BraTS-GLI-00001-000", tmp_path / "a.png")
    case = make_case(1, 1, healthy=False, shape=SMALL_SHAPE)
    from_arrays = write_preview((case.image, case.labels), tmp_path / "b.png")
    for path in (from_folder, from_arrays):
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="cannot preview"):
        write_preview(tmp_path, tmp_path / "c.png")


def test_fixtures_are_as_documented(phantom_cases, phantom_cases_2021):
    found = find_cases(phantom_cases)
    assert [c.case_id for c in found.cases] == [f"BraTS-GLI-0000{i}-000" for i in (1, 2, 3)]
    label_sets = []
    for case in found.cases:
        images = read_case(case)
        assert images.geometry == brats_geometry(SMALL_SHAPE) and case.scheme == "2023"
        labels = read_label(case.seg, case.case_id, images.geometry)
        label_sets.append(set(np.unique(labels).tolist()))
        if 3 in label_sets[-1]:
            assert (labels == 3).sum() >= 300
    assert label_sets == [{0, 1, 2, 3}, {0, 1, 2, 3}, {0}]
    found = find_cases(phantom_cases_2021)
    assert [c.case_id for c in found.cases] == ["BraTS2021_00001", "BraTS2021_00002"]
    label_sets = [set(np.unique(read_label(c.seg, c.case_id)).tolist()) for c in found.cases]
    assert label_sets == [{0, 1, 2, 4}, {0, 1, 2}]
    assert all(len(MODALITIES) == len(c.paths) for c in found.cases)


def test_several_lesions_and_a_wide_look():
    three = make_case(21, 4, healthy=False, shape=(96, 128, 128), lesions=3)
    assert three.drawn["lesions"] == 3 and len(three.drawn["kinds"]) == 3
    assert ndimage.label(three.labels > 0)[1] >= 2  # separate lesions, for the lesion-wise metrics
    # the look differs from case to case: white-matter intensity scale and FLAIR contrast of edema
    cases = [make_case(22, index, healthy=False, shape=SMALL_SHAPE, lesions=1) for index in range(1, 7)]
    white = [np.median(case.image[1][case.image[1] > np.percentile(case.image[1][case.image[1] > 0], 70)])
             for case in cases]
    assert max(white) > 3 * min(white)
    ratios = []
    for case in cases:
        edema, brain = case.labels == 2, (case.image[0] > 0) & (case.labels == 0)
        ratios.append(case.image[0][edema].mean() / np.median(case.image[0][brain]))
    assert max(ratios) > 1.15 * min(ratios) and min(ratios) > 1.0


def test_v3_draws_small_and_multiple_lesions_and_cores_from_edema_like_to_necrosis_like():
    from brats_cls.synth.anatomy import BRATS_SHAPE, brats_template
    from brats_cls.synth.style import EDEMA, NECROSIS, NONENHANCING, draw_style
    from brats_cls.synth.tumour import draw_lesions

    template = brats_template(BRATS_SHAPE)
    draws = [draw_lesions(np.random.default_rng([5, k]), template, 1.0, None, None) for k in range(300)]
    counts = np.bincount([len(lesions) for lesions in draws], minlength=4)[1:] / len(draws)
    assert counts[1] + counts[2] > 0.3  # two or three lesions in about 45 % of the cases
    radii = np.array([lesion.core_radius for lesions in draws for lesion in lesions])
    assert 0.12 < np.mean(radii <= 4.0) < 0.35  # small lesions (core radius <= 4 mm) about a fifth of the time
    # a case whose lesion is drawn small (make_case draws the style, then the lesions) has a whole
    # tumour under 2,000 voxels
    index = next(k for k in range(1, 200) if draw_lesions(
        (lambda rng: (draw_style(rng), rng)[1])(np.random.default_rng([9, k])), template, 1.0, "solid", 1
    )[0].core_radius <= 4.0)
    small = make_case(9, index, healthy=False, shape=BRATS_SHAPE, kind="solid", lesions=1)
    assert 0 < small.drawn["volumes"]["WT"] < 2000
    # the non-enhancing core's contrast lies between edema's and necrosis's, by one likeness per case
    likeness = []
    for k in range(50):
        contrast = draw_style(np.random.default_rng([3, k])).contrast
        span = contrast[:, NECROSIS] - contrast[:, EDEMA]
        ratio = (contrast[:, NONENHANCING] - contrast[:, EDEMA]) / span
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
        likeness.append(ratio[0])
    assert 0.1 - 1e-6 <= min(likeness) < 0.3 and 0.8 < max(likeness) <= 1 + 1e-6
