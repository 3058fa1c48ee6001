"""BraTS metrics per case and region (ET, TC, WT): the global Dice, HD95, sensitivity and
specificity, and the lesion-wise figures BraTS ranks by (official names ``tp``, ``fp``, ``fn``,
``rq``, ``sq_dsc``, ``pq_dsc``, ``sq_hd95``).

Computation: :mod:`.metrics` (global metrics of one region), :mod:`.lesions` (lesion-wise, as the
official ``brats-evaluation`` BraTS-GLI config defines them), :mod:`.scoring` (one case, label
schemes, means over cases), :mod:`.folders` (truth and prediction folders, failures).
Presentation: :mod:`.report` (CSV, JSON, text table), :mod:`.plots` (matplotlib, imported only when a
picture is drawn) and :mod:`.cli` (click; imported by :mod:`brats_cls.cli`, not here, so that
importing the metrics pulls in neither click nor matplotlib). Each module's docstring holds its
definitions and conventions.
"""

from __future__ import annotations

from .folders import CaseResult, EvaluationResult, ScoredCase, TruthFile, evaluate_folder, find_truth
from .lesions import FAILED_LESIONS, LESION_METRICS, LesionMatch, label_lesions, lesion_metrics, match_lesions
from .metrics import HD95_FAILURE, HD95_METHODS, METRICS, hausdorff95, region_metrics, surface_distances
from .plots import OverlayWriter, write_dice_boxplot, write_overlay
from .report import format_table, to_json, write_csv, write_json
from .scoring import (
    ALL_METRICS,
    FAILED_CASE,
    REPORT_REGIONS,
    SCHEME_CHOICES,
    evaluate_case,
    resolve_scheme,
    summarise,
)

__all__ = [
    "ALL_METRICS", "CaseResult", "EvaluationResult", "FAILED_CASE", "FAILED_LESIONS", "HD95_FAILURE",
    "HD95_METHODS", "LESION_METRICS", "LesionMatch", "METRICS", "OverlayWriter", "REPORT_REGIONS",
    "SCHEME_CHOICES", "ScoredCase", "TruthFile", "evaluate_case", "evaluate_folder", "find_truth",
    "format_table", "hausdorff95", "label_lesions", "lesion_metrics", "match_lesions", "region_metrics",
    "resolve_scheme", "summarise", "surface_distances", "to_json", "write_csv", "write_dice_boxplot",
    "write_json", "write_overlay",
]
