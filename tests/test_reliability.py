"""Reliability: bad inputs, faults (kill, disk full, out of memory, read-only output) and security.

One broken case must cost one case, never the run, and never leave a half-written mask. Each bad
input below is run end to end through :func:`run_inference` beside a good case: the good case's mask
is written, the bad one either gets a correct mask or fails with a message naming case and file.
The outcomes are tabulated in RELIABILITY.md.

Cases here are small random "brains" (an ellipsoid of noise) on a BraTS-like grid, and the model is a
tiny random-weight BiFPN: the tests are about plumbing, not segmentation quality.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_inference import make_weights
from torch import nn

from brats_cls.cases import MODALITIES, SCHEME_SUFFIXES, SEG_SUFFIXES, find_cases
from brats_cls.cli import main
from brats_cls.cases import find_cases as discover
from brats_cls.inference import RunOptions, run_inference
from brats_cls.predictor import MAX_CASE_VOXELS, Predictor
from brats_cls.io import check_complete, read_case, remove_stale_temporaries
from brats_cls.models.registry import CHECKPOINT_FORMAT, build_model
from brats_cls.preprocess import preprocess
from brats_cls.weights import WeightsError, load_ensemble, write_manifest

SHAPE = (16, 20, 24)  # (D, H, W)
BRATS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
GOOD = "BraTS-GLI-00001-000"
BAD = "BraTS-GLI-00002-000"


def modality_path(folder: Path, case_id: str, modality: str, scheme: str = "2023", ext: str = ".nii.gz") -> Path:
    return folder / f"{case_id}{SCHEME_SUFFIXES[scheme][modality]}{ext}"


def brain(shape=SHAPE, seed=0) -> np.ndarray:
    """Four modalities ``(4, D, H, W)``: positive noise inside an ellipsoid, exact zeros outside."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, dtype=np.float32)[:, None, None, None] - 1) / 2
    radius = np.maximum(np.array(shape, dtype=np.float32)[:, None, None, None] / 2.4, 1.0)
    inside = (((grid - centre) / radius) ** 2).sum(axis=0) <= 1.0
    return np.stack([np.where(inside, rng.uniform(50, 400, shape), 0.0) for _ in MODALITIES]).astype(np.float32)


