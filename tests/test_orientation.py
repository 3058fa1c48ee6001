"""Inputs stored another way than BraTS stores them: other axis layouts, an unmasked background."""

import itertools
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from scipy import ndimage

from brats_cls.cases import find_cases
from brats_cls.cli import main
from brats_cls.io import Geometry
from brats_cls.orientation import CANONICAL, orientation_of
from brats_cls.preprocess import clear_background
from brats_cls.synth import make_case
from helpers import labels_of
from test_inference import make_weights


def _direction(permutation, signs) -> tuple[float, ...]:
    matrix = np.zeros((3, 3))
    for column, row in enumerate(permutation):
        matrix[row, column] = signs[column]
    return tuple(matrix.ravel())


def test_every_axis_layout_maps_to_the_brats_layout_as_sitk_dicomorient_does():
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            image = sitk.GetImageFromArray(array)
            image.SetDirection(_direction(permutation, signs))
            expected = sitk.GetArrayFromImage(sitk.DICOMOrient(image, CANONICAL))
            orientation = orientation_of(Geometry.of(image))
            np.testing.assert_array_equal(orientation.to_canonical(array), expected)
            np.testing.assert_array_equal(orientation.from_canonical(orientation.to_canonical(array)), array)
            np.testing.assert_array_equal(orientation.to_canonical(array[None])[0], expected)
    brats = Geometry((7, 6, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    assert orientation_of(brats).is_canonical


def _rewrite(case_folder, out_folder, transform):
    """Copy a case, each file's array and geometry passed through ``transform(image) -> image``."""
    out_folder.mkdir(parents=True)
    for path in case_folder.iterdir():
        sitk.WriteImage(transform(sitk.ReadImage(str(path))), str(out_folder / path.name))


def _sagittal(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with its axes in another order (z, x, y): a permuted layout."""
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    permuted = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (1, 2, 0))))  # (y, x, z)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    permuted.SetDirection(tuple(direction[:, [2, 0, 1]].ravel()))  # new index axes (z, x, y)
    permuted.SetSpacing((spacing[2], spacing[0], spacing[1]))
    permuted.SetOrigin(image.GetOrigin())
    return permuted


def test_a_case_stored_in_another_axis_order_gets_the_same_mask(tmp_path, phantom_cases):
    weights = make_weights(tmp_path / "w")
    case = find_cases(phantom_cases).cases[0]
    _rewrite(case.folder, tmp_path / "permuted" / case.case_id, _sagittal)
    for name in ("plain", "permuted"):
        (tmp_path / f"out-{name}").mkdir()
    source = {"plain": case.folder.parent, "permuted": tmp_path / "permuted"}
    for name, folder in source.items():
        result = CliRunner().invoke(main, ["infer", "--input", str(folder), "--output", str(tmp_path / f"out-{name}"),
                                           "--weights", str(weights), "--no-tta", "--quiet", "--models", "bifpn"])
        assert result.exit_code == 0, result.output
    plain = labels_of(tmp_path / "out-plain" / case.output_name)
    permuted_image = sitk.ReadImage(str(tmp_path / "out-permuted" / case.output_name))
    reference = sitk.ReadImage(str(tmp_path / "permuted" / case.case_id / case.modalities["flair"].name))
    assert Geometry.of(permuted_image) == Geometry.of(reference)  # the file's own grid
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(permuted_image), (2, 0, 1)), plain)
    assert plain.any()


def test_an_unmasked_background_is_cleared_before_the_networks(tmp_path):
    case = make_case(3, 1, healthy=False, shape=(64, 80, 80), lesions=1)
    brain = case.image[0] > 0
    noise = np.abs(np.random.default_rng(1).normal(0, 0.05 * np.median(case.image[case.image > 0]), case.image.shape))
    image, cleared = clear_background(case.image + noise.astype(np.float32))
    kept = image[0] > 0
    assert cleared and (kept & brain).sum() > 0.99 * brain.sum() and (kept & ~brain).sum() < 0.01 * brain.sum()
    assert clear_background(case.image)[1] is False  # a skull-stripped input is left alone
    assert clear_background(case.image)[0] is case.image


@pytest.mark.parametrize("clear", [True, False])
def test_masks_stay_inside_the_brain_box_when_the_background_is_noise(tmp_path, phantom_cases, clear, monkeypatch):
    weights = make_weights(tmp_path / "w")
    case = find_cases(phantom_cases).cases[0]
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(case.modalities["flair"]))) > 0
    rng = np.random.default_rng(2)

    def add_noise(image):  # Rician-like background noise at 5 % of the brain's median intensity
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        level = 0.05 * np.median(array[array > 0])
        noisy = sitk.GetImageFromArray(array + np.abs(rng.normal(0, level, array.shape)).astype(np.float32) + 1)
        noisy.CopyInformation(image)
        return noisy

    _rewrite(case.folder, tmp_path / "noisy" / case.case_id, add_noise)
    (tmp_path / "noisy" / case.case_id / f"{case.case_id}-seg.nii.gz").unlink()
    if not clear:  # the check must be able to fail: without the clearing, labels reach the background
        monkeypatch.setattr("brats_cls.predictor.clear_background", lambda image: (image, False))
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["infer", "--input", str(tmp_path / "noisy"), "--output", str(out),
                                       "--weights", str(weights), "--no-tta", "--quiet", "--models", "bifpn"])
    assert result.exit_code == 0, result.output
    labels = labels_of(out / case.output_name)
    # the networks only see the foreground's bounding box: nothing can be labelled beyond it
    box = np.zeros_like(brain)
    box[ndimage.find_objects(ndimage.binary_dilation(brain, iterations=2).astype(np.uint8))[0]] = True
    assert labels.any() and (not labels[~box].any()) == clear


def test_a_spacing_far_from_1mm_is_segmented_with_a_warning_naming_the_case(tmp_path, phantom_cases, caplog):
    from brats_cls.predictor import Predictor
    from brats_cls.weights import load_ensemble

    case = find_cases(phantom_cases).cases[0]

    def thick_slices(image):
        image.SetSpacing((1.0, 1.0, 3.0))
        return image

    _rewrite(case.folder, tmp_path / "thick" / case.case_id, thick_slices)
    models, _ = load_ensemble(make_weights(tmp_path / "w"), "bifpn")
    with caplog.at_level("WARNING"):
        prediction = Predictor(models, tta=False).predict(find_cases(tmp_path / "thick").cases[0])
    assert prediction.labels.shape == prediction.geometry.shape
    assert any(case.case_id in record.getMessage() and "spacing (1.0, 1.0, 3.0)" in record.getMessage()
               for record in caplog.records)
