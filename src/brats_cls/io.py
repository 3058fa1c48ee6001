"""Geometry-exact NIfTI input and output through SimpleITK.

Arrays are laid out ``(D, H, W)`` = SimpleITK's ``(z, y, x)``; D is the axial slice axis everywhere in
this project. A label map is written as uint8 carrying the reference image's size, spacing, origin and
direction exactly, through a temporary name that does not end in ``.nii.gz`` and an atomic rename, so
no reader ever sees a partial mask.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable
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


def _nifti1_data_size(header: bytes) -> int | None:
    """Bytes a NIfTI-1 file must hold (vox_offset + voxel data), or None for another format."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            vox_offset = struct.unpack(order + "f", header[108:112])[0]
            voxels = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
            return int(vox_offset) + voxels * max(int(bitpix), 8) // 8
    return None


def check_complete(path: Path, case_id: str) -> None:
    """Raise CaseError for a truncated NIfTI file.

    ITK reads a truncated ``.nii.gz`` without complaint and fills the missing voxels, so the size is
    checked here: the gzip trailer's ISIZE (the uncompressed length modulo 2**32) must equal the
    header's vox_offset plus the voxel data; where it does not (a truncated file, or a rare
    multi-member gzip), the stream is decompressed to be sure.
    """
    compressed = path.name.endswith(".gz")
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as handle:
            header = handle.read(348)
        if len(header) < 348:  # shorter than any NIfTI header: an empty file is a failed write
            raise CaseError(case_id, f"truncated file: {len(header)} bytes, shorter than a NIfTI header", path)
        expected = _nifti1_data_size(header)
        if expected is None:
            return
        if not compressed:
            actual = path.stat().st_size
        else:
            with open(path, "rb") as handle:
                handle.seek(-4, os.SEEK_END)
                if struct.unpack("<I", handle.read(4))[0] == expected % 2**32:
                    return
            actual = 0
            with gzip.open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    actual += len(block)
    except (OSError, EOFError, zlib.error) as error:
        raise CaseError(case_id, f"cannot read image: truncated or corrupt file ({error})", path) from None
    if actual < expected:
        raise CaseError(case_id, f"truncated file: {actual} bytes of data, the header needs {expected}", path)


def _itk_reason(error: RuntimeError) -> str:
    """The last line of an ITK exception: ITK puts the reason after its file, line and class."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else "unknown reason"


def read_image(path: Path, case_id: str) -> sitk.Image:
    """Read one NIfTI file; any failure (truncation included) becomes a CaseError naming case and file."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise CaseError(case_id, f"cannot read image: {_itk_reason(error)}", path) from None
    check_complete(path, case_id)
    return image


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


def finite_or_zero(array: np.ndarray, case_id: str, path: Path) -> np.ndarray:
    """Set NaN/Inf voxels to 0, with a warning naming the case and the file.

    (ITK's NIfTI reader already maps non-finite floats to 0 on read; this guards every other path.)
    """
    bad = ~np.isfinite(array)
    if bad.any():
        log.warning("case %s: %d non-finite voxels in %s set to 0", case_id, int(bad.sum()), Path(path).name)
        array = np.where(bad, np.float32(0), array)
    return array