def write_case(folder: Path, case_id: str = GOOD, shape=SHAPE, pixel=sitk.sitkInt16, scheme: str = "2023",
               spacing=(1.0, 1.0, 1.0), seed: int | None = None) -> Path:
    """Write a case's four modalities into ``folder`` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    volumes = brain(shape, zlib.crc32(case_id.encode()) if seed is None else seed)
    for modality, array in zip(MODALITIES, volumes):
        image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
        image.SetSpacing(spacing)
        image.SetOrigin((0.0, -(shape[1] - 1.0), 0.0))
        image.SetDirection(BRATS_DIRECTION)
        sitk.WriteImage(image, str(modality_path(folder, case_id, modality, scheme)))
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("weights"), archs=("bifpn",))


@pytest.fixture(scope="module")
def ensemble(weights):
    return load_ensemble(weights)


def run(ensemble, inputs: Path, out: Path, report_dir=None, **settings):
    out.mkdir(parents=True, exist_ok=True)
    models, _ = ensemble
    predictor = Predictor(models, tta=False, **settings)
    return run_inference(discover(inputs), out, predictor, options=RunOptions(report_dir=report_dir, progress=False))


def run_cli(*args):
    return CliRunner().invoke(main, [*map(str, args)], catch_exceptions=False)


def assert_mask_on_input_grid(mask_path: Path, flair_path: Path) -> None:
    mask = sitk.ReadImage(str(mask_path))
    reference = sitk.ReadImage(str(flair_path))
    assert mask.GetSize() == reference.GetSize() and mask.GetSpacing() == reference.GetSpacing()
    assert mask.GetOrigin() == reference.GetOrigin() and mask.GetDirection() == reference.GetDirection()
    assert mask.GetPixelIDTypeAsString() == "8-bit unsigned integer"
    assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) <= {0, 1, 2, 3}
    check_complete(mask_path, "mask")


# --- bad inputs: each damages case BAD; GOOD lies beside it ---------------------------------------


def _rewrite(path: Path, transform) -> None:
    image = transform(sitk.ReadImage(str(path)))
    sitk.WriteImage(image, str(path))


def _set(attribute, value):
    def transform(image):
        getattr(image, f"Set{attribute}")(value)
        return image

    return transform


def missing_modality(folder):
    modality_path(folder, BAD, "t1ce").unlink()


def duplicated_nii_and_niigz(folder):
    path = modality_path(folder, BAD, "t2")
    modality_path(folder, BAD, "t2", ext=".nii").write_bytes(gzip.decompress(path.read_bytes()))


def truncated_gzip(folder):
    path = modality_path(folder, BAD, "t1ce")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def not_an_image(folder):
    modality_path(folder, BAD, "flair").write_text("patient notes, not a NIfTI file\n")


def four_d(folder):
    image = sitk.GetImageFromArray(np.ones((2, *SHAPE), np.int16), isVector=False)
    sitk.WriteImage(image, str(modality_path(folder, BAD, "t1")))


def two_d(folder):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(SHAPE[1:], np.int16)), str(modality_path(folder, BAD, "t1")))


def different_size(folder):
    image = sitk.GetImageFromArray(brain((SHAPE[0] + 1, *SHAPE[1:]))[0].astype(np.int16))
    image.SetOrigin((0.0, -(SHAPE[1] - 1.0), 0.0))
    image.SetDirection(BRATS_DIRECTION)
    sitk.WriteImage(image, str(modality_path(folder, BAD, "t2")))


def spacing_beyond_tolerance(folder):
    _rewrite(modality_path(folder, BAD, "t2"), _set("Spacing", (1.0, 1.0, 1.01)))


def origin_beyond_tolerance(folder):
    _rewrite(modality_path(folder, BAD, "t2"), _set("Origin", (0.5, -(SHAPE[1] - 1.0), 0.0)))


def direction_beyond_tolerance(folder):
    c, s = np.cos(0.01), np.sin(0.01)
    _rewrite(modality_path(folder, BAD, "t2"), _set("Direction", (-c, s, 0.0, -s, -c, 0.0, 0.0, 0.0, 1.0)))


def geometry_within_tolerance(folder):
    _rewrite(modality_path(folder, BAD, "t2"), _set("Spacing", (1.0, 1.0, 1.0 + 1e-5)))
    _rewrite(modality_path(folder, BAD, "t1"), _set("Origin", (1e-3, -(SHAPE[1] - 1.0), 0.0)))


def all_zero(folder):
    for modality in MODALITIES:
        _rewrite(modality_path(folder, BAD, modality), lambda image: image * 0)


def nan_and_inf_voxels(folder):
    path = modality_path(folder, BAD, "t1")
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[SHAPE[0] // 2, SHAPE[1] // 2, :3] = [np.nan, np.inf, -np.inf]
    poisoned = sitk.GetImageFromArray(array)
    poisoned.CopyInformation(image)
    sitk.WriteImage(poisoned, str(path))


def header_claims_huge_grid(folder):
    """A NIfTI-1 header claiming 2048**3 voxels over a few bytes: refused from the header alone."""
    path = modality_path(folder, BAD, "t1ce")
    header = bytearray(gzip.decompress(path.read_bytes())[:352])
    header[42:48] = np.array([2048, 2048, 2048], dtype="<i2").tobytes()  # dim[1..3]
    path.write_bytes(gzip.compress(bytes(header) + b"\0" * 64))


def _storage(pixel):
    def convert(folder):
        for modality in MODALITIES:
            path = modality_path(folder, BAD, modality)
            image = sitk.ReadImage(str(path), sitk.sitkFloat32)
            if pixel == sitk.sitkUInt8:
                image = image * (255.0 / 400.0)
            sitk.WriteImage(sitk.Cast(image, pixel), str(path))

    return convert


def _resize(shape):
    def rewrite(folder):
        for path in folder.iterdir():
            path.unlink()
        write_case(folder, BAD, shape=shape)

    return rewrite


def symlinked_files(folder):
    store = folder.parent.parent / "store"
    store.mkdir(exist_ok=True)
    for modality in MODALITIES:
        path = modality_path(folder, BAD, modality)
        target = store / path.name
        shutil.move(path, target)
        path.symlink_to(target)


def symlinked_case_folder(folder):
    real = folder.parent.parent / "elsewhere" / BAD
    real.parent.mkdir()
    shutil.move(folder, real)
    folder.symlink_to(real, target_is_directory=True)


def dangling_symlink(folder):
    path = modality_path(folder, BAD, "t2")
    path.unlink()
    path.symlink_to(folder / "does-not-exist.nii.gz")


def stray_and_hidden_files(folder):
    """macOS resource forks ``._*``, notes, a folder named like a modality: all ignored."""
    (folder / f"._{BAD}-t1n.nii.gz").write_bytes(b"\0\5\26\7 resource fork")
    (folder / "notes.txt").write_text("scanner: 3T")
    (folder / f"{BAD}-seg.nii.gz.bak").write_text("old")
    (folder / f"sub-{BAD}-t1c.nii.gz").mkdir()


FAILS = {  # bad input -> pattern the failure message must match (besides the case ID)
    "missing_modality": (missing_modality, rf"missing modality file\(s\): {BAD}-t1c\.nii\.gz"),
    "duplicated_nii_and_niigz": (duplicated_nii_and_niigz, rf"duplicated t2 file: {BAD}-t2w\.nii, {BAD}-t2w\.nii\.gz"),
    "truncated_gzip": (truncated_gzip, r"(truncated|cannot read image).*-t1c\.nii\.gz"),
    "not_an_image": (not_an_image, r"cannot read image.*-t2f\.nii\.gz"),
    "four_d": (four_d, r"not a 3-D image \(4-D.*-t1n\.nii\.gz"),
    "two_d": (two_d, r"not a 3-D image \(2-D.*-t1n\.nii\.gz"),
    "different_size": (different_size, r"size \(24, 20, 17\) differs.*-t2w\.nii\.gz"),
    "spacing_beyond_tolerance": (spacing_beyond_tolerance, r"spacing .* differs.*-t2w\.nii\.gz"),
    "origin_beyond_tolerance": (origin_beyond_tolerance, r"origin .* differs.*-t2w\.nii\.gz"),
    "direction_beyond_tolerance": (direction_beyond_tolerance, r"direction .* differs.*-t2w\.nii\.gz"),
    "all_zero": (all_zero, r"no nonzero voxel"),
    "header_claims_huge_grid": (header_claims_huge_grid, rf"exceeds the {MAX_CASE_VOXELS}-voxel limit.*-t1c\.nii\.gz"),
    "dangling_symlink": (dangling_symlink, rf"missing modality file\(s\): {BAD}-t2w\.nii\.gz"),
}

MASKS = {  # bad-looking input -> a correct mask is expected
    "nan_and_inf_voxels": nan_and_inf_voxels,
    "geometry_within_tolerance": geometry_within_tolerance,
    "int16": _storage(sitk.sitkInt16),
    "uint8": _storage(sitk.sitkUInt8),
    "float64": _storage(sitk.sitkFloat64),
    "tiny_10x10x10": _resize((10, 10, 10)),
    "one_slice_1x20x24": _resize((1, 20, 24)),
    "symlinked_files": symlinked_files,
    "symlinked_case_folder": symlinked_case_folder,
    "stray_and_hidden_files": stray_and_hidden_files,
}


def _inputs_with_bad_case(tmp_path: Path, damage) -> Path:
    inputs = tmp_path / "in"
    write_case(inputs / GOOD, GOOD)
    write_case(inputs / BAD, BAD)
    damage(inputs / BAD)
    return inputs


@pytest.mark.parametrize("name", sorted(FAILS))
def test_bad_input_fails_that_case_only(tmp_path, ensemble, name):
    damage, pattern = FAILS[name]
    inputs = _inputs_with_bad_case(tmp_path, damage)
    out = tmp_path / "out"
    summary = run(ensemble, inputs, out)
    assert summary.written == [GOOD] and list(summary.failed) == [BAD] and summary.exit_code == 1
    message = summary.failed[BAD]
    assert message.startswith(f"case {BAD}: ")
    assert re.search(pattern, message), message
    assert [p.name for p in out.iterdir()] == [f"{GOOD}.nii.gz"]


@pytest.mark.parametrize("name", sorted(MASKS))
def test_bad_looking_input_gives_a_mask(tmp_path, ensemble, name):
    inputs = _inputs_with_bad_case(tmp_path, MASKS[name])
    out = tmp_path / "out"
    summary = run(ensemble, inputs, out)
    assert summary.failed == {} and summary.written == [GOOD, BAD] and summary.exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{GOOD}.nii.gz", f"{BAD}.nii.gz"]
    assert_mask_on_input_grid(out / f"{BAD}.nii.gz", modality_path(inputs / BAD, BAD, "flair"))


def test_tiny_volume_goes_through_padding(tmp_path, ensemble):
    """A 10x10x10 case whose brain fills an off-centre 5x6x7 block: padded to 16**3 for the network,
    and the mask comes back on the 10**3 grid with every label inside the block (un-padding aligned)."""
    folder = write_case(tmp_path / "in" / BAD, BAD, shape=(10, 10, 10))
    block = np.zeros((10, 10, 10), np.float32)
    block[1:6, 3:9, 2:9] = 1
    for modality in MODALITIES:
        path = modality_path(folder, BAD, modality)
        image = sitk.ReadImage(str(path))
        masked = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) * block).astype(np.int16) + block.astype(np.int16))
        masked.CopyInformation(image)
        sitk.WriteImage(masked, str(path))
    case = find_cases(folder).cases[0]
    volume, box = preprocess(read_case(case).image)
    assert volume.shape == (4, 16, 16, 16) and box.cropped_shape == (5, 6, 7)
    models, entries = ensemble
    prediction = Predictor(models, tta=True).predict(case)
    labels, geometry = prediction.labels, prediction.geometry
    assert labels.shape == (10, 10, 10) == geometry.shape
    assert labels.any() and not labels[block == 0].any()


def test_volume_over_the_size_limit_is_refused_before_reading(tmp_path, ensemble):
    inputs = tmp_path / "in"
    write_case(inputs / GOOD, GOOD)
    write_case(inputs / BAD, BAD, shape=(30, 20, 24))
    summary = run(ensemble, inputs, tmp_path / "out", max_case_voxels=int(np.prod(SHAPE)))
    assert summary.written == [GOOD]
    assert f"volume (24, 20, 30) exceeds the {int(np.prod(SHAPE))}-voxel limit" in summary.failed[BAD]


def test_large_volume_takes_the_sliding_window_path_deterministically(tmp_path, ensemble):
    """A volume longer than the 128-voxel window along D, above a small whole-volume limit: several
    Gaussian windows end to end; two runs give the same bytes."""
    inputs = tmp_path / "in"
    write_case(inputs / BAD, BAD, shape=(150, 20, 24))
    reports = []
    for name in ("a", "b"):
        summary = run(ensemble, inputs, tmp_path / name, max_whole_voxels=4096, report_dir=tmp_path)
        assert summary.written == [BAD]
        reports.append(json.loads((tmp_path / f"{BAD}.json").read_text()))
    assert all(report["sliding_window"] for report in reports)
    assert_mask_on_input_grid(tmp_path / "a" / f"{BAD}.nii.gz", modality_path(inputs / BAD, BAD, "flair"))
    assert (tmp_path / "a" / f"{BAD}.nii.gz").read_bytes() == (tmp_path / "b" / f"{BAD}.nii.gz").read_bytes()


class OutOfMemoryAbove(nn.Module):
    """A real model behind a memory limit: an input above ``limit`` voxels raises
    ``torch.OutOfMemoryError``, exactly what a CUDA allocation failure raises."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model = model
        self.limit = limit
        self.largest_run = 0

    def forward(self, volume):
        voxels = volume[0, 0].numel()
        if voxels > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated at {voxels} voxels)")
        self.largest_run = max(self.largest_run, voxels)
        return self.model(volume)


