"""Global (whole-region) BraTS metrics of one binary region: Dice, HD95, sensitivity, specificity.

Definitions (decisions where the paper is silent; each one is pinned by a test):

* **Dice** ``2|P∩T| / (|P| + |T|)``; both masks empty -> 1, exactly one empty -> 0
  (:func:`brats_cls.regions.dice_score`, the project's one Dice).
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

The lesion-wise metrics (one figure per connected lesion, matched) are in :mod:`.lesions`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..regions import dice_score

#: HD95 (mm) of a failed case or a region present in only one of truth and prediction.
HD95_FAILURE = 373.0
#: The global metrics of one region, in table and CSV order.
METRICS = ("dice", "hd95", "sensitivity", "specificity")
HD95_METHODS = ("pooled", "directed")


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


def check_pair(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays of one shape, with one spacing value per axis; ValueError otherwise."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not have one value per axis of {truth.shape}")
    return pred, truth


def region_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], hd95_method: str = "pooled"
) -> dict[str, float]:
    """Dice, HD95 (mm), sensitivity and specificity of one binary region.

    ``pred`` and ``truth`` are boolean ``(D, H, W)`` arrays; ``spacing`` is ``(sz, sy, sx)`` in mm,
    the array axes' order. Conventions for empty masks are in the module docstring.
    """
    pred, truth = check_pair(pred, truth, spacing)
    if hd95_method not in HD95_METHODS:
        raise ValueError(f"unknown HD95 method {hd95_method!r}; expected one of {HD95_METHODS}")
    true_pos = int(np.count_nonzero(pred & truth))
    pred_count = int(np.count_nonzero(pred))
    truth_count = int(np.count_nonzero(truth))
    false_pos = pred_count - true_pos
    negatives = truth.size - truth_count
    sensitivity = 1.0 if truth_count == 0 else true_pos / truth_count
    specificity = 1.0 if negatives == 0 else (negatives - false_pos) / negatives
    if pred_count == 0 and truth_count == 0:
        hd95 = 0.0
    elif pred_count == 0 or truth_count == 0 or (true_pos == 0 and hd95_method == "pooled"):
        hd95 = HD95_FAILURE
    else:
        hd95 = hausdorff95(pred, truth, spacing, hd95_method)
    return {"dice": dice_score(pred, truth), "hd95": hd95, "sensitivity": sensitivity, "specificity": specificity}
