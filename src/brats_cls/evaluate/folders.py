"""Scoring folders: truth files matched to predictions, failures, and the per-region summary.

Files: truth ``<ID>.nii.gz``, ``<ID>_seg.nii.gz`` or ``<ID>-seg.nii.gz``, flat in the truth folder, or
``_seg`` / ``-seg`` files inside case folders (``<truth>/<ID>/<ID>-seg.nii.gz``, the BraTS data layout;
modality files there are ignored). Predictions: ``<ID>.nii.gz`` flat in the prediction folder.

**Failure** (prediction missing, unreadable, on another grid, or holding labels the scheme does not
know): every region scores :data:`~.scoring.FAILED_CASE` (Dice 0, HD95 373, sensitivity 0,
specificity 0, lesion-wise figures as ``brats-parse-metrics`` fills a missing subject), as the
challenge scores failed cases; the case is listed with the reason. A truth file that cannot be used
is an error: that case is not scored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from ..cases import NIFTI_EXTENSIONS, CaseError, parse_name
from ..io import Geometry, read_label
from ..regions import REGIONS, labels_to_regions
from .metrics import HD95_METHODS
from .scoring import FAILED_CASE, SCHEME_CHOICES, evaluate_case, resolve_scheme, summarise

log = logging.getLogger(__name__)


class TruthFile(NamedTuple):
    """A ground-truth file found by :func:`find_truth`."""

    case_id: str
    path: Path
    scheme: str | None  # implied by the name (_seg / -seg); None for a plain <ID>.nii.gz


@dataclass
class CaseResult:
    """One case's figures per region (:func:`~.scoring.evaluate_case`); ``failure`` holds the reason
    when it was scored as failed."""

    case_id: str
    scheme: str
    metrics: dict[str, dict[str, float]]
    failure: str | None = None


@dataclass
class EvaluationResult:
    """Per-case results, the failed cases, truth errors and a per-region summary."""

    cases: list[CaseResult]
    hd95_method: str = "pooled"
    errors: list[CaseError] = field(default_factory=list)  # truth problems: case not scored
    unmatched_predictions: list[str] = field(default_factory=list)  # prediction without truth

    @property
    def failures(self) -> list[tuple[str, str]]:
        """``(case_id, reason)`` of every case scored as failed (e.g. prediction missing)."""
        return [(case.case_id, case.failure) for case in self.cases if case.failure is not None]

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{region: {metric: {"mean", "median", "std", "n"}}}`` over all scored cases, failures
        included (:func:`~.scoring.summarise`). Values are NaN when no case was scored."""
        return summarise([case.metrics for case in self.cases])


@dataclass(frozen=True)
class ScoredCase:
    """What :func:`evaluate_folder` hands ``on_case`` for each scored case (e.g. to draw an overlay)."""

    result: CaseResult
    truth_labels: np.ndarray
    pred_labels: np.ndarray | None  # None when the case failed
    geometry: Geometry  # the truth's


def _strip_extension(name: str) -> str | None:
    return next((name[: -len(ext)] for ext in NIFTI_EXTENSIONS if name.endswith(ext) and len(name) > len(ext)), None)


def find_truth(truth_dir: Path | str) -> list[TruthFile]:
    """Every truth file under ``truth_dir``: flat ``<ID>[_-]seg`` / ``<ID>`` files, or seg files in case folders.

    Modality files are ignored. Raises CaseError when two files claim the same case ID.
    """
    found: dict[str, TruthFile] = {}

    def add(entry: TruthFile) -> None:
        if entry.case_id in found:
            raise CaseError(entry.case_id, f"a second truth file besides {found[entry.case_id].path}", entry.path)
        found[entry.case_id] = entry

    for path in sorted(Path(truth_dir).iterdir()):
        if path.is_dir():
            for inner in sorted(path.iterdir()):
                parsed = parse_name(inner.name) if inner.is_file() else None
                if parsed is not None and parsed[2] == "seg":
                    add(TruthFile(parsed[0], inner, parsed[1]))
            continue
        parsed = parse_name(path.name)
        if parsed is not None:
            if parsed[2] == "seg":
                add(TruthFile(parsed[0], path, parsed[1]))
            continue
        stem = _strip_extension(path.name)
        if stem is not None and not stem.startswith("."):
            add(TruthFile(stem, path, None))
    return sorted(found.values(), key=lambda t: t.case_id)