def test_out_of_memory_falls_back_to_shrinking_windows(tmp_path, ensemble):
    models, entries = ensemble
    inputs = tmp_path / "in"
    write_case(inputs / BAD, BAD, shape=(24, 28, 28))  # padded to 32**3
    limited = OutOfMemoryAbove(models[0], 16**3)
    (tmp_path / "out").mkdir()
    summary = run_inference(discover(inputs), tmp_path / "out", Predictor([limited], tta=False),
                            options=RunOptions(progress=False))
    assert summary.written == [BAD] and limited.largest_run == 16**3  # whole volume and 32-windows refused
    assert_mask_on_input_grid(tmp_path / "out" / f"{BAD}.nii.gz", modality_path(inputs / BAD, BAD, "flair"))
    # Not even a 16**3 window fits: the case fails with the error named, nothing is written.
    write_case(inputs / GOOD, GOOD)
    hopeless = OutOfMemoryAbove(models[0], 100)
    (tmp_path / "out2").mkdir()
    summary = run_inference(discover(inputs), tmp_path / "out2", Predictor([hopeless], tta=False),
                            options=RunOptions(progress=False))
    assert summary.written == [] and set(summary.failed) == {GOOD, BAD}
    assert "OutOfMemoryError" in summary.failed[BAD] and list((tmp_path / "out2").iterdir()) == []


