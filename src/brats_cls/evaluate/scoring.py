"""One case's metrics from two label maps, the label scheme of a case, and means over cases.

``evaluate_case`` gives, per region, the global metrics (:mod:`.metrics`) and the lesion-wise ones
(:mod:`.lesions`) in one flat dict, so a script can average either kind with :func:`summarise`.

Label scheme ``"auto"`` (per case, :func:`resolve_scheme`): a truth named ``_seg`` -> 2021 (ET = 4),
``-seg`` -> 2023 (ET = 3). A plain ``<ID>.nii.gz`` truth is decided by the labels present in truth and
prediction: 4 -> 2021, 3 -> 2023, both -> error; neither -> 2023 (no ET anywhere, so every region is
the same under either scheme).
"""

from __future__ import annotations

import math

import numpy as np

from ..regions import LABEL_SCHEMES, REGIONS, labels_to_regions
from .lesions import FAILED_LESIONS, LESION_METRICS, lesion_metrics
from .metrics import HD95_FAILURE, METRICS, region_metrics

#: Order of regions in tables and CSV columns (the BraTS convention); REGIONS is the channel order.
REPORT_REGIONS = ("ET", "TC", "WT")
SCHEME_CHOICES = ("auto", *LABEL_SCHEMES)
#: Every figure of one region: the global metrics, then the lesion-wise ones.
ALL_METRICS = METRICS + LESION_METRICS
#: A failed case, as the challenge scores one: Dice 0, HD95 373 (global and lesion-wise), counts 0.
FAILED_CASE = {"dice": 0.0, "hd95": HD95_FAILURE, "sensitivity": 0.0, "specificity": 0.0, **FAILED_LESIONS}


def evaluate_case(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    spacing: tuple[float, ...],
    scheme: str,
    hd95_method: str = "pooled",
) -> dict[str, dict[str, float]]:
    """Every figure of every region of one case: ``{"WT": {"dice": ..., "sq_dsc": ...}, "TC": ..., "ET": ...}``.

    Keys per region: :data:`ALL_METRICS`. ``spacing`` is in the array axes' order (mm); ``scheme`` is
    ``"2021"`` or ``"2023"``; ValueError for a label the scheme does not know. ``hd95_method`` chooses
    the global HD95's reduction; the lesion-wise HD95 is always the official (pooled) one.
    """
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from truth shape {truth_labels.shape}")
    pred_regions = labels_to_regions(pred_labels, scheme)
    truth_regions = labels_to_regions(truth_labels, scheme)
    return {
        region: {
            **region_metrics(pred_regions[i], truth_regions[i], spacing, hd95_method),
            **lesion_metrics(pred_regions[i], truth_regions[i], spacing),
        }
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


def summarise(per_case: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{region: {metric: {"mean", "median", "std", "n"}}}`` over cases (each as :func:`evaluate_case` gives).

    NaN values (lesion-wise figures of a region absent from truth and prediction) are left out, as
    pandas' mean leaves them out in ``brats-parse-metrics``; ``n`` counts the values that entered.
    Statistics are NaN where no value entered.
    """
    table: dict[str, dict[str, dict[str, float]]] = {}
    for region in REPORT_REGIONS:
        table[region] = {}
        for metric in ALL_METRICS:
            values = np.array([case[region][metric] for case in per_case], dtype=np.float64)
            values = values[~np.isnan(values)]
            if values.size == 0:
                table[region][metric] = {"mean": math.nan, "median": math.nan, "std": math.nan, "n": 0}
            else:
                table[region][metric] = {"mean": float(values.mean()), "median": float(np.median(values)),
                                         "std": float(values.std()), "n": int(values.size)}
    return table
