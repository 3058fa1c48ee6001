"""Training data: the preprocessed case cache, cross-validation folds, the data set and its sampler.

Cache layout, one folder per case (``<cache>/<case_id>/``):

* ``image.npy``   ``(4, D, H, W)`` float16: :func:`brats_cls.preprocess.preprocess` output (crop to the
  nonzero box, per-modality z-score, zero-pad to a multiple of 16) - the exact code inference runs;
* ``regions.npy`` ``(3, D, H, W)`` uint8 (WT, TC, ET) on the same padded grid;
* ``slices.npy``  ``(3, D)`` float32 per-slice region targets of the whole volume;
* ``meta.json``   case ID, scheme, CropBox, shapes, sha256 of every source file and of every array,
  and ``intensity``: per modality, the mean and std of the raw foreground that the z-score used (the
  bias-field augmentation works on raw intensities, :mod:`.augment`).

Decisions:

* **float16 image**: halves disk and page-cache use (about 27 MB per BraTS case instead of 54 MB);
  z-scored values lie within a few units, where float16 keeps about 3 significant digits, far below
  the augmentation's own +-10 % intensity noise. The crop is cast to float32 on reading.
* A case folder is built under a temporary name and renamed into place, so the cache never holds a
  half-written case; ``meta.json`` written last inside it is what marks a case as present.
* A case is "cached and intact" when its meta.json matches the source files' sha256 and every array's
  size and sha256 matches meta.json; otherwise it is rebuilt.
* **Folds**: the sorted case IDs are shuffled by ``numpy.random.default_rng(seed)`` and dealt round
  robin into 5 folds (sizes differ by at most one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from ..cases import Case, CaseError, find_cases
from ..io import read_case, read_label
from ..orientation import orientation_of
from ..preprocess import CropBox, clear_background, crop_and_pad, foreground_statistics, preprocess
from ..regions import labels_to_regions, slice_targets
from ..weights import sha256_of
from .augment import PAPER_AUGMENTATION, Augmentation, training_sample

log = logging.getLogger(__name__)

CACHE_FORMAT = "brats-cls-cache/2"
IMAGE_DTYPE = np.float16
ARRAYS = ("image", "regions", "slices")
N_FOLDS = 5


class TrainingDataError(Exception):
    """Training data that cannot be used (no labelled case, a missing label, a bad cache): found
    before any work is done."""


class CacheBuildError(Exception):
    """Some cases could not be cached; the others were. The message names each case and file."""


@dataclass(frozen=True)
class CachedCase:
    """One case in the cache: its folder and its meta.json."""

    case_id: str
    folder: Path
    meta: dict

    @property
    def crop_box(self) -> CropBox:
        return CropBox.from_dict(self.meta["crop_box"])

    @property
    def variation(self) -> list[float] | None:
        """Per modality, raw std / raw mean of the foreground (None in a cache without them)."""
        intensity = self.meta.get("intensity")
        if not intensity:
            return None
        return [std / mean if mean > 0 else 0.0 for mean, std in zip(intensity["mean"], intensity["std"])]

    def load(self, name: str, mmap: bool = True) -> np.ndarray:
        """``name`` in :data:`ARRAYS`, memory-mapped (read-only) unless ``mmap`` is False."""
        return np.load(self.folder / f"{name}.npy", mmap_mode="r" if mmap else None)


def labelled_cases(data_dir: Path | str) -> list[Case]:
    """Every case under ``data_dir``, each with its label; raises TrainingDataError otherwise.

    Raises when the folder has no case, when any case is malformed (the discovery error, naming the
    case and file) or lacks its ``_seg``/``-seg`` label - all before any work is done.
    """
    data_dir = Path(data_dir)
    try:
        discovery = find_cases(data_dir)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise TrainingDataError(str(error)) from None
    problems = [str(error) for error in discovery.errors]
    for case in discovery.cases:
        if case.seg is None:
            problems.append(str(CaseError(case.case_id, "no ground-truth label (_seg / -seg file)", case.folder)))
    if problems:
        raise TrainingDataError("training data is not usable:\n  " + "\n  ".join(problems))
    if not discovery.cases:
        raise TrainingDataError(f"no labelled BraTS case in {data_dir}")
    return discovery.cases


def _source_hashes(case: Case) -> dict[str, str]:
    files = {name: path for name, path in case.modalities.items()}
    files["seg"] = case.seg
    return {name: sha256_of(Path(path)) for name, path in files.items()}


def _is_intact(folder: Path, sources: dict[str, str] | None) -> bool:
    """meta.json is readable, matches ``sources`` (when given), and every array matches its hash."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or (sources is not None and meta.get("sources") != sources):
            return False
        for name in ARRAYS:
            path = folder / f"{name}.npy"
            if path.stat().st_size != meta["arrays"][name]["bytes"] or sha256_of(path) != meta["arrays"][name]["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _save_npy(folder: Path, name: str, array: np.ndarray) -> dict:
    path = folder / f"{name}.npy"
    with open(path, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    return {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def cache_case(case: Case, cache_dir: Path, sources: dict[str, str]) -> Path:
    """Read, crop, normalise one labelled case and store it atomically as ``cache_dir/<case_id>``."""
    images = read_case(case)
    labels = read_label(case.seg, case.case_id, images.geometry)
    try:
        regions = labels_to_regions(labels, case.scheme)
    except ValueError as error:
        raise CaseError(case.case_id, f"label map: {error}", case.seg) from None
    orientation = orientation_of(images.geometry)  # the layout inference gives the networks
    image, _ = clear_background(orientation.to_canonical(images.image))
    volume, box = preprocess(image)
    intensity = foreground_statistics(image)
    regions = crop_and_pad(orientation.to_canonical(regions), box).astype(np.uint8)
    target = cache_dir / case.case_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{case.case_id}.", suffix=".tmp", dir=cache_dir))
    try:
        arrays = {
            "image": _save_npy(tmp, "image", volume.astype(IMAGE_DTYPE)),
            "regions": _save_npy(tmp, "regions", regions),
            "slices": _save_npy(tmp, "slices", slice_targets(regions)),
        }
        meta = {
            "format": CACHE_FORMAT,
            "case_id": case.case_id,
            "scheme": case.scheme,
            "crop_box": box.to_dict(),
            "sources": sources,
            "source_files": {name: str(path) for name, path in [*case.modalities.items(), ("seg", case.seg)]},
            "arrays": arrays,
            "intensity": intensity,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.chmod(tmp, 0o755)
        trash = None
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{case.case_id}.", suffix=".old", dir=cache_dir))
            os.replace(target, trash / "case")
        os.replace(tmp, target)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def preprocess_dataset(data_dir: Path | str, cache_dir: Path | str, progress: bool = True) -> list[CachedCase]:
    """Cache every labelled case of ``data_dir`` in ``cache_dir``; skips cases cached and intact.

    Raises TrainingDataError before any work when the data are not usable; CacheBuildError after
    caching the others when some case fails to read (naming each case and file).
    """
    cases = labelled_cases(data_dir)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(cache_dir, os.W_OK):
        raise TrainingDataError(f"cache folder {cache_dir} is not writable")
    built = skipped = 0
    failures = []
    for case in tqdm(cases, desc="preprocess", unit="case", disable=not progress):
        try:
            sources = _source_hashes(case)
            if _is_intact(cache_dir / case.case_id, sources):
                skipped += 1
                continue
            cache_case(case, cache_dir, sources)
            built += 1
        except CaseError as error:
            failures.append(str(error))
        except OSError as error:
            failures.append(f"case {case.case_id}: {error}")
    log.info("cache %s: %d case(s) written, %d already cached", cache_dir, built, skipped)
    if failures:
        raise CacheBuildError(f"{len(failures)} case(s) not cached:\n  " + "\n  ".join(failures))
    return open_cache(cache_dir, [case.case_id for case in cases])


def open_cache(cache_dir: Path | str, case_ids: list[str] | None = None) -> list[CachedCase]:
    """The cached cases (all of them, or ``case_ids``), sorted by ID; raises TrainingDataError if none
    or if a requested case is missing. Arrays are checked by size only (hashes in preprocess)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise TrainingDataError(f"cache folder {cache_dir} does not exist")
    if case_ids is None:
        case_ids = sorted(p.name for p in cache_dir.iterdir() if (p / "meta.json").is_file() and not p.name.startswith("."))
    entries = []
    for case_id in sorted(case_ids):
        folder = cache_dir / case_id
        try:
            meta = json.loads((folder / "meta.json").read_text())
            for name in ARRAYS:
                if (folder / f"{name}.npy").stat().st_size != meta["arrays"][name]["bytes"]:
                    raise ValueError(f"{name}.npy has the wrong size")
        except (OSError, ValueError, KeyError) as error:
            raise TrainingDataError(f"case {case_id}: cache entry {folder} is damaged ({error}); rerun preprocess") from None
        entries.append(CachedCase(case_id, folder, meta))
    if not entries:
        raise TrainingDataError(f"no cached case in {cache_dir}; run `brats-cls preprocess` first")
    return entries


def make_folds(case_ids: list[str], seed: int = 0, n_folds: int = N_FOLDS) -> list[list[str]]:
    """Deal the shuffled sorted IDs round robin into ``n_folds`` folds, each sorted."""
    ordered = sorted(case_ids)
    if len(ordered) < n_folds:
        raise TrainingDataError(f"{len(ordered)} case(s) cannot be split into {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [sorted(ordered[i] for i in order[fold::n_folds]) for fold in range(n_folds)]


def split_fold(folds: list[list[str]], fold: int) -> tuple[list[str], list[str]]:
    """``(training IDs, validation IDs)``: validation is fold ``fold``, training the other folds."""
    if not 0 <= fold < len(folds):
        raise TrainingDataError(f"fold {fold} does not exist; choose 0..{len(folds) - 1}")
    training = sorted(case_id for index, ids in enumerate(folds) if index != fold for case_id in ids)
    return training, list(folds[fold])


class _Epochs:
    """The epoch a data set or sampler draws for: set before each epoch's iterator is created."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class CropDataset(_Epochs, Dataset):
    """Augmented random crops of cached cases.

    ``dataset[i]`` is a crop of case ``i % len(dataset)`` (an :class:`EpochSampler` key), a dict of tensors ``image (4, *crop)`` float32, ``regions (3, *crop)`` float32,
    ``slices (3, crop_D)`` float32. The augmentation generator of sample ``i`` in epoch ``e`` is seeded
    by ``(seed, e, i)``: call :meth:`set_epoch` before each epoch's iterator is created.
    """

    def __init__(self, entries: list[CachedCase], crop: tuple[int, int, int], seed: int = 0,
                 augmentation: Augmentation = PAPER_AUGMENTATION):
        self.entries = list(entries)
        self.crop = tuple(int(c) for c in crop)
        self.seed = int(seed)
        self.augmentation = augmentation
        stale = [entry.case_id for entry in self.entries if entry.variation is None]
        if augmentation.bias_probability > 0 and stale:
            more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
            raise TrainingDataError(
                f"case {stale[0]}{more}: the cache predates the intensity statistics that the bias-field "
                "augmentation needs; rerun `brats-cls preprocess` on the same folders")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index % len(self.entries)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, regions, slices = training_sample(
            entry.load("image"), entry.load("regions"), self.crop, rng, self.augmentation, entry.variation
        )
        return {
            "image": torch.from_numpy(image),
            "regions": torch.from_numpy(regions.astype(np.float32)),
            "slices": torch.from_numpy(slices),
        }


class EpochSampler(_Epochs, Sampler[int]):
    """A DistributedSampler with a fixed epoch length.

    Each epoch draws ``samples_per_rank * world_size`` indices from concatenated permutations of the
    data set (seeded by ``(seed, epoch)``), and rank ``r`` takes every ``world_size``-th from ``r``, as
    torch's DistributedSampler does. ``samples_per_rank`` defaults to ``ceil(len / world_size)`` (one
    pass over the data); ``--steps-per-epoch`` sets it to ``steps * batch_size``.
    """

    def __init__(self, dataset_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 samples_per_rank: int | None = None):
        if dataset_size < 1:
            raise ValueError("cannot sample from an empty data set")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.samples_per_rank = samples_per_rank or -(-dataset_size // world_size)

    def __len__(self) -> int:
        return self.samples_per_rank

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.samples_per_rank * self.world_size
        repeats = -(-total // self.dataset_size)
        # A key k > len means another draw of case k % len: a fresh augmentation of the same case.
        order = np.concatenate(
            [rng.permutation(self.dataset_size) + draw * self.dataset_size for draw in range(repeats)]
        )[:total]
        return iter(order[self.rank :: self.world_size].tolist())