# --- names and paths -----------------------------------------------------------------------------

HOSTILE_IDS = {  # case ID -> accepted as an output name?
    "..": False,
    ".": False,
    ".hidden": False,
    "line\nbreak": False,
    " padded": False,
    "tab\tinside": False,
    "$(touch PWNED)": True,
    "-rf": True,
    "a;rm -rf b": True,
    "patient ä ü 1": True,
    "患者 2": True,
}


def test_hostile_case_ids_never_escape_the_output_folder(tmp_path, ensemble):
    inputs = tmp_path / "in"
    for index, case_id in enumerate(HOSTILE_IDS):
        write_case(inputs / f"folder {index}", case_id, shape=(10, 10, 10))
    (inputs / "..\\evil").mkdir()
    write_case(inputs / "..\\evil", "..\\evil", shape=(10, 10, 10))  # a backslash ID: refused
    out = tmp_path / "out"
    summary = run(ensemble, inputs, out)
    accepted = sorted(case_id for case_id, ok in HOSTILE_IDS.items() if ok)
    assert sorted(summary.written) == accepted and summary.failed == {}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{case_id}.nii.gz" for case_id in accepted)
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "b").exists()


def test_case_folder_with_spaces_and_unicode_through_the_cli(tmp_path, weights):
    inputs = tmp_path / "données d'entrée"
    write_case(inputs / "patient ä 1", GOOD)
    out = tmp_path / "sortie ü"
    out.mkdir()
    result = run_cli("infer", "--input", inputs, "--output", out, "--weights", weights, "--no-tta", "--quiet")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == [f"{GOOD}.nii.gz"]