def check_header(path: Path, case_id: str, max_voxels: int | None = None) -> None:
    """Check a file's header before any voxel is read: a 3-D scalar image of at most ``max_voxels``.

    Reading the header first means a file that claims a huge grid (a hostile or corrupt header) is
    refused without allocating memory for it.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise CaseError(case_id, f"cannot read image: {_itk_reason(error)}", path) from None
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetDimension() != 3:
        raise CaseError(case_id, f"not a 3-D image ({reader.GetDimension()}-D, size {size})", path)
    if max_voxels is not None and int(np.prod(size, dtype=np.int64)) > max_voxels:
        raise CaseError(case_id, f"volume {size} exceeds the {max_voxels}-voxel limit", path)


def read_case(case: Case, max_voxels: int | None = None) -> CaseImages:
    """Read and check the four modalities of ``case``.

    Raises CaseError for an unreadable or truncated file, an image that is not 3-D scalar or (header
    checked before reading voxels) larger than ``max_voxels``, modalities that disagree in size,
    spacing, origin or direction, or a case with no nonzero voxel. Non-finite voxels are set to 0
    with a warning that names the case.
    """
    arrays = []
    reference: Geometry | None = None
    for name in MODALITIES:
        path = case.modalities[name]
        check_header(path, case.case_id, max_voxels)
        image = read_image(path, case.case_id)
        _check_3d(image, case.case_id, path)
        geometry = Geometry.of(image)
        if reference is None:
            reference = geometry
        else:
            _check_same_grid(reference, geometry, case.case_id, path)
        arrays.append(finite_or_zero(sitk.GetArrayFromImage(image).astype(np.float32, copy=False), case.case_id, path))
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
    """Write ``image`` to ``path`` so that no reader ever sees a partial file.

    SimpleITK picks its writer by the file ending, so the image is first written under its real name
    into a private folder in the system temporary directory (``/tmp`` in the image), then copied
    into the destination folder under a temporary name ending in ``.tmp`` (never ``.nii.gz``),
    flushed to disk, and renamed into place. The staged file is checked complete first, since ITK
    does not report a failed write. On any failure (disk full included) the temporary files are
    removed and an OSError propagates.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="brats-cls-") as private:
        staged = Path(private) / path.name
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(staged))
        writer.SetUseCompression(compress)
        writer.Execute(image)
        try:  # ITK ignores short writes: a full temporary folder gives it a truncated file, silently
            check_complete(staged, path.name)
        except CaseError as error:
            raise OSError(errno.EIO, f"the staged copy in {private} is incomplete, is that folder full? "
                                     f"({error.problem})") from None
        with replaced_atomically(path) as target, open(staged, "rb") as source:
            shutil.copyfileobj(source, target, 1 << 20)


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def replaced_atomically(path: Path | str):
    """Yield a binary file that becomes ``path`` only once fully written and flushed to disk.

    The one atomic write of the project: masks, checkpoints, manifests, logs, reports and pictures all
    go through it. The file is ``.<name>.<random>.tmp`` in the destination folder (see
    :func:`is_own_temporary`); on success it is fsynced, given the mode a plain ``open()`` would give
    (``mkstemp`` makes 0600, which a scorer running under another uid could not read), and renamed
    over ``path``; on any failure it is removed.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as target:
            yield target
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def write_bytes_atomically(path: Path | str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through :func:`replaced_atomically`."""
    with replaced_atomically(path) as target:
        target.write(payload)


def write_json_atomically(path: Path | str, value) -> None:
    """``value`` as indented JSON (with a final newline) through :func:`replaced_atomically`."""
    write_bytes_atomically(path, (json.dumps(value, indent=1) + "\n").encode())


def is_own_temporary(name: str) -> bool:
    """True for a name :func:`atomic_write_image` (``.<name>.nii.gz.<random>.tmp``) or the CLI's write
    probe (``.brats-cls-write-test-<pid>``) leaves behind when the process is killed."""
    if name.startswith(".brats-cls-write-test-"):
        return True
    return name.startswith(".") and name.endswith(".tmp") and any(f"{ext}." in name for ext in (".nii.gz", ".nii"))


def remove_stale_temporaries(folder: Path | str, case_ids: Iterable[str] | None = None) -> list[Path]:
    """Delete our own temporary files left in ``folder`` by a killed run; returns what was removed.
    With ``case_ids``, only the masks' temporaries of those cases (``.<ID>.nii.gz.<random>.tmp``): a shard
    sharing its output folder with other shards must not delete the file another one is writing.

    A SIGKILL between creating the temporary file and renaming it leaves ``.<ID>.nii.gz.<random>.tmp``
    behind (never a partial ``.nii.gz``). The output folder must hold nothing but masks, so a run
    starts by removing them. Without ``case_ids``, only one run may write into an output folder at a time.
    """
    removed = []
    prefixes = None if case_ids is None else tuple(f".{case_id}.nii.gz." for case_id in case_ids)
    for path in Path(folder).iterdir():
        if prefixes is not None and not path.name.startswith(prefixes):
            continue
        if is_own_temporary(path.name) and path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except OSError as error:  # gone already, or a read-only folder: each case reports its own write
                log.warning("cannot remove %s, left by an interrupted run: %s", path, error)
                continue
            log.warning("removed %s, left by an interrupted run", path)
            removed.append(path)
    return removed


def array_to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from a ``(D, H, W)`` array, with ``geometry`` copied exactly."""
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {geometry.shape}")
    return geometry.apply(sitk.GetImageFromArray(array))


def write_label(labels: np.ndarray, geometry: Geometry, path: Path | str) -> None:
    """Write a uint8 label map with the reference geometry, atomically."""
    atomic_write_image(array_to_image(np.ascontiguousarray(labels, dtype=np.uint8), geometry), path)
