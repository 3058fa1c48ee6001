"""Pictures of an evaluation: a Dice box plot, and one overlay per case (truth and prediction
boundaries on FLAIR and T1ce). Drawing helpers (orientation, windowing, boundaries) are
:mod:`brats_cls.qc`'s, so every picture of the package looks the same."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..cases import Case, CaseError, find_cases
from ..io import Geometry, read_image, replaced_atomically
from ..qc import REGION_COLOURS, contoured, lps_orientation, view_aspects, view_slices
from ..regions import labels_to_regions
from .folders import CaseResult, EvaluationResult, ScoredCase
from .scoring import REPORT_REGIONS

log = logging.getLogger(__name__)


def _save(figure, path: Path | str) -> None:
    """Write ``figure`` atomically, in the format its extension names (PNG, SVG, PDF)."""
    with replaced_atomically(path) as handle:
        figure.savefig(handle, format=Path(path).suffix.lstrip(".").lower() or "png")


def write_dice_boxplot(result: EvaluationResult, path: Path | str) -> None:
    """Box plot of per-case Dice per region (failures included), global and lesion-wise side by side.

    PNG, SVG or PDF by extension. Lesion-wise Dice leaves out the cases where it is undefined (NaN).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    data, labels, colours = [], [], []
    for region in REPORT_REGIONS:
        for metric, name in (("dice", "Dice"), ("sq_dsc", "LW Dice")):
            values = [case.metrics[region][metric] for case in result.cases]
            data.append([v for v in values if not math.isnan(v)])
            labels.append(f"{region}\n{name}")
            colours.append(REGION_COLOURS[region])
    boxes = axes.boxplot(data, tick_labels=labels, patch_artist=True, showmeans=True)
    for patch, colour, index in zip(boxes["boxes"], colours, range(len(data))):
        patch.set_facecolor(colour)
        patch.set_alpha(0.6 if index % 2 == 0 else 0.3)
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("Dice")
    axes.set_title(f"Dice per region, global and lesion-wise (LW) ({len(result.cases)} cases)")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def _busiest_axial_slice(lps_truth, lps_pred) -> int:
    """Axial index (LPS) with the most truth tumour, else the most predicted tumour, else the middle."""
    for whole in (lps_truth, lps_pred):
        if whole is not None and whole.any():
            return int(whole.sum(axis=(1, 2)).argmax())
    return lps_truth.shape[0] // 2


def _scores_line(case_result: CaseResult) -> str:
    metrics = case_result.metrics
    return "  ".join(
        f"{r} Dice {metrics[r]['dice']:.3f} HD95 {metrics[r]['hd95']:.1f} LW Dice {metrics[r]['sq_dsc']:.3f}"
        for r in REPORT_REGIONS
    )


def write_overlay(
    case: Case,
    truth_labels: np.ndarray,
    pred_labels: np.ndarray | None,
    geometry: Geometry,
    case_result: CaseResult,
    path: Path | str,
) -> None:
    """PNG of the axial slice with the most truth tumour (else prediction tumour, else the middle).

    Four panels: FLAIR and T1ce (columns) with the truth's boundaries (top row) and the prediction's
    (bottom row), one colour per region (WT green, TC yellow, ET red). Raises CaseError when the
    images do not fit the truth grid.
    """
    from matplotlib.figure import Figure

    orientation = lps_orientation(geometry)
    images = {}
    for name, title in (("flair", "FLAIR"), ("t1ce", "T1ce")):
        image = read_image(case.modalities[name], case.case_id)
        if tuple(image.GetSize()) != geometry.size:
            raise CaseError(case.case_id, f"image size {image.GetSize()} differs from the truth's {geometry.size}",
                            case.modalities[name])
        images[title] = orientation.volume(sitk.GetArrayFromImage(image))
    sources = {"truth": orientation.volume(labels_to_regions(truth_labels, case_result.scheme))}
    if pred_labels is not None:
        sources["prediction"] = orientation.volume(labels_to_regions(pred_labels, case_result.scheme))
    index = _busiest_axial_slice(sources["truth"][0], sources["prediction"][0] if pred_labels is not None else None)
    centre = (index, 0, 0)
    aspect = view_aspects(orientation.spacing)["axial"]

    figure = Figure(figsize=(8, 8.4), dpi=100)
    for row, source in enumerate(("truth", "prediction")):
        regions = sources.get(source)
        for column, (title, volume) in enumerate(images.items()):
            axes = figure.add_subplot(2, 2, 2 * row + column + 1)
            slice_regions = None if regions is None else view_slices(regions, centre)["axial"]
            axes.imshow(contoured(view_slices(volume, centre)["axial"], slice_regions),
                        interpolation="nearest", aspect=aspect)
            axes.set_title(f"{title}, {source}" + ("" if regions is not None else " (none)"), fontsize=10)
            axes.set_axis_off()
    status = "" if case_result.failure is None else f"  [FAILED: {case_result.failure}]"
    figure.suptitle(f"{case.case_id}  axial slice {index} (LPS, radiological; WT green, TC yellow, ET red)"
                    f"{status}\n{_scores_line(case_result)}", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    _save(figure, path)


class OverlayWriter:
    """``on_case`` callback of :func:`~.folders.evaluate_folder`: one ``<ID>.png`` per case in
    ``overlay_dir``, from the case folders under ``images_dir``. A case without images, or whose
    images do not fit, is logged and skipped."""

    def __init__(self, overlay_dir: Path | str, images_dir: Path | str):
        self.overlay_dir = Path(overlay_dir)
        self.overlay_dir.mkdir(parents=True, exist_ok=True)
        self.images_dir = images_dir
        discovery = find_cases(images_dir)
        for error in discovery.errors:
            log.warning("images: %s", error)
        self.cases = {case.case_id: case for case in discovery.cases}

    def __call__(self, scored: ScoredCase) -> None:
        case_id = scored.result.case_id
        case = self.cases.get(case_id)
        if case is None:
            log.warning("case %s: no images under %s, no overlay", case_id, self.images_dir)
            return
        try:
            write_overlay(case, scored.truth_labels, scored.pred_labels, scored.geometry, scored.result,
                          self.overlay_dir / f"{case_id}.png")
        except CaseError as error:
            log.warning("no overlay: %s", error)