_folders = st.sampled_from(["", "a", "b c", "ä", "._x"])
_ids = st.sampled_from(["BraTS-GLI-00001-000", "BraTS2021_00002", "x", "..", ".h", "a b", "c\td", "-"])
_roles = st.sampled_from([*MODALITIES, "seg", "junk"])
_exts = st.sampled_from([".nii.gz", ".nii", ".nii.gz.tmp", ".txt", ""])
_files = st.tuples(_folders, _ids, st.sampled_from(["2021", "2023"]), _roles, _exts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(_files, max_size=25))
def test_find_cases_on_random_layouts(files):
    """Random files in random folders: find_cases never crashes; every case it returns has four
    distinct modality files of its own ID and scheme, a safe ID, and the control case is found."""
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        write_case_names = [("control", "BraTS-GLI-99999-000", "2023", m, ".nii.gz") for m in MODALITIES]
        for folder, case_id, scheme, role, ext in [*files, *write_case_names]:
            suffix = {"seg": SEG_SUFFIXES[scheme], "junk": "_junk"}.get(role) or SCHEME_SUFFIXES[scheme][role]
            (root / folder).mkdir(exist_ok=True)
            (root / folder / f"{case_id}{suffix}{ext}").write_bytes(b"")
        found = find_cases(root)
        ids = [case.case_id for case in found.cases]
        assert "BraTS-GLI-99999-000" in ids and len(ids) == len(set(ids))
        for case in found.cases:
            paths = case.paths
            assert len(set(paths)) == 4 and all(p.is_file() and p.parent == case.folder for p in paths)
            for modality, path in case.modalities.items():
                assert path.name.startswith(case.case_id)
                assert path.name[len(case.case_id):].startswith(SCHEME_SUFFIXES[case.scheme][modality] + ".nii")
            assert not case.case_id.startswith(".") and case.case_id.strip() == case.case_id
            assert not any(c in case.case_id for c in "/\\\0") and all(ord(c) >= 32 for c in case.case_id)
            assert Path(case.output_name).name == case.output_name
        for error in found.errors:
            assert error.case_id and str(error).startswith(f"case {error.case_id}: ")


# --- faults --------------------------------------------------------------------------------------


def _infer_process(inputs, out, weights, *extra):
    command = [sys.executable, "-m", "brats_cls", "infer", "--input", str(inputs), "--output", str(out),
               "--weights", str(weights), "--no-tta", "--quiet", "--device", "cpu", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _masks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(".nii.gz")}


