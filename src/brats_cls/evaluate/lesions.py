"""Lesion-wise metrics of one binary region, as BraTS ranks since 2023.

Exactly the definitions of the official ``brats-evaluation`` 0.0.10 package with its BraTS-GLI
config (``brats_evaluation/configs/config_gli.yaml``, run by panoptica 2.1.7); a test runs that
package on the same files and requires the same numbers (``tests/test_evaluate.py``). Per region
(ET, TC, WT):

1. **Lesions** are the connected components of the truth mask and of the prediction mask, each on
   its own, with full connectivity (26 neighbours in 3-D): ``skimage.measure.label(mask,
   connectivity=mask.ndim)``. The config's ``ConnectedComponentsInstanceApproximator`` with
   ``cca_backend: null`` runs ``cc3d.connected_components``, whose default is 26. No dilation and no
   minimum lesion size (the 2023 lesion-wise script dilated the truth by 3 voxels and dropped lesions
   under 50 voxels; the current config does neither).
2. **Matching** is one-to-one and maximises the summed Dice (``MaxBipartiteMatching``,
   ``matching_metric: DSC``, ``matching_threshold: 0.000001``): ``linear_sum_assignment`` on the cost
   ``1 - Dice`` for every pair of lesions with Dice >= 1e-6 and ``1 + 1e-6`` for every other pair;
   an assigned pair is a match when its cost is below 1. A lesion that a prediction splits in two is
   matched to the larger part (the other is a false positive); two lesions that a prediction merges
   are matched to it once (the other is a false negative).
3. **Figures**, with the official names:

   - ``tp`` matched pairs, ``fp`` prediction lesions left unmatched, ``fn`` truth lesions left
     unmatched;
   - ``rq`` recognition quality (F1 of detection) ``tp / (tp + fp/2 + fn/2)``;
   - ``sq_dsc`` mean Dice over the matched pairs, each truth lesion against its prediction lesion
     alone (the lesion-wise Dice);
   - ``sq_hd95`` mean HD95 (mm, pooled, :func:`.metrics.hausdorff95`) over the matched pairs;
   - ``pq_dsc`` panoptic quality ``sq_dsc * rq``.

4. **No match** (panoptica's zero-true-positive rules in the config's ``edge_case_handler``):

   - no lesion in truth nor prediction: ``tp = fp = fn = 0``, and ``rq``, ``sq_dsc``, ``pq_dsc`` and
     ``sq_hd95`` are NaN (undefined; ``null`` in JSON, left out of means as pandas' mean leaves them
     out in ``brats-parse-metrics``);
   - lesions only in the prediction (empty truth: ``fp`` = their number), only in the truth (empty
     prediction: ``fn`` = their number), or in both but none overlapping: ``rq = sq_dsc = pq_dsc =
     0``; ``sq_hd95`` is +inf in the package, written here as :data:`~.metrics.HD95_FAILURE`
     (373 mm), the number ``brats-parse-metrics`` puts for an infinite global HD95 and its
     lesion-wise (``mets``) parser for an unmatched lesion, so that means over cases stay finite.

5. **A failed case** (prediction missing or unusable) is filled as ``brats-parse-metrics`` fills a
   missing subject: 0 for every figure and 373 for ``sq_hd95`` (:data:`FAILED_LESIONS`).

One deliberate difference: the package gives panoptica SimpleITK's ``(x, y, z)`` spacing for a
``(z, y, x)`` array, so its lesion HD95 mixes up the axes on an anisotropic grid; ours uses the spacing
in array order. On BraTS data (1 mm isotropic) the two are the same number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage import measure

from .metrics import HD95_FAILURE, check_pair, hausdorff95

#: The lesion-wise figures of one region, with the official names, in table and CSV order.
LESION_METRICS = ("tp", "fp", "fn", "rq", "sq_dsc", "pq_dsc", "sq_hd95")
#: The lowest Dice at which two lesions may be matched (config_gli.yaml ``matching_threshold``).
MATCH_THRESHOLD = 1e-6
_NO_MATCH_COST = 1.0 + 1e-6  # panoptica's cost for a pair below the threshold: never a match
#: A failed case, as brats-parse-metrics fills a missing subject.
FAILED_LESIONS = {"tp": 0, "fp": 0, "fn": 0, "rq": 0.0, "sq_dsc": 0.0, "pq_dsc": 0.0, "sq_hd95": HD95_FAILURE}


@dataclass(frozen=True)
class LesionMatch:
    """Lesions of truth and prediction (label maps 1..n, 0 background) and the matched pairs."""

    truth_lesions: np.ndarray
    pred_lesions: np.ndarray
    n_truth: int
    n_pred: int
    pairs: tuple[tuple[int, int, float], ...]  # (truth lesion, prediction lesion, Dice)


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components with full connectivity (26 neighbours in 3-D): ``(labels, count)``."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = measure.label(mask, connectivity=mask.ndim, return_num=True)
    return labels, int(count)


def dice_table(truth_lesions: np.ndarray, n_truth: int, pred_lesions: np.ndarray, n_pred: int) -> np.ndarray:
    """``(n_truth, n_pred)`` Dice of every truth lesion with every prediction lesion, from one pass."""
    both = (truth_lesions > 0) & (pred_lesions > 0)
    pair = (truth_lesions[both].astype(np.int64) - 1) * n_pred + (pred_lesions[both].astype(np.int64) - 1)
    overlap = np.bincount(pair, minlength=n_truth * n_pred).reshape(n_truth, n_pred).astype(np.float64)
    truth_sizes = np.bincount(truth_lesions.ravel(), minlength=n_truth + 1)[1:].astype(np.float64)
    pred_sizes = np.bincount(pred_lesions.ravel(), minlength=n_pred + 1)[1:].astype(np.float64)
    return 2.0 * overlap / (truth_sizes[:, None] + pred_sizes[None, :])


def _box(pred: np.ndarray, truth: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both masks (components and distances are the same inside it)."""
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1) if present.size else slice(0, 0))
    return tuple(box)


