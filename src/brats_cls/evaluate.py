"""BraTS metrics: Dice, HD95, sensitivity and specificity per case and region (ET, TC, WT).

Definitions (decisions where the paper is silent; each one is pinned by a test):

* **Dice** ``2|P∩T| / (|P| + |T|)``; both masks empty -> 1, exactly one empty -> 0.
* **HD95** in mm, spacing-aware. Surfaces are the mask voxels removed by one binary erosion with the
  6-connected structuring element (voxels on the array edge count as surface). For every surface
  voxel of one mask, the Euclidean distance in mm (``distance_transform_edt(..., sampling=spacing)``)
  to the nearest surface voxel of the other. Two ways to reduce them, ``hd95_method``:

  - ``"pooled"`` (default): the 95th percentile (numpy's linear interpolation) of both directions'
    distances pooled together. This is what the official ``brats-evaluation`` package (panoptica,
    BraTS 2023+) and medpy's ``hd95`` compute, so our numbers are the leaderboard's.
  - ``"directed"``: the classic BraTS 2017-2021 definition, the larger of the two directed 95th
    percentiles. Never smaller than ``"pooled"``.

  Conventions: both empty -> 0; exactly one empty -> :data:`HD95_FAILURE` (373 mm, the diagonal of
  the 240x240x155 SRI-24 grid). With ``"pooled"`` two non-empty masks that do not overlap at all also
  score 373, as in ``brats-evaluation`` (its zero-true-positive rule); ``"directed"`` measures them.
  One deliberate difference from ``brats-evaluation``: its global HD95 ignores the voxel spacing
  (it is in voxels), ours is in mm. On BraTS data (1 mm isotropic) the two are the same number.
* **Sensitivity** ``TP / (TP + FN)``; empty truth -> 1 (there is nothing to miss; false positives
  are what Dice and specificity measure).
* **Specificity** ``TN / (TN + FP)`` over the whole volume; no negative voxel -> 1.
* **Failure** (prediction missing, unreadable, on another grid, or holding labels the scheme does
  not know): Dice 0, HD95 373, sensitivity 0, specificity 0 for every region, as the challenge
  scores failed cases; the case is listed with the reason.

Files: truth ``<ID>.nii.gz``, ``<ID>_seg.nii.gz`` or ``<ID>-seg.nii.gz``, flat in the truth folder, or
``_seg`` / ``-seg`` files inside case folders (``<truth>/<ID>/<ID>-seg.nii.gz``, the BraTS data layout;
modality files there are ignored). Predictions: ``<ID>.nii.gz`` flat in the prediction folder.

Label scheme ``"auto"`` (per case): ``_seg`` -> 2021 (ET = 4), ``-seg`` -> 2023 (ET = 3). A plain
``<ID>.nii.gz`` truth is decided by the labels present in truth and prediction: 4 -> 2021, 3 -> 2023,
both -> error; neither -> 2023 (no ET anywhere, so every region is the same under either scheme).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from scipy import ndimage

from .cases import NIFTI_EXTENSIONS, CaseError, find_cases, parse_name
from .io import Geometry, read_image, read_label
from .regions import LABEL_SCHEMES, REGIONS, labels_to_regions

log = logging.getLogger(__name__)

#: HD95 (mm) of a failed case or a region present in only one of truth and prediction.
HD95_FAILURE = 373.0
METRICS = ("dice", "hd95", "sensitivity", "specificity")
#: Order of regions in tables and CSV columns (the BraTS convention); REGIONS is the channel order.
REPORT_REGIONS = ("ET", "TC", "WT")
HD95_METHODS = ("pooled", "directed")
SCHEME_CHOICES = ("auto", *LABEL_SCHEMES)
FAILED_CASE = {"dice": 0.0, "hd95": HD95_FAILURE, "sensitivity": 0.0, "specificity": 0.0}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` that one 6-connected erosion removes; the array edge counts as outside."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus one voxel (exact: all surfaces stay inside).

    The one-voxel margin keeps the erosion's outside-is-background rule where the masks do not touch
    the array edge; where they do, the crop edge is the array edge, so the surfaces are unchanged.
    """
    coords = np.argwhere(pred | truth)
    low = np.maximum(coords.min(axis=0) - 1, 0)
    high = np.minimum(coords.max(axis=0) + 2, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return pred[box], truth[box]


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction surface voxel to the truth surface, and the reverse.

    Both masks must be non-empty. Returns ``(pred_to_truth, truth_to_pred)``.
    """
    pred, truth = _crop_to_union(pred, truth)
    pred_surface, truth_surface = _surface(pred), _surface(truth)
    sampling = np.asarray(spacing, dtype=np.float64)
    pred_to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)[pred_surface]
    truth_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[truth_surface]
    return pred_to_truth, truth_to_pred


def hausdorff95(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], method: str = "pooled"
) -> float:
    """95th-percentile Hausdorff distance in mm between two non-empty masks (module docstring)."""
    pred_to_truth, truth_to_pred = surface_distances(pred, truth, spacing)
    if method == "pooled":
        return float(np.percentile(np.concatenate([pred_to_truth, truth_to_pred]), 95))
    if method == "directed":
        return float(max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95)))
    raise ValueError(f"unknown HD95 method {method!r}; expected one of {HD95_METHODS}")


def region_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], hd95_method: str = "pooled"
) -> dict[str, float]:
    """Dice, HD95 (mm), sensitivity and specificity of one binary region.

    ``pred`` and ``truth`` are boolean ``(D, H, W)`` arrays; ``spacing`` is ``(sz, sy, sx)`` in mm,
    the array axes' order. Conventions for empty masks are in the module docstring.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not have one value per axis of {truth.shape}")
    if hd95_method not in HD95_METHODS:
        raise ValueError(f"unknown HD95 method {hd95_method!r}; expected one of {HD95_METHODS}")
    true_pos = int(np.count_nonzero(pred & truth))
    pred_count = int(np.count_nonzero(pred))
    truth_count = int(np.count_nonzero(truth))
    false_pos = pred_count - true_pos
    negatives = truth.size - truth_count
    dice = 1.0 if pred_count + truth_count == 0 else 2.0 * true_pos / (pred_count + truth_count)
    sensitivity = 1.0 if truth_count == 0 else true_pos / truth_count
    specificity = 1.0 if negatives == 0 else (negatives - false_pos) / negatives
    if pred_count == 0 and truth_count == 0:
        hd95 = 0.0
    elif pred_count == 0 or truth_count == 0 or (true_pos == 0 and hd95_method == "pooled"):
        hd95 = HD95_FAILURE
    else:
        hd95 = hausdorff95(pred, truth, spacing, hd95_method)
    return {"dice": dice, "hd95": hd95, "sensitivity": sensitivity, "specificity": specificity}


def evaluate_case(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    spacing: tuple[float, ...],
    scheme: str,
    hd95_method: str = "pooled",
) -> dict[str, dict[str, float]]:
    """Metrics of every region of one case: ``{"WT": {...}, "TC": {...}, "ET": {...}}``.

    ``scheme`` is ``"2021"`` or ``"2023"``; ValueError for a label the scheme does not know.
    """
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from truth shape {truth_labels.shape}")
    pred_regions = labels_to_regions(pred_labels, scheme)
    truth_regions = labels_to_regions(truth_labels, scheme)
    return {
        region: region_metrics(pred_regions[i], truth_regions[i], spacing, hd95_method)
        for i, region in enumerate(REGIONS)
    }


def resolve_scheme(requested: str, named_scheme: str | None, labels: list[np.ndarray]) -> str:
    """The label scheme of one case (see the module docstring for ``"auto"``)."""
    if requested != "auto":
        if requested not in LABEL_SCHEMES:
            raise ValueError(f"unknown label scheme {requested!r}; expected one of {SCHEME_CHOICES}")
        return requested
    if named_scheme is not None:
        return named_scheme
    present = set()
    for array in labels:
        present.update(np.unique(array).tolist())
    found = [scheme for scheme, et in LABEL_SCHEMES.items() if et in present]
    if len(found) > 1:
        raise ValueError("labels 3 and 4 both present: cannot tell the 2021 from the 2023 scheme")
    return found[0] if found else "2023"


# ---------------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class TruthFile:
    case_id: str
    path: Path
    scheme: str | None  # implied by the name (_seg / -seg); None for a plain <ID>.nii.gz


@dataclass
class CaseResult:
    """One case's metrics per region; ``failure`` holds the reason when it was scored as failed."""

    case_id: str
    scheme: str
    metrics: dict[str, dict[str, float]]
    failure: str | None = None

    def row(self) -> dict[str, object]:
        """Flat row: case_id, status, scheme, then ``<metric>_<region>`` columns."""
        row: dict[str, object] = {
            "case_id": self.case_id,
            "status": "ok" if self.failure is None else f"failed: {self.failure}",
            "scheme": self.scheme,
        }
        for metric in METRICS:
            for region in REPORT_REGIONS:
                row[f"{metric}_{region}"] = self.metrics[region][metric]
        return row


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

    @property
    def rows(self) -> list[dict[str, object]]:
        return [case.row() for case in self.cases]

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{region: {metric: {"mean", "median", "std"}}}`` over all scored cases, failures included.

        Values are NaN when no case was scored.
        """
        table: dict[str, dict[str, dict[str, float]]] = {}
        for region in REPORT_REGIONS:
            table[region] = {}
            for metric in METRICS:
                values = np.array([case.metrics[region][metric] for case in self.cases], dtype=np.float64)
                if values.size == 0:
                    table[region][metric] = {"mean": math.nan, "median": math.nan, "std": math.nan}
                else:
                    table[region][metric] = {
                        "mean": float(values.mean()),
                        "median": float(np.median(values)),
                        "std": float(values.std()),
                    }
        return table

    def to_json(self) -> dict[str, object]:
        return {
            "hd95_method": self.hd95_method,
            "hd95_failure_mm": HD95_FAILURE,
            "n_cases": len(self.cases),
            "failures": [{"case_id": case_id, "reason": reason} for case_id, reason in self.failures],
            "errors": [str(error) for error in self.errors],
            "unmatched_predictions": self.unmatched_predictions,
            "summary": self.summary(),
            "cases": [
                {"case_id": c.case_id, "scheme": c.scheme, "failure": c.failure, "metrics": c.metrics}
                for c in self.cases
            ],
        }

    def write_csv(self, path: Path | str) -> None:
        rows = self.rows
        fields = ["case_id", "status", "scheme"] + [f"{m}_{r}" for m in METRICS for r in REPORT_REGIONS]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def write_json(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def format_table(self) -> str:
        """The summary as a fixed-width text table (mean / median per region and metric)."""
        summary = self.summary()
        names = {"dice": "Dice", "hd95": "HD95 mm", "sensitivity": "Sens", "specificity": "Spec"}
        header = f"{'region':<7}" + "".join(f"{names[m] + ' mean':>14}{names[m] + ' median':>16}" for m in METRICS)
        lines = [header]
        for region in REPORT_REGIONS:
            cells = "".join(
                f"{summary[region][m]['mean']:>14.4f}{summary[region][m]['median']:>16.4f}" for m in METRICS
            )
            lines.append(f"{region:<7}{cells}")
        return "\n".join(lines)


def _strip_extension(name: str) -> str | None:
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def find_truth(truth_dir: Path | str) -> list[TruthFile]:
    """Every truth file under ``truth_dir``: flat ``<ID>[_-]seg`` / ``<ID>`` files, or seg files in case folders.

    Modality files are ignored. Raises CaseError when two files claim the same case ID.
    """
    truth_dir = Path(truth_dir)
    found: dict[str, TruthFile] = {}

    def add(entry: TruthFile) -> None:
        if entry.case_id in found:
            raise CaseError(entry.case_id, f"a second truth file besides {found[entry.case_id].path}", entry.path)
        found[entry.case_id] = entry

    for path in sorted(truth_dir.iterdir()):
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
    for ext in NIFTI_EXTENSIONS:
        path = pred_dir / f"{case_id}{ext}"
        if path.is_file():
            return path
    return None


def _geometry_of(path: Path, case_id: str) -> Geometry:
    """Geometry from the file header only (the voxels were read by ``read_label``)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CaseError(case_id, "cannot read the image header", path) from None
    return Geometry(
        tuple(int(s) for s in reader.GetSize()),
        tuple(float(s) for s in reader.GetSpacing()),
        tuple(float(o) for o in reader.GetOrigin()),
        tuple(float(d) for d in reader.GetDirection()),
    )


def _evaluate_one(
    truth: TruthFile, pred_dir: Path, scheme: str, hd95_method: str
) -> tuple[CaseResult, np.ndarray, np.ndarray | None, Geometry]:
    """Score one truth case; raises CaseError for a truth problem, returns a failure for a prediction one.

    Returns the case result, the truth labels, the prediction labels (None for a failure) and the
    truth's geometry.
    """
    truth_labels = read_label(truth.path, truth.case_id)
    geometry = _geometry_of(truth.path, truth.case_id)
    try:
        case_scheme = resolve_scheme(scheme, truth.scheme, [truth_labels])
        labels_to_regions(truth_labels, case_scheme)
    except ValueError as error:
        raise CaseError(truth.case_id, f"truth: {error}", truth.path) from None
    failed = {region: dict(FAILED_CASE) for region in REGIONS}
    pred_path = _prediction_path(pred_dir, truth.case_id)
    if pred_path is None:
        log.warning("case %s: prediction missing (%s)", truth.case_id, pred_dir / f"{truth.case_id}.nii.gz")
        return CaseResult(truth.case_id, case_scheme, failed, "prediction missing"), truth_labels, None, geometry
    try:
        pred_labels = read_label(pred_path, truth.case_id, geometry)
        if scheme == "auto" and truth.scheme is None:
            # A truth without ET says nothing about the scheme; the prediction's ET label may.
            case_scheme = resolve_scheme(scheme, None, [truth_labels, pred_labels])
        spacing = geometry.spacing[::-1]  # SimpleITK (x, y, z) -> array axes (z, y, x)
        metrics = evaluate_case(pred_labels, truth_labels, spacing, case_scheme, hd95_method)
    except CaseError as error:
        log.warning("%s", error)
        return CaseResult(truth.case_id, case_scheme, failed, error.problem), truth_labels, None, geometry
    except ValueError as error:
        log.warning("case %s: prediction: %s (%s)", truth.case_id, error, pred_path)
        return CaseResult(truth.case_id, case_scheme, failed, f"prediction: {error}"), truth_labels, None, geometry
    return CaseResult(truth.case_id, case_scheme, metrics), truth_labels, pred_labels, geometry


def evaluate_folder(
    pred_dir: Path | str,
    truth_dir: Path | str,
    scheme: str = "auto",
    hd95_method: str = "pooled",
    overlay_dir: Path | str | None = None,
    images_dir: Path | str | None = None,
) -> EvaluationResult:
    """Score every truth case under ``truth_dir`` against ``<ID>.nii.gz`` in ``pred_dir``.

    A missing or unusable prediction is scored as a failure (module docstring). A truth file that
    cannot be read or holds labels foreign to its scheme becomes an error in ``errors`` and is not
    scored. With ``overlay_dir`` and ``images_dir``, one PNG per case is written (:func:`write_overlay`).
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
    images = {}
    if overlay_dir is not None:
        if images_dir is None:
            raise ValueError("an overlay needs the case images: give images_dir")
        overlay_dir = Path(overlay_dir)
        overlay_dir.mkdir(parents=True, exist_ok=True)
        discovery = find_cases(images_dir)
        for error in discovery.errors:
            log.warning("images: %s", error)
        images = {case.case_id: case for case in discovery.cases}
    result = EvaluationResult([], hd95_method)
    for truth in truths:
        try:
            case_result, truth_labels, pred_labels, geometry = _evaluate_one(truth, pred_dir, scheme, hd95_method)
        except CaseError as error:
            log.error("%s", error)
            result.errors.append(error)
            continue
        result.cases.append(case_result)
        if overlay_dir is not None:
            case = images.get(truth.case_id)
            if case is None:
                log.warning("case %s: no images under %s, no overlay", truth.case_id, images_dir)
                continue
            try:
                write_overlay(
                    case, truth_labels, pred_labels, geometry, case_result, overlay_dir / f"{truth.case_id}.png"
                )
            except CaseError as error:
                log.warning("no overlay: %s", error)
    truth_ids = {truth.case_id for truth in truths}
    for path in sorted(pred_dir.iterdir()):
        stem = _strip_extension(path.name)
        if path.is_file() and stem is not None and stem not in truth_ids:
            result.unmatched_predictions.append(stem)
    return result


# ---------------------------------------------------------------------------------------------------
# Pictures

REGION_COLOURS = {"WT": "#2ca02c", "TC": "#ffcc00", "ET": "#d62728"}


def write_dice_boxplot(result: EvaluationResult, path: Path | str) -> None:
    """Box plot of per-case Dice per region (failures included), as a PNG/SVG/PDF by extension."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4), dpi=100)
    axes = figure.add_subplot()
    data = [[case.metrics[region]["dice"] for case in result.cases] for region in REPORT_REGIONS]
    boxes = axes.boxplot(data, tick_labels=list(REPORT_REGIONS), patch_artist=True, showmeans=True)
    for patch, region in zip(boxes["boxes"], REPORT_REGIONS):
        patch.set_facecolor(REGION_COLOURS[region])
        patch.set_alpha(0.6)
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("Dice")
    axes.set_title(f"Dice per region ({len(result.cases)} cases)")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _oriented(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Reorient a ``(D, H, W)`` array to LPS index order for display (rows anterior->posterior).

    With LPS index order an axial slice shown with the row 0 at the top has anterior up and the
    patient's right on the image's left: the radiological convention.
    """
    import SimpleITK as sitk

    image = geometry.apply(sitk.GetImageFromArray(array))
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _region_code(labels: np.ndarray, scheme: str) -> np.ndarray:
    """``(D, H, W)`` labels -> uint8 with bit i set where region ``REGIONS[i]`` is (one array to reorient)."""
    regions = labels_to_regions(labels, scheme).astype(np.uint8)  # (3, D, H, W)
    return regions[0] | (regions[1] << 1) | (regions[2] << 2)


def _window(slice_: np.ndarray) -> np.ndarray:
    inside = slice_[slice_ > 0]
    if inside.size == 0:
        return slice_
    low, high = np.percentile(inside, [1, 99])
    return np.clip((slice_ - low) / max(high - low, 1e-6), 0, 1)


def write_overlay(
    case,
    truth_labels: np.ndarray,
    pred_labels: np.ndarray | None,
    geometry: Geometry,
    case_result: CaseResult,
    path: Path | str,
) -> None:
    """PNG of the axial slice with the most truth tumour (else prediction tumour, else the middle).

    Two panels, FLAIR and T1ce, with truth contours solid and prediction contours dashed, one colour
    per region (WT green, TC yellow, ET red). Raises CaseError when the images do not fit the truth grid.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    import SimpleITK as sitk

    scheme = case_result.scheme
    panels = {}
    for name, title in (("flair", "FLAIR"), ("t1ce", "T1ce")):
        image = read_image(case.modalities[name], case.case_id)
        if tuple(image.GetSize()) != geometry.size:
            raise CaseError(case.case_id, f"image size {image.GetSize()} differs from the truth's {geometry.size}",
                            case.modalities[name])
        panels[title] = _oriented(sitk.GetArrayFromImage(image).astype(np.float32), geometry)
    truth_regions = _oriented(_region_code(truth_labels, scheme), geometry)
    pred_regions = None if pred_labels is None else _oriented(_region_code(pred_labels, scheme), geometry)
    per_slice = (truth_regions > 0).reshape(truth_regions.shape[0], -1).sum(axis=1)
    if per_slice.max() == 0 and pred_regions is not None:
        per_slice = (pred_regions > 0).reshape(pred_regions.shape[0], -1).sum(axis=1)
    index = int(per_slice.argmax()) if per_slice.max() > 0 else truth_regions.shape[0] // 2

    figure = Figure(figsize=(10, 5.6), dpi=100)
    for column, (title, volume) in enumerate(panels.items()):
        axes = figure.add_subplot(1, 2, column + 1)
        axes.imshow(_window(volume[index]), cmap="gray", interpolation="nearest")
        for bit, region in enumerate(REGIONS):
            # Truth wide and pale under a thin dashed prediction: where they agree both stay visible.
            layers = ((truth_regions, "solid", 2.4, 0.55), (pred_regions, "dashed", 1.2, 1.0))
            for regions, style, width, alpha in layers:
                if regions is None:
                    continue
                mask = (regions[index] >> bit) & 1
                if mask.any():
                    axes.contour(mask, levels=[0.5], colors=REGION_COLOURS[region], linestyles=style,
                                 linewidths=width, alpha=alpha)
        axes.set_title(title)
        axes.set_axis_off()
    handles = [Line2D([], [], color=REGION_COLOURS[r], label=r) for r in REPORT_REGIONS]
    handles += [Line2D([], [], color="black", linestyle="solid", label="truth"),
                Line2D([], [], color="black", linestyle="dashed", label="prediction")]
    figure.legend(handles=handles, loc="lower center", ncol=5, frameon=False)
    scores = "  ".join(
        f"{r} Dice {case_result.metrics[r]['dice']:.3f} HD95 {case_result.metrics[r]['hd95']:.1f}"
        for r in REPORT_REGIONS
    )
    status = "" if case_result.failure is None else f"  [FAILED: {case_result.failure}]"
    figure.suptitle(f"{case.case_id}  axial slice {index} (LPS){status}\n{scores}", fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path)


# ---------------------------------------------------------------------------------------------------
# Command line (registered in cli.py)


@click.command("evaluate")
@click.option("--pred", "pred_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of predictions <ID>.nii.gz.")
@click.option("--truth", "truth_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of truth files <ID>.nii.gz / <ID>_seg.nii.gz / <ID>-seg.nii.gz, flat or in case folders.")
@click.option("--label-scheme", type=click.Choice(SCHEME_CHOICES), default="auto", show_default=True,
              help="ET label: 2021 -> 4, 2023 -> 3; auto decides per case from the truth name, else the labels.")
@click.option("--hd95", "hd95_method", type=click.Choice(HD95_METHODS), default="pooled", show_default=True,
              help="pooled: 95th percentile of both directions' surface distances (brats-evaluation); "
                   "directed: max of the two directed 95th percentiles (classic BraTS).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Per-case metrics as CSV.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Per-case metrics, failures and summary as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Box plot of Dice per region (PNG, SVG or PDF by extension).")
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for one PNG per case: FLAIR and T1ce with truth and prediction contours.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Case folders with the modalities (needed by --overlay).")
def evaluate_command(pred_dir, truth_dir, label_scheme, hd95_method, csv_path, json_path, plot_path,
                     overlay_dir, images_dir) -> None:
    """Score predictions against ground truth: Dice, HD95 (mm), sensitivity, specificity per region.

    A missing prediction scores Dice 0 and HD95 373 in every region. Exit code 1 when a truth file
    could not be used (the other cases are still scored), 2 on a usage error.
    """
    if overlay_dir is not None and images_dir is None:
        raise click.UsageError("--overlay needs --images (the case folders with FLAIR and T1ce)")
    try:
        result = evaluate_folder(pred_dir, truth_dir, label_scheme, hd95_method, overlay_dir, images_dir)
    except CaseError as error:
        raise click.UsageError(str(error)) from None
    if not result.cases and not result.errors:
        raise click.UsageError(f"no truth file found in {truth_dir}")
    click.echo(f"{len(result.cases)} case(s) scored, HD95 {hd95_method} in mm")
    click.echo(result.format_table())
    if result.failures:
        listed = ", ".join(f"{case_id} ({reason})" for case_id, reason in result.failures)
        click.echo(f"{len(result.failures)} failed case(s), scored Dice 0 / HD95 {HD95_FAILURE:g}: {listed}")
    if result.unmatched_predictions:
        click.echo(f"predictions without truth (ignored): {', '.join(result.unmatched_predictions)}")
    for error in result.errors:
        click.echo(f"not scored: {error}", err=True)
    if csv_path is not None:
        result.write_csv(csv_path)
    if json_path is not None:
        result.write_json(json_path)
    if plot_path is not None:
        write_dice_boxplot(result, plot_path)
    if result.errors:
        raise SystemExit(1)