@pytest.mark.slow  # three `python -m brats_cls` processes: about 25 s on 2 busy cores
def test_sigkill_mid_run_then_rerun_with_skip_existing(tmp_path, weights):
    """Four small cases, then a last one that takes seconds: the kill comes once the four masks are
    written, while the last case is being computed, so exactly four masks survive (no timing race)."""
    inputs = tmp_path / "in"
    ids = [f"BraTS-GLI-0000{i}-000" for i in range(1, 6)]
    for case_id in ids[:-1]:
        write_case(inputs / case_id, case_id, shape=(24, 28, 28))
    write_case(inputs / ids[-1], ids[-1], shape=(140, 176, 144))
    reference = tmp_path / "reference"
    reference.mkdir()
    process = _infer_process(inputs, reference, weights)
    assert process.wait(timeout=300) == 0, process.stdout.read()
    expected = _masks(reference)
    assert sorted(expected) == [f"{case_id}.nii.gz" for case_id in ids]

    out = tmp_path / "out"
    out.mkdir()
    process = _infer_process(inputs, out, weights)
    deadline = time.monotonic() + 300
    while len([p for p in out.iterdir() if p.name.endswith(".nii.gz") and not p.name.startswith(".")]) < 4:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the last case"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    done = _masks(out)
    assert sorted(done) == [f"{case_id}.nii.gz" for case_id in ids[:-1]]
    assert all(expected[name] == data for name, data in done.items())  # complete masks only, never partial
    # A kill between creating the temporary file and its rename leaves one like this: plant it.
    stale = out / f".{ids[-1]}.nii.gz.k7x2q9.tmp"
    stale.write_bytes(b"half a mask")
    assert {p.name for p in out.iterdir()} - set(done) <= {stale.name}

    process = _infer_process(inputs, out, weights, "--skip-existing")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert f"{len(ids) - len(done)} case(s) written, {len(done)} skipped, 0 failed" in output
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # the stale .tmp is gone
    assert _masks(out) == expected