def match_lesions(pred: np.ndarray, truth: np.ndarray) -> LesionMatch:
    """Label both masks' lesions and match them one to one (module docstring, step 2).

    The label maps cover the masks' joint bounding box, not the whole array.
    """
    box = _box(np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool))
    truth_lesions, n_truth = label_lesions(truth[box])
    pred_lesions, n_pred = label_lesions(pred[box])
    pairs: tuple[tuple[int, int, float], ...] = ()
    if n_truth and n_pred:
        dice = dice_table(truth_lesions, n_truth, pred_lesions, n_pred)
        cost = np.where(dice >= MATCH_THRESHOLD, 1.0 - dice, _NO_MATCH_COST)
        rows, cols = linear_sum_assignment(cost)
        pairs = tuple((int(r) + 1, int(c) + 1, float(dice[r, c])) for r, c in zip(rows, cols) if cost[r, c] < 1.0)
    return LesionMatch(truth_lesions, pred_lesions, n_truth, n_pred, pairs)


def lesion_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """``tp``, ``fp``, ``fn``, ``rq``, ``sq_dsc``, ``pq_dsc``, ``sq_hd95`` of one binary region.

    ``pred`` and ``truth`` are boolean arrays of one shape; ``spacing`` (mm) is in the array axes'
    order. Definitions and the cases without a match are in the module docstring.
    """
    pred, truth = check_pair(pred, truth, spacing)
    match = match_lesions(pred, truth)
    tp = len(match.pairs)
    counts = {"tp": tp, "fp": match.n_pred - tp, "fn": match.n_truth - tp}
    if tp == 0:
        undefined = match.n_pred + match.n_truth == 0
        zero = math.nan if undefined else 0.0
        return {**counts, "rq": zero, "sq_dsc": zero, "pq_dsc": zero,
                "sq_hd95": math.nan if undefined else HD95_FAILURE}
    rq = tp / (tp + 0.5 * counts["fp"] + 0.5 * counts["fn"])
    sq_dsc = float(np.mean([dice for _, _, dice in match.pairs]))
    sq_hd95 = float(np.mean([
        hausdorff95(match.pred_lesions == p, match.truth_lesions == t, spacing) for t, p, _ in match.pairs
    ]))
    return {**counts, "rq": rq, "sq_dsc": sq_dsc, "pq_dsc": sq_dsc * rq, "sq_hd95": sq_hd95}
