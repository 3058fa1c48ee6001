"""Geometry-exact NIfTI round trips, case reading checks and atomic writes."""

import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk

from brats_cls.cases import MODALITIES, SCHEME_SUFFIXES, CaseError, find_cases
from brats_cls.io import Geometry, finite_or_zero, read_case, read_label, replaced_atomically, write_label

BRATS = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, -239.0, 0.0), direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))


def rotated_direction(angle=0.3):
    c, s = np.cos(angle), np.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def make_image(array, spacing=(1.0, 1.0, 1.2), origin=(3.0, -7.5, 12.25), direction=None, pixel=None):
    image = sitk.GetImageFromArray(array)
    if pixel is not None:
        image = sitk.Cast(image, pixel)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction or rotated_direction())
    return image


def write_case(folder, case_id="BraTS2021_00001", shape=(6, 7, 8), pixel=sitk.sitkInt16, tweak=None, **geometry):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index, name in enumerate(MODALITIES):
        array = rng.integers(0, 300, size=shape).astype(np.float32)
        image = make_image(array, pixel=pixel, **geometry)
        if tweak and name in tweak:
            image = tweak[name](image)
        sitk.WriteImage(image, str(folder / f"{case_id}{SCHEME_SUFFIXES['2021'][name]}.nii.gz"))
    return find_cases(folder)


@pytest.mark.parametrize(
    "geometry",
    [
        dict(spacing=(1.0, 1.0, 1.2), origin=(3.0, -7.5, 12.25), direction=rotated_direction()),
        BRATS,
    ],
)
def test_label_round_trip_keeps_geometry(tmp_path, geometry):
    found = write_case(tmp_path / "case", **geometry)
    images = read_case(found.cases[0])
    assert images.image.shape == (4, 6, 7, 8) and images.image.dtype == np.float32
    labels = np.zeros((6, 7, 8), dtype=np.uint8)
    labels[2:4, 3:5, 1:6] = 2
    labels[3, 4, 2] = 4
    out = tmp_path / "BraTS2021_00001.nii.gz"
    write_label(labels, images.geometry, out)
    written = sitk.ReadImage(str(out))
    assert written.GetPixelIDTypeAsString() == "8-bit unsigned integer"
    # NIfTI stores a rotation as a float32 quaternion: a rotated direction survives to ~1e-8, an axis-aligned one exactly.
    got = Geometry.of(written)
    assert (got.size, got.spacing, got.origin) == (images.geometry.size, images.geometry.spacing, images.geometry.origin)
    np.testing.assert_allclose(got.direction, images.geometry.direction, atol=1e-7, rtol=0)
    np.testing.assert_allclose(got.direction, geometry["direction"], atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)
    np.testing.assert_array_equal(read_label(out, "x", images.geometry), labels)


def test_brats_grid_round_trip(tmp_path):
    labels = np.zeros((155, 240, 240), dtype=np.uint8)
    labels[70:80, 100:120, 110:130] = 1
    geometry = Geometry((240, 240, 155), BRATS["spacing"], BRATS["origin"], BRATS["direction"])
    write_label(labels, geometry, tmp_path / "x.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    assert image.GetSize() == (240, 240, 155) and image.GetOrigin() == (0.0, -239.0, 0.0)
    assert Geometry.of(image) == geometry
    assert os.listdir(tmp_path) == ["x.nii.gz"]  # no temporary file left behind


@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkFloat64])
def test_storage_types_read_as_float32(tmp_path, pixel):
    images = read_case(write_case(tmp_path, pixel=pixel).cases[0])
    assert images.image.dtype == np.float32 and images.image.max() > 0


def test_modalities_on_different_grids_are_refused(tmp_path):
    def shift(image):
        image.SetOrigin((10.0, 0.0, 0.0))
        return image

    case = write_case(tmp_path, tweak={"t2": shift}).cases[0]
    with pytest.raises(CaseError, match=r"case BraTS2021_00001: origin .*_t2\.nii\.gz"):
        read_case(case)


def test_different_size_is_refused(tmp_path):
    def resize(image):
        return make_image(np.ones((6, 7, 9), dtype=np.float32))

    with pytest.raises(CaseError, match="size"):
        read_case(write_case(tmp_path, tweak={"t1": resize}).cases[0])


def test_truncated_file_names_case_and_file(tmp_path):
    case = write_case(tmp_path).cases[0]
    path = case.modalities["t1ce"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaseError, match=r"BraTS2021_00001: cannot read image.*_t1ce\.nii\.gz"):
        read_case(case)


def test_not_an_image(tmp_path):
    case = write_case(tmp_path).cases[0]
    with gzip.open(case.modalities["flair"], "wb") as handle:
        handle.write(b"this is not a NIfTI file" * 20)
    with pytest.raises(CaseError, match="cannot read image"):
        read_case(case)


def test_four_d_and_two_d_images_are_refused(tmp_path):
    case = write_case(tmp_path).cases[0]
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 6, 7, 8), np.float32), isVector=False), str(case.modalities["t2"]))
    with pytest.raises(CaseError, match="not a 3-D image"):
        read_case(case)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((7, 8), np.float32)), str(case.modalities["t2"]))
    with pytest.raises(CaseError, match="not a 3-D image"):
        read_case(case)


def test_non_finite_voxels_become_zero_with_a_warning(tmp_path, caplog):
    def poison(image):
        array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
        array[0, 0, :3] = [np.nan, np.inf, -np.inf]
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        return out

    images = read_case(write_case(tmp_path, tweak={"t1": poison}).cases[0])
    assert np.all(np.isfinite(images.image)) and np.all(images.image[1, 0, 0, :3] == 0)
    array = np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(finite_or_zero(array, "BraTS2021_00001", "x_t1.nii.gz"), [1, 0, 0, 0])
    assert "BraTS2021_00001" in caplog.text and "3 non-finite voxels in x_t1.nii.gz" in caplog.text


def test_all_zero_case_is_refused(tmp_path):
    def zero(image):
        return image * 0

    case = write_case(tmp_path, tweak={m: zero for m in MODALITIES}).cases[0]
    with pytest.raises(CaseError, match="no nonzero voxel"):
        read_case(case)


def test_failed_write_leaves_nothing(tmp_path):
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    with pytest.raises(ValueError):  # refused before any file exists
        write_label(np.zeros((5, 4, 4), np.uint8), geometry, tmp_path / "bad.nii.gz")
    assert list(tmp_path.iterdir()) == []
    # a failure half-way through the bytes: the temporary file existed, had data, and is gone
    seen = []
    with pytest.raises(OSError, match="disk gone"):
        with replaced_atomically(tmp_path / "mask.nii.gz") as handle:
            handle.write(b"half a mask")
            handle.flush()
            seen = [(p.name, p.stat().st_size) for p in tmp_path.iterdir()]
            raise OSError("disk gone")
    assert len(seen) == 1 and seen[0][0].startswith(".mask.nii.gz.") and seen[0][1] == len(b"half a mask")
    assert list(tmp_path.iterdir()) == []
    # and a finished write is readable by others (mode 0644 under the usual umask), never 0600
    write_label(np.zeros((4, 4, 4), np.uint8), geometry, tmp_path / "ok.nii.gz")
    assert (tmp_path / "ok.nii.gz").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