def _prediction_path(pred_dir: Path, case_id: str) -> Path | None:
    return next((p for ext in NIFTI_EXTENSIONS if (p := pred_dir / f"{case_id}{ext}").is_file()), None)


def _geometry_of(path: Path) -> Geometry:
    """Geometry from the header of a file ``read_label`` has just read whole (so it reads)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return Geometry.of(reader)  # the reader answers the same Get* questions as an image


def _read_truth(truth: TruthFile, scheme: str) -> tuple[np.ndarray, Geometry, str]:
    """Truth labels, geometry and scheme; CaseError naming the file when the truth cannot be used."""
    truth_labels = read_label(truth.path, truth.case_id)
    geometry = _geometry_of(truth.path)
    try:
        case_scheme = resolve_scheme(scheme, truth.scheme, [truth_labels])
        labels_to_regions(truth_labels, case_scheme)
    except ValueError as error:
        raise CaseError(truth.case_id, f"truth: {error}", truth.path) from None
    return truth_labels, geometry, case_scheme


def _evaluate_one(truth: TruthFile, pred_dir: Path, scheme: str, hd95_method: str) -> ScoredCase:
    """Score one truth case; raises CaseError for a truth problem, returns a failure for a prediction one."""
    truth_labels, geometry, case_scheme = _read_truth(truth, scheme)

    def failed(reason: str) -> ScoredCase:
        metrics = {region: dict(FAILED_CASE) for region in REGIONS}
        return ScoredCase(CaseResult(truth.case_id, case_scheme, metrics, reason), truth_labels, None, geometry)

    pred_path = _prediction_path(pred_dir, truth.case_id)
    if pred_path is None:
        log.warning("case %s: prediction missing (%s)", truth.case_id, pred_dir / f"{truth.case_id}.nii.gz")
        return failed("prediction missing")
    try:
        pred_labels = read_label(pred_path, truth.case_id, geometry)
        if scheme == "auto" and truth.scheme is None:
            # A truth without ET says nothing about the scheme; the prediction's ET label may.
            case_scheme = resolve_scheme(scheme, None, [truth_labels, pred_labels])
        spacing = geometry.spacing[::-1]  # SimpleITK (x, y, z) -> array axes (z, y, x)
        metrics = evaluate_case(pred_labels, truth_labels, spacing, case_scheme, hd95_method)
    except CaseError as error:
        log.warning("%s", error)
        return failed(error.problem)
    except ValueError as error:
        log.warning("case %s: prediction: %s (%s)", truth.case_id, error, pred_path)
        return failed(f"prediction: {error}")
    return ScoredCase(CaseResult(truth.case_id, case_scheme, metrics), truth_labels, pred_labels, geometry)


def evaluate_folder(
    pred_dir: Path | str,
    truth_dir: Path | str,
    scheme: str = "auto",
    hd95_method: str = "pooled",
    on_case: Callable[[ScoredCase], None] | None = None,
) -> EvaluationResult:
    """Score every truth case under ``truth_dir`` against ``<ID>.nii.gz`` in ``pred_dir``.

    A missing or unusable prediction is scored as a failure (module docstring). A truth file that
    cannot be read or holds labels foreign to its scheme becomes an error in ``errors`` and is not
    scored. ``on_case``, when given, is called with each scored case (labels included), in case order.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for name, folder in (("prediction", pred_dir), ("truth", truth_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} folder {folder} does not exist or is not a folder")
    if scheme not in SCHEME_CHOICES:
        raise ValueError(f"unknown label scheme {scheme!r}; expected one of {SCHEME_CHOICES}")
    if hd95_method not in HD95_METHODS:
        raise ValueError(f"unknown HD95 method {hd95_method!r}; expected one of {HD95_METHODS}")
    truths = find_truth(truth_dir)
    result = EvaluationResult([], hd95_method)
    for truth in truths:
        try:
            scored = _evaluate_one(truth, pred_dir, scheme, hd95_method)
        except CaseError as error:
            log.error("%s", error)
            result.errors.append(error)
            continue
        result.cases.append(scored.result)
        if on_case is not None:
            on_case(scored)
    truth_ids = {truth.case_id for truth in truths}
    for path in sorted(pred_dir.iterdir()):
        stem = _strip_extension(path.name)
        if path.is_file() and stem is not None and stem not in truth_ids:
            result.unmatched_predictions.append(stem)
    return result