def test_stale_temporaries_removal_touches_only_ours(tmp_path):
    ours = [".BraTS-GLI-00001-000.nii.gz.a1b2c3.tmp", ".BraTS2021_00001.nii.a1b2c3.tmp", ".brats-cls-write-test-42"]
    theirs = ["BraTS-GLI-00002-000.nii.gz", "notes.tmp", ".hidden", ".x.json.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".folder.nii.gz.q.tmp").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs + [".folder.nii.gz.q.tmp"])


class MountUnavailable(Exception):
    pass


@contextlib.contextmanager
def mounted(target: Path, *mount_args: str):
    """Mount something on ``target`` for the block; raises MountUnavailable where mounting is not allowed."""
    try:
        result = subprocess.run(["mount", *mount_args, str(target)], capture_output=True, text=True)
    except FileNotFoundError as error:
        raise MountUnavailable(str(error)) from None
    if result.returncode != 0:
        raise MountUnavailable(f"mount {' '.join(mount_args)} failed: {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system reports it full."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        with contextlib.suppress(OSError):
            while handle.write(b"\0" * 4096):
                pass


def test_disk_full_fails_the_case_and_leaves_nothing(tmp_path, weights):
    inputs = tmp_path / "in"
    write_case(inputs / GOOD, GOOD)
    out = tmp_path / "out"
    out.mkdir()
    args = ["infer", "--input", inputs, "--output", out, "--weights", weights, "--no-tta", "--quiet"]
    try:
        with mounted(out, "-t", "tmpfs", "-o", "size=128k", "tmpfs"):
            _fill(out)
            result = run_cli(*args)
            left = sorted(p.name for p in out.iterdir())
        output, code = result.output, result.exit_code
    except MountUnavailable:
        # No mount (unprivileged CI): a file-size limit in a child process stands in for the full disk.
        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

        process = subprocess.run([sys.executable, "-m", "brats_cls", *map(str, args)], preexec_fn=limit,
                                 capture_output=True, text=True, timeout=300)
        output, code = process.stdout + process.stderr, process.returncode
        left = sorted(p.name for p in out.iterdir())
    assert code == 1, output
    assert f"case {GOOD}: cannot write the mask: " in output
    assert left in (["filler"], [])  # no mask, no temporary file


def test_full_temporary_folder_gives_an_error_not_a_truncated_mask(tmp_path, ensemble, monkeypatch):
    """ITK writes the staged mask and ignores a failed write: the staged file is checked complete."""
    inputs = tmp_path / "in"
    write_case(inputs / GOOD, GOOD)
    staging = tmp_path / "staging"
    staging.mkdir()
    try:
        with mounted(staging, "-t", "tmpfs", "-o", "size=128k", "tmpfs"):
            _fill(staging)
            monkeypatch.setattr(tempfile, "tempdir", str(staging))
            summary = run(ensemble, inputs, tmp_path / "out")
            monkeypatch.undo()
    except MountUnavailable as error:
        pytest.skip(f"no tmpfs here ({error}); the file-size-limit branch of the disk-full test covers this")
    assert summary.exit_code == 1 and "is that folder full?" in summary.failed[GOOD]
    assert list((tmp_path / "out").iterdir()) == []


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` read-only even for root: a read-only bind mount, else the immutable attribute."""
    try:
        with mounted(folder, "--bind", str(folder)):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
            yield "bind mount"
            return
    except (MountUnavailable, subprocess.CalledProcessError):
        pass
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (no mount, no chattr +i)")
    try:
        yield "chattr +i"
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def test_read_only_output_folder(tmp_path, weights, ensemble):
    inputs = tmp_path / "in"
    write_case(inputs / GOOD, GOOD)
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        with pytest.raises(OSError):
            (out / "probe").write_bytes(b"")
        result = run_cli("infer", "--input", inputs, "--output", out, "--weights", weights, "--no-tta", "--quiet")
        assert result.exit_code == 2 and "not writable" in result.output
        # Past the CLI's check (the folder turned read-only mid-run): each case fails, the run goes on.
        summary = run(ensemble, inputs, out)
        assert summary.exit_code == 1 and "cannot write the mask" in summary.failed[GOOD]
    assert list(out.iterdir()) == []


def test_usage_errors_before_any_work(tmp_path, weights):
    inputs = write_case(tmp_path / "in" / GOOD, GOOD).parent
    out = tmp_path / "out"
    out.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for arguments in (["--input", tmp_path / "missing", "--output", out], ["--input", a_file, "--output", out],
                      ["--input", inputs, "--output", a_file]):
        result = run_cli("infer", *arguments, "--weights", weights, "--quiet")
        assert result.exit_code == 2, result.output
    assert list(out.iterdir()) == []


# --- weights -------------------------------------------------------------------------------------


def test_manifest_entries_pointing_outside_are_refused(tmp_path, weights):
    outside = tmp_path / "x.pt"
    shutil.copy(weights / "bifpn_fold0.pt", outside)
    for file in ("../x.pt", str(outside), "link.pt"):
        folder = tmp_path / "w"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(weights, folder)
        (folder / "link.pt").symlink_to(outside)
        entries = [{"name": "m", "file": file, "arch": "bifpn", "fold": 0}]
        (folder / "manifest.json").write_text(json.dumps(
            {"models": [{**entries[0], "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}]}))
        with pytest.raises(WeightsError, match="points outside"):
            load_ensemble(folder)


def test_unlisted_sha_is_refused(tmp_path, weights):
    folder = tmp_path / "w"
    shutil.copytree(weights, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["models"][0]["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="altered"):
        load_ensemble(folder)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: code execution from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_bearing_checkpoint_is_refused_even_with_a_matching_sha(tmp_path, phantom_cases):
    folder = tmp_path / "w"
    folder.mkdir()
    marker = tmp_path / "EXECUTED"
    model = build_model("bifpn", "tiny")
    config = dict(model.config)
    checkpoint = {"format": CHECKPOINT_FORMAT, "arch": config.pop("arch"), "config": config,
                  "state_dict": model.state_dict(), "metadata": {"payload": _Payload(marker)}}
    torch.save(checkpoint, folder / "evil.pt")
    write_manifest(folder, [{"name": "evil", "file": "evil.pt", "arch": "bifpn", "fold": 0}])  # sha matches
    with pytest.raises(ValueError, match="cannot read model checkpoint"):
        load_ensemble(folder)
    assert not marker.exists()
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", folder, "--quiet")
    assert result.exit_code == 2 and "evil.pt" in result.output
    assert not marker.exists() and list(out.iterdir()) == []
