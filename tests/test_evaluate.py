"""BraTS metrics: known answers, conventions, file naming, the CLI, pictures, and a cross-check
against the official ``brats-evaluation`` package (panoptica, BraTS-GLI config): run for real in its
own virtual environment (``BRATS_EVAL_PYTHON``, made by .ci/run from requirements-crosscheck.txt), and
its global definition re-implemented here by brute force. The package cannot be installed beside numpy
2.4 (every panoptica 2.1.x pins numpy<2.3), and forced in, its CLI crashes writing the summary JSON
(numpy 2.4 count_nonzero gives int64).

Lesion-wise figures are checked on hand-made multi-lesion masks whose answers are worked out in the
tests (split, merged, missed and invented lesions, the connectivity, the one-to-one matching), then
against the official package on the same perturbations written as NIfTI files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from scipy.spatial import cKDTree

from brats_cls.cases import CaseError
from brats_cls.cli import main
from brats_cls.evaluate import (
    ALL_METRICS,
    FAILED_LESIONS,
    HD95_FAILURE,
    LESION_METRICS,
    evaluate_case,
    evaluate_folder,
    find_truth,
    hausdorff95,
    label_lesions,
    lesion_metrics,
    match_lesions,
    region_metrics,
    resolve_scheme,
    summarise,
    surface_distances,
)
from brats_cls.io import Geometry, write_label
from brats_cls.regions import regions_to_labels

SHAPE = (40, 48, 48)  # (D, H, W)


def geometry(shape=SHAPE, spacing_xyz=(1.0, 1.0, 1.0)) -> Geometry:
    return Geometry(tuple(shape[::-1]), spacing_xyz, (0.0, -239.0, 0.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def phantom(scheme="2023", centre=(20, 24, 22)) -> np.ndarray:
    """Edema ellipsoid around a core: necrosis inside an enhancing rim."""
    whole = ellipsoid(SHAPE, centre, (11, 13, 10))
    core = ellipsoid(SHAPE, (centre[0], centre[1] + 2, centre[2]), (7, 8, 6))
    necrosis = ellipsoid(SHAPE, (centre[0], centre[1] + 2, centre[2]), (4, 5, 3))
    active = core & ~necrosis
    return regions_to_labels(np.stack([whole | core, core, active]), scheme)


# ---------------------------------------------------------------------------------------------------
# Known answers


def test_dice_sensitivity_specificity_known_answer():
    truth = np.zeros((1, 1, 10), bool)
    pred = np.zeros((1, 1, 10), bool)
    truth[0, 0, 0:4] = True  # 4 voxels
    pred[0, 0, 2:6] = True  # 4 voxels, 2 of them true positives, 2 false positives
    metrics = region_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert metrics["dice"] == pytest.approx(2 * 2 / 8)
    assert metrics["sensitivity"] == pytest.approx(2 / 4)
    assert metrics["specificity"] == pytest.approx(4 / 6)  # 6 negatives, 2 of them predicted


def test_hd95_two_voxels_uses_linear_percentile_and_spacing():
    """Truth one voxel, prediction that voxel plus its x neighbour; every voxel is surface.

    Distances: truth->pred [0]; pred->truth [0, sx]. Pooled: percentile 95 of [0, 0, sx] = 0.9 sx
    (numpy linear interpolation); directed: max(p95([0, sx]), p95([0])) = 0.95 sx.
    """
    spacing = (2.0, 1.0, 0.5)
    truth = np.zeros((5, 5, 5), bool)
    truth[2, 2, 2] = True
    pred = truth.copy()
    pred[2, 2, 3] = True
    assert hausdorff95(pred, truth, spacing, "pooled") == pytest.approx(0.9 * 0.5)
    assert hausdorff95(pred, truth, spacing, "directed") == pytest.approx(0.95 * 0.5)
    along_z = truth.copy()
    along_z[3, 2, 2] = True
    assert hausdorff95(along_z, truth, spacing, "pooled") == pytest.approx(0.9 * 2.0)


def _distance_to_box(points_mm: np.ndarray, low_mm: np.ndarray, high_mm: np.ndarray) -> np.ndarray:
    """Euclidean distance from points to an axis-aligned box (0 inside): a closed form."""
    excess = np.maximum(low_mm - points_mm, 0) + np.maximum(points_mm - high_mm, 0)
    return np.sqrt((excess**2).sum(axis=1))


def test_hd95_concentric_cubes_anisotropic_spacing():
    """Truth box inside a prediction box with a 2 mm gap on every side (1, 2, 4 voxels at 2, 1, 0.5 mm).

    Truth->prediction distances are all exactly 2 mm; prediction->truth distances are the closed-form
    distances of the prediction's shell voxels to the truth box (2 mm on the faces up to sqrt(12) mm at
    the corners). HD95 is their 95th percentile, pooled or directed.
    """
    spacing = np.array([2.0, 1.0, 0.5])
    shape = (16, 24, 40)
    low, high = np.array([5, 6, 10]), np.array([10, 17, 29])  # truth box, inclusive indices
    margin = np.array([1, 2, 4])
    truth = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    truth[tuple(slice(a, b + 1) for a, b in zip(low, high))] = True
    pred[tuple(slice(a, b + 1) for a, b in zip(low - margin, high + margin))] = True
    shell = pred.copy()
    shell[tuple(slice(a + 1, b) for a, b in zip(low - margin, high + margin))] = False
    pred_to_truth = _distance_to_box(np.argwhere(shell) * spacing, low * spacing, high * spacing)
    truth_shell_count = truth.sum() - (high - low - 1).prod()

    measured_pred_to_truth, measured_truth_to_pred = surface_distances(pred, truth, tuple(spacing))
    np.testing.assert_allclose(measured_truth_to_pred, 2.0)
    assert measured_truth_to_pred.size == truth_shell_count
    np.testing.assert_allclose(np.sort(measured_pred_to_truth), np.sort(pred_to_truth))
    assert pred_to_truth.max() == pytest.approx(math.sqrt(12))

    pooled = np.percentile(np.concatenate([pred_to_truth, np.full(truth_shell_count, 2.0)]), 95)
    assert region_metrics(pred, truth, tuple(spacing))["hd95"] == pytest.approx(pooled)
    directed = max(np.percentile(pred_to_truth, 95), 2.0)
    assert region_metrics(pred, truth, tuple(spacing), "directed")["hd95"] == pytest.approx(directed)
    assert directed >= pooled > 2.0
    # Spacing given in the wrong axis order gives another answer: the spacing is really used.
    assert region_metrics(pred, truth, tuple(spacing[::-1]))["hd95"] != pytest.approx(pooled)


def test_empty_masks_follow_brats_conventions():
    empty = np.zeros((6, 6, 6), bool)
    blob = empty.copy()
    blob[2:4, 2:4, 2:4] = True
    both_empty = region_metrics(empty, empty, (1, 1, 1))
    assert both_empty == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}
    false_alarm = region_metrics(blob, empty, (1, 1, 1))
    assert (false_alarm["dice"], false_alarm["hd95"], false_alarm["sensitivity"]) == (0.0, HD95_FAILURE, 1.0)
    assert false_alarm["specificity"] == pytest.approx(1 - 8 / 216)
    missed = region_metrics(empty, blob, (1, 1, 1))
    assert missed == {"dice": 0.0, "hd95": HD95_FAILURE, "sensitivity": 0.0, "specificity": 1.0}


def test_disjoint_masks_score_373_pooled_but_are_measured_directed():
    truth = np.zeros((4, 4, 12), bool)
    pred = truth.copy()
    truth[1, 1, 1] = True
    pred[1, 1, 7] = True
    assert region_metrics(pred, truth, (1, 1, 0.5))["hd95"] == HD95_FAILURE
    assert region_metrics(pred, truth, (1, 1, 0.5), "directed")["hd95"] == pytest.approx(3.0)


def test_region_metrics_rejects_bad_arguments():
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(ValueError, match="shape"):
        region_metrics(mask, np.ones((2, 2, 3), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        region_metrics(mask, mask, (1, 1))
    with pytest.raises(ValueError, match="HD95 method"):
        region_metrics(mask, mask, (1, 1, 1), "mean")


def test_evaluate_case_maps_labels_to_nested_regions_per_scheme():
    truth = np.zeros((1, 1, 6), np.uint8)
    truth[0, 0] = [0, 1, 2, 3, 3, 0]
    pred = np.zeros_like(truth)
    pred[0, 0] = [0, 2, 2, 3, 0, 0]
    result = evaluate_case(pred, truth, (1, 1, 1), "2023")
    assert result["WT"]["dice"] == pytest.approx(2 * 3 / (3 + 4))
    assert result["TC"]["dice"] == pytest.approx(2 * 1 / (1 + 3))  # TC = labels 1 and 3
    assert result["ET"]["dice"] == pytest.approx(2 * 1 / (1 + 2))
    with pytest.raises(ValueError, match="not in the 2021 scheme"):
        evaluate_case(pred, truth, (1, 1, 1), "2021")  # label 3 is unknown in 2021
    as_2021 = evaluate_case(np.where(pred == 3, 4, pred), np.where(truth == 3, 4, truth), (1, 1, 1), "2021")
    assert as_2021 == result


def test_resolve_scheme_auto():
    plain = [np.array([0, 1, 2])]
    assert resolve_scheme("auto", "2021", plain) == "2021"
    assert resolve_scheme("auto", "2023", plain) == "2023"
    assert resolve_scheme("auto", None, [np.array([0, 4])]) == "2021"
    assert resolve_scheme("auto", None, [np.array([0, 2]), np.array([3])]) == "2023"
    assert resolve_scheme("auto", None, plain) == "2023"
    assert resolve_scheme("2021", "2023", plain) == "2021"  # an explicit scheme wins
    with pytest.raises(ValueError, match="3 and 4"):
        resolve_scheme("auto", None, [np.array([3]), np.array([4])])


# ---------------------------------------------------------------------------------------------------
# Lesion-wise known answers (brats-evaluation BraTS-GLI definitions, lesions.py docstring)


def bars(*spans: tuple[int, int], length: int = 16) -> np.ndarray:
    """A ``(1, 1, length)`` mask holding the half-open spans: lesions along one line of voxels.

    Every voxel is surface (the array is one voxel thick), so distances are simple to work out."""
    mask = np.zeros((1, 1, length), bool)
    for start, stop in spans:
        mask[0, 0, start:stop] = True
    return mask


def test_lesions_are_26_connected_not_6():
    """Two cubes touching at one corner are one lesion (cc3d's default in panoptica, 26 neighbours);
    a one-voxel gap makes two."""
    corner = np.zeros((12, 12, 12), bool)
    corner[1:5, 1:5, 1:5] = True
    corner[5:9, 5:9, 5:9] = True
    assert label_lesions(corner)[1] == 1
    gap = np.zeros((12, 12, 12), bool)
    gap[1:5, 1:5, 1:5] = True
    gap[6:9, 1:5, 1:5] = True
    labels, count = label_lesions(gap)
    assert count == 2 and set(np.unique(labels).tolist()) == {0, 1, 2}


def test_matching_maximises_summed_dice_not_greedily():
    """Truth T1 = [0, 10), T2 = [12, 14); prediction P2 = [0, 3), P1 = [4, 14).

    Dice: T1-P1 12/20 = 0.6 (the best single pair), T1-P2 6/13, T2-P1 4/12. Greedy matching takes
    T1-P1 and leaves T2 and P2 unmatched (tp 1); panoptica's maximum bipartite matching takes
    T1-P2 + T2-P1 (summed Dice 0.795 > 0.6): tp 2, no fp, no fn."""
    truth, pred = bars((0, 10), (12, 14)), bars((0, 3), (4, 14))
    match = match_lesions(pred, truth)
    assert (match.n_truth, match.n_pred) == (2, 2)
    assert sorted((t, p) for t, p, _ in match.pairs) == [(1, 1), (2, 2)]  # raster order: P2 is label 1
    figures = lesion_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert (figures["tp"], figures["fp"], figures["fn"]) == (2, 0, 0)
    assert figures["rq"] == 1.0
    assert figures["sq_dsc"] == pytest.approx((6 / 13 + 4 / 12) / 2, abs=1e-12)
    assert figures["pq_dsc"] == pytest.approx(figures["sq_dsc"], abs=1e-12)


def test_split_lesion_matches_the_better_part_and_counts_the_other_as_false_positive():
    """Truth [0, 10); prediction [0, 4) and [5, 10). Dice 8/14 and 10/15: [5, 10) is matched.

    HD95 of the pair: truth->prediction distances 5, 4, 3, 2, 1, 0, 0, 0, 0, 0 and prediction->truth
    five zeros; the 95th percentile of the 15 pooled values (linear) is 4.3 voxels."""
    truth, pred = bars((0, 10)), bars((0, 4), (5, 10))
    figures = lesion_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert (figures["tp"], figures["fp"], figures["fn"]) == (1, 1, 0)
    assert figures["rq"] == pytest.approx(1 / 1.5)
    assert figures["sq_dsc"] == pytest.approx(10 / 15)
    assert figures["pq_dsc"] == pytest.approx(10 / 15 / 1.5)
    assert figures["sq_hd95"] == pytest.approx(4.3)
    assert lesion_metrics(pred, truth, (1.0, 1.0, 2.0))["sq_hd95"] == pytest.approx(8.6)  # spacing is used


def test_merged_lesions_match_once_and_the_other_is_a_false_negative():
    """Truth [0, 4) and [6, 10); prediction [0, 10) joins them. Both pairs have Dice 8/14: one is
    matched, the other truth lesion is missed. HD95 of either pair (mirror images): 14 pooled
    distances 0 x 8, 1, 2, 3, 4, 5, 6 -> 5.35."""
    truth, pred = bars((0, 4), (6, 10)), bars((0, 10))
    figures = lesion_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert (figures["tp"], figures["fp"], figures["fn"]) == (1, 0, 1)
    assert figures["rq"] == pytest.approx(1 / 1.5)
    assert figures["sq_dsc"] == pytest.approx(8 / 14)
    assert figures["sq_hd95"] == pytest.approx(5.35)
    # global Dice of the same masks is much kinder: 2 * 8 / 18
    assert region_metrics(pred, truth, (1.0, 1.0, 1.0))["dice"] == pytest.approx(16 / 18)


def test_missed_and_invented_lesions():
    truth = bars((0, 4), (8, 12))
    missed = lesion_metrics(bars((0, 4)), truth, (1.0, 1.0, 1.0))
    assert (missed["tp"], missed["fp"], missed["fn"], missed["sq_dsc"]) == (1, 0, 1, 1.0)
    assert missed["rq"] == pytest.approx(1 / 1.5) and missed["sq_hd95"] == 0.0
    invented = lesion_metrics(bars((0, 4), (8, 12), (14, 16)), truth, (1.0, 1.0, 1.0))
    assert (invented["tp"], invented["fp"], invented["fn"], invented["sq_dsc"]) == (2, 1, 0, 1.0)
    assert invented["rq"] == pytest.approx(2 / 2.5) and invented["pq_dsc"] == pytest.approx(2 / 2.5)


def test_lesion_figures_without_a_match_follow_panoptica_edge_cases():
    """config_gli.yaml: no lesion anywhere -> NaN; empty truth, empty prediction or no overlap ->
    rq = sq_dsc = pq_dsc = 0 and sq_hd95 infinite, written as 373."""
    empty, two = bars(), bars((0, 4), (8, 12))
    nothing = lesion_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert (nothing["tp"], nothing["fp"], nothing["fn"]) == (0, 0, 0)
    assert all(math.isnan(nothing[key]) for key in ("rq", "sq_dsc", "pq_dsc", "sq_hd95"))
    expected_zero = {"rq": 0.0, "sq_dsc": 0.0, "pq_dsc": 0.0, "sq_hd95": HD95_FAILURE}
    assert lesion_metrics(empty, two, (1.0, 1.0, 1.0)) == {"tp": 0, "fp": 0, "fn": 2, **expected_zero}
    assert lesion_metrics(two, empty, (1.0, 1.0, 1.0)) == {"tp": 0, "fp": 2, "fn": 0, **expected_zero}
    apart = lesion_metrics(bars((12, 14)), two, (1.0, 1.0, 1.0))
    assert apart == {"tp": 0, "fp": 1, "fn": 2, **expected_zero}


def test_lesion_metrics_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        lesion_metrics(bars(), bars(length=15), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        lesion_metrics(bars(), bars(), (1.0, 1.0))


def test_evaluate_case_gives_global_and_lesion_figures_per_region():
    """Two ET lesions in truth, one predicted: lesion-wise ET Dice 1 with one miss, global ET Dice 2/3."""
    truth = np.zeros((1, 1, 12), np.uint8)
    truth[0, 0] = [3, 3, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0]
    pred = truth.copy()
    pred[0, 0, 4:6] = 0
    result = evaluate_case(pred, truth, (1.0, 1.0, 1.0), "2023")
    assert all(list(result[region]) == list(ALL_METRICS) for region in ("WT", "TC", "ET"))
    assert result["ET"]["dice"] == pytest.approx(2 * 2 / 6)
    assert (result["ET"]["tp"], result["ET"]["fn"], result["ET"]["sq_dsc"]) == (1, 1, 1.0)
    assert result["ET"]["pq_dsc"] == pytest.approx(1 / 1.5)


def test_summarise_leaves_undefined_lesion_figures_out_of_the_means():
    """Three cases: ET lesion-wise Dice 1, undefined (no ET anywhere), 0.5 -> mean 0.75 over n = 2."""
    def case(et_sq_dsc):
        figures = {metric: 1.0 for metric in ALL_METRICS}
        return {"ET": {**figures, "sq_dsc": et_sq_dsc}, "TC": figures, "WT": figures}

    summary = summarise([case(1.0), case(math.nan), case(0.5)])
    assert summary["ET"]["sq_dsc"]["mean"] == pytest.approx(0.75) and summary["ET"]["sq_dsc"]["n"] == 2
    assert summary["ET"]["dice"]["n"] == 3 and summary["WT"]["sq_dsc"]["mean"] == 1.0
    nothing = summarise([case(math.nan)])["ET"]["sq_dsc"]
    assert nothing["n"] == 0 and math.isnan(nothing["mean"])


# ---------------------------------------------------------------------------------------------------
# Folders


def test_find_truth_accepts_every_naming_and_layout(tmp_path):
    labels = phantom()
    write_label(labels, geometry(), tmp_path / "CaseA.nii.gz")
    write_label(labels, geometry(), tmp_path / "BraTS2021_00002_seg.nii.gz")
    write_label(labels, geometry(), tmp_path / "BraTS-GLI-00003-000-seg.nii.gz")
    folder = tmp_path / "BraTS-GLI-00004-000"
    folder.mkdir()
    write_label(labels, geometry(), folder / "BraTS-GLI-00004-000-seg.nii.gz")
    write_label(labels, geometry(), folder / "BraTS-GLI-00004-000-t2f.nii.gz")  # a modality: ignored
    (tmp_path / "notes.txt").write_text("not an image")
    found = {t.case_id: (t.path.relative_to(tmp_path).as_posix(), t.scheme) for t in find_truth(tmp_path)}
    assert found == {
        "CaseA": ("CaseA.nii.gz", None),
        "BraTS2021_00002": ("BraTS2021_00002_seg.nii.gz", "2021"),
        "BraTS-GLI-00003-000": ("BraTS-GLI-00003-000-seg.nii.gz", "2023"),
        "BraTS-GLI-00004-000": ("BraTS-GLI-00004-000/BraTS-GLI-00004-000-seg.nii.gz", "2023"),
    }
    write_label(labels, geometry(), tmp_path / "BraTS-GLI-00004-000.nii.gz")
    with pytest.raises(CaseError, match="BraTS-GLI-00004-000.*second truth file"):
        find_truth(tmp_path)


def test_missing_or_unusable_prediction_is_a_failure(tmp_path):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    labels = phantom("2021")
    for case_id in ("BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003", "BraTS2021_00004"):
        write_label(labels, geometry(), truth_dir / f"{case_id}_seg.nii.gz")
    write_label(labels, geometry(), pred_dir / "BraTS2021_00001.nii.gz")
    # 00002 missing; 00003 on another grid; 00004 written in the 2023 scheme (label 3 unknown in 2021)
    write_label(labels[:, :, :40], geometry(labels[:, :, :40].shape), pred_dir / "BraTS2021_00003.nii.gz")
    write_label(np.where(labels == 4, 3, labels), geometry(), pred_dir / "BraTS2021_00004.nii.gz")
    write_label(labels, geometry(), pred_dir / "BraTS2021_00099.nii.gz")  # no truth: listed, ignored

    result = evaluate_folder(pred_dir, truth_dir)
    by_id = {case.case_id: case for case in result.cases}
    assert [case_id for case_id, _ in result.failures] == ["BraTS2021_00002", "BraTS2021_00003", "BraTS2021_00004"]
    assert by_id["BraTS2021_00002"].failure == "prediction missing"
    assert "size" in by_id["BraTS2021_00003"].failure
    assert "not in the 2021 scheme" in by_id["BraTS2021_00004"].failure
    for case_id in ("BraTS2021_00002", "BraTS2021_00003", "BraTS2021_00004"):
        for region in ("ET", "TC", "WT"):
            assert by_id[case_id].metrics[region]["dice"] == 0.0
            assert by_id[case_id].metrics[region]["hd95"] == HD95_FAILURE
            # lesion-wise: as brats-parse-metrics fills a missing subject (0, and 373 for HD95)
            assert {m: by_id[case_id].metrics[region][m] for m in LESION_METRICS} == FAILED_LESIONS
            assert FAILED_LESIONS["sq_hd95"] == HD95_FAILURE and FAILED_LESIONS["sq_dsc"] == 0.0
    assert by_id["BraTS2021_00001"].metrics["ET"]["dice"] == 1.0
    assert by_id["BraTS2021_00001"].scheme == "2021"
    assert result.unmatched_predictions == ["BraTS2021_00099"]
    summary = result.summary()
    assert summary["WT"]["dice"]["mean"] == pytest.approx(0.25)  # one perfect case, three failures
    assert summary["WT"]["hd95"]["median"] == pytest.approx(HD95_FAILURE)


def test_unusable_truth_is_an_error_naming_the_file(tmp_path):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    write_label(phantom("2021"), geometry(), truth_dir / "BraTS-GLI-00001-000-seg.nii.gz")  # ET 4 under 2023
    (truth_dir / "BraTS-GLI-00002-000-seg.nii.gz").write_bytes(b"truncated")
    write_label(phantom(), geometry(), truth_dir / "BraTS-GLI-00003-000-seg.nii.gz")
    write_label(phantom(), geometry(), pred_dir / "BraTS-GLI-00003-000.nii.gz")
    result = evaluate_folder(pred_dir, truth_dir)
    assert [case.case_id for case in result.cases] == ["BraTS-GLI-00003-000"]
    messages = sorted(str(error) for error in result.errors)
    assert "BraTS-GLI-00001-000" in messages[0] and "BraTS-GLI-00001-000-seg.nii.gz" in messages[0]
    assert "BraTS-GLI-00002-000" in messages[1] and "cannot read" in messages[1]


# ---------------------------------------------------------------------------------------------------
# Cross-check against brats-evaluation's definition


def reference_global_metrics(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(global Dice, global HD95)`` as ``brats-evaluate`` + ``brats-parse-metrics seg`` define them.

    Written by brute force from panoptica 2.1.7 (``panoptica_result.py``, ``metrics/_surface_distances.py``,
    ``brats_evaluation/configs/config_gli.yaml``, ``metrics_parser.py``): surface = the voxels with a
    6-neighbour outside the mask or the array; HD95 = numpy 95th percentile of the pooled distances
    from each surface voxel to the nearest surface voxel of the other mask, in voxel units (the
    global metric gets no spacing); no overlap -> Dice 0, HD95 inf -> 373; both empty -> NaN.
    """
    if not pred.any() and not truth.any():
        return math.nan, math.nan
    overlap = np.count_nonzero(pred & truth)
    if overlap == 0:
        return 0.0, HD95_FAILURE
    dice = 2 * overlap / (np.count_nonzero(pred) + np.count_nonzero(truth))

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        interior = inner.copy()
        for axis in range(3):
            for step in (-1, 1):
                interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(inner & ~interior).astype(np.float64)

    pred_points, truth_points = surface_points(pred), surface_points(truth)
    pred_to_truth = cKDTree(truth_points).query(pred_points)[0]
    truth_to_pred = cKDTree(pred_points).query(truth_points)[0]
    return dice, float(np.percentile(np.concatenate([pred_to_truth, truth_to_pred]), 95))


def crosscheck_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{case_id: (truth, prediction)}`` in the 2023 scheme: perturbed predictions of phantoms."""
    truth = phantom()
    regions = np.stack([truth > 0, (truth == 1) | (truth == 3), truth == 3])
    eroded = regions_to_labels(np.stack([_erode(r, 2) for r in regions]), "2023")
    blobs = truth.copy()
    blobs[ellipsoid(SHAPE, (4, 5, 44), (3, 3, 4))] = 3  # false-positive ET touching the array edge
    blobs[ellipsoid(SHAPE, (35, 40, 8), (3, 4, 3))] = 2  # false-positive edema
    no_et_truth = np.where(truth == 3, 1, truth)
    small_et = no_et_truth.copy()
    small_et[ellipsoid(SHAPE, (20, 26, 22), (1.5, 1.5, 1.5))] = 3
    return {
        "BraTS-GLI-00001-000": (truth, truth.copy()),
        "BraTS-GLI-00002-000": (truth, np.roll(truth, (2, -3, 1), axis=(0, 1, 2))),
        "BraTS-GLI-00003-000": (truth, eroded),
        "BraTS-GLI-00004-000": (truth, blobs),
        "BraTS-GLI-00005-000": (truth, np.zeros_like(truth)),
        "BraTS-GLI-00006-000": (no_et_truth, small_et),  # ET only in the prediction
        "BraTS-GLI-00007-000": (no_et_truth, np.roll(no_et_truth, 4, axis=2)),  # ET in neither
        "BraTS-GLI-00008-000": (phantom(centre=(18, 22, 25)), np.roll(eroded, -2, axis=0)),
    }


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=iterations)


def write_crosscheck_folders(root: Path) -> tuple[Path, Path]:
    """``root/ref/<ID>-seg.nii.gz`` and ``root/pred/<ID>.nii.gz``: the layout brats-evaluate reads."""
    ref_dir, pred_dir = root / "ref", root / "pred"
    ref_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    for case_id, (truth, pred) in crosscheck_cases().items():
        write_label(truth, geometry(), ref_dir / f"{case_id}-seg.nii.gz")
        write_label(pred, geometry(), pred_dir / f"{case_id}.nii.gz")
    return ref_dir, pred_dir


def test_global_dice_and_hd95_match_brats_evaluation_definition(tmp_path):
    ref_dir, pred_dir = write_crosscheck_folders(tmp_path)
    result = evaluate_folder(pred_dir, ref_dir)
    cases = crosscheck_cases()
    assert [case.case_id for case in result.cases] == sorted(cases)
    compared = 0
    for case in result.cases:
        truth, pred = cases[case.case_id]
        for region, labels in (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))):
            dice, hd95 = reference_global_metrics(np.isin(pred, labels), np.isin(truth, labels))
            ours = case.metrics[region]
            if math.isnan(dice):  # both empty: brats-evaluation reports NaN, we the BraTS 1 / 0
                assert (ours["dice"], ours["hd95"]) == (1.0, 0.0)
                continue
            assert ours["dice"] == pytest.approx(dice, abs=1e-6), (case.case_id, region)
            assert ours["hd95"] == pytest.approx(hd95, abs=0.5), (case.case_id, region)
            compared += 1
    assert compared == 3 * len(cases) - 1
    # The perturbations are not trivial: HD95 spans exact match, small and large errors, and failures.
    hd95s = {round(c.metrics[r]["hd95"], 3) for c in result.cases for r in ("WT", "TC", "ET")}
    assert 0.0 in hd95s and HD95_FAILURE in hd95s and any(2.0 < h < 50 for h in hd95s)


OFFICIAL_PYTHON = os.environ.get("BRATS_EVAL_PYTHON")
needs_official = pytest.mark.skipif(
    not OFFICIAL_PYTHON and os.environ.get("CI") != "true",
    reason="official evaluator not installed: set BRATS_EVAL_PYTHON (see requirements-crosscheck.txt)")


def run_official(ref_dir: Path, pred_dir: Path) -> dict:
    """``{case_id: {region: figures}}`` from ``brats-evaluation`` itself (tests/official_brats_eval.py)."""
    assert OFFICIAL_PYTHON, "CI=true: .ci/run must install the official evaluator and set BRATS_EVAL_PYTHON"
    script = Path(__file__).with_name("official_brats_eval.py")
    done = subprocess.run([OFFICIAL_PYTHON, str(script), str(ref_dir), str(pred_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def assert_lesion_figures_match(ours: dict, theirs: dict, where: tuple) -> None:
    """Every lesion-wise figure equal to 1e-6 (HD95 to 0.5 mm); the package's NaN is our NaN, its
    infinite ``sq_hd95`` our 373."""
    for metric in LESION_METRICS:
        expected, value = theirs[metric], ours[metric]
        assert expected != "missing", (where, metric)
        if expected is None:
            assert math.isnan(value), (where, metric, value)
        elif expected == "inf":
            assert metric == "sq_hd95" and value == HD95_FAILURE, (where, metric, value)
        else:
            assert value == pytest.approx(expected, abs=0.5 if metric == "sq_hd95" else 1e-6), (where, metric)


@needs_official
def test_global_and_lesion_figures_match_the_official_brats_evaluation_package(tmp_path):
    """The same predictions and truths through ``brats-evaluation`` 0.0.10 itself (BraTS-GLI config):
    global Dice to 1e-6 and HD95 to 0.5 mm, and every lesion-wise figure. Where the package reports a
    NaN global figure (both masks empty) we give BraTS's Dice 1 / HD95 0; where it reports an infinite
    HD95 (no overlap) we give 373, as its ``brats-parse-metrics`` does. Its global HD95 is in voxels;
    these cases have 1 mm spacing."""
    ref_dir, pred_dir = write_crosscheck_folders(tmp_path)
    official = run_official(ref_dir, pred_dir)
    result = evaluate_folder(pred_dir, ref_dir)
    assert sorted(official) == [case.case_id for case in result.cases] == sorted(crosscheck_cases())
    kinds = set()
    for case in result.cases:
        for region in ("WT", "TC", "ET"):
            theirs, ours = official[case.case_id][region], case.metrics[region]
            assert_lesion_figures_match(ours, theirs, (case.case_id, region))
            if theirs["dice"] is None:
                assert theirs["hd95"] is None and (ours["dice"], ours["hd95"]) == (1.0, 0.0), (case.case_id, region)
                kinds.add("both empty")
                continue
            assert ours["dice"] == pytest.approx(theirs["dice"], abs=1e-6), (case.case_id, region)
            expected_hd95 = HD95_FAILURE if theirs["hd95"] == "inf" else theirs["hd95"]
            assert ours["hd95"] == pytest.approx(expected_hd95, abs=0.5), (case.case_id, region)
            kinds.add("failure" if theirs["hd95"] == "inf" else "exact" if theirs["dice"] == 1.0 else "partial")
    assert kinds == {"both empty", "failure", "exact", "partial"}


def paint_tumour(labels: np.ndarray, centre, size: float) -> np.ndarray:
    """Edema around an enhancing rim around necrosis (2023 labels), radii scaled by ``size``."""
    labels[ellipsoid(labels.shape, centre, (1.6 * size, 1.8 * size, 1.6 * size))] = 2
    labels[ellipsoid(labels.shape, centre, (size, 1.1 * size, size))] = 3
    labels[ellipsoid(labels.shape, centre, (0.5 * size, 0.6 * size, 0.5 * size))] = 1
    return labels


TUMOURS = {"A": ((10, 12, 12), 3.5), "B": ((10, 13, 32), 3.0), "C": ((28, 34, 22), 4.0)}


def lesion_crosscheck_cases() -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """``{case_id: (truth, prediction, expected)}``: three tumours (each a lesion in WT, TC and ET)
    and one perturbation per case; ``expected`` gives ``(tp, fp, fn)`` per region that the official
    package must report, so each case is what its name says."""
    truth = np.zeros(SHAPE, np.uint8)
    for centre, size in TUMOURS.values():
        paint_tumour(truth, centre, size)
    empty = np.zeros_like(truth)
    split = truth.copy()
    split[:, :, 11:13] = 0  # a 2-voxel gap through A: each of A's regions in two
    merged = truth.copy()
    rod = merged[9:12, 12:14, 12:33]  # a necrotic rod from A's core to B's: TC and WT merge A and B
    rod[rod != 3] = 1
    missed = truth.copy()
    missed[ellipsoid(SHAPE, TUMOURS["C"][0], (8, 9, 8))] = 0
    invented = paint_tumour(truth.copy(), (30, 12, 38), 2.5)
    corner_truth, corner_pred = empty.copy(), empty.copy()  # two ET cubes meeting at one corner: 1 lesion
    corner_truth[5:9, 5:9, 5:9] = corner_truth[9:13, 9:13, 9:13] = 3
    corner_pred[5:9, 5:9, 5:9] = corner_pred[10:13, 9:13, 9:13] = 3
    greedy_truth, greedy_pred = empty.copy(), empty.copy()  # the bars of the matching test, 3x3 thick
    for labels, spans in ((greedy_truth, ((0, 10), (12, 14))), (greedy_pred, ((0, 3), (4, 14)))):
        for start, stop in spans:
            labels[20:23, 20:23, 10 + start:10 + stop] = 3
    all_regions = lambda tp, fp, fn: {region: (tp, fp, fn) for region in ("WT", "TC", "ET")}  # noqa: E731
    return {
        "BraTS-GLI-00101-000": (truth, truth.copy(), all_regions(3, 0, 0)),
        "BraTS-GLI-00102-000": (truth, split, all_regions(3, 1, 0)),
        "BraTS-GLI-00103-000": (truth, merged, {"WT": (2, 0, 1), "TC": (2, 0, 1), "ET": (3, 0, 0)}),
        "BraTS-GLI-00104-000": (truth, missed, all_regions(2, 0, 1)),
        "BraTS-GLI-00105-000": (truth, invented, all_regions(3, 1, 0)),
        "BraTS-GLI-00106-000": (truth, np.roll(truth, (1, 2, -1), axis=(0, 1, 2)), all_regions(3, 0, 0)),
        "BraTS-GLI-00107-000": (truth, empty, all_regions(0, 0, 3)),
        "BraTS-GLI-00108-000": (empty, invented, all_regions(0, 4, 0)),
        "BraTS-GLI-00109-000": (empty, empty.copy(), all_regions(0, 0, 0)),
        "BraTS-GLI-00110-000": (corner_truth, corner_pred, all_regions(1, 1, 0)),
        "BraTS-GLI-00111-000": (greedy_truth, greedy_pred, all_regions(2, 0, 0)),
    }


@needs_official
def test_lesion_figures_match_the_official_package_on_perturbed_multi_lesion_cases(tmp_path):
    """Split, merged, missed, invented and shifted lesions, empty prediction, empty truth, both empty,
    corner-connected lesions and a matching that greedy pairing gets wrong: every lesion-wise figure
    equal to the official package's (1e-6; HD95 0.5 mm), and the global ones as well."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    cases = lesion_crosscheck_cases()
    for case_id, (truth, pred, _) in cases.items():
        write_label(truth, geometry(), ref_dir / f"{case_id}-seg.nii.gz")
        write_label(pred, geometry(), pred_dir / f"{case_id}.nii.gz")
    official = run_official(ref_dir, pred_dir)
    result = evaluate_folder(pred_dir, ref_dir)
    assert [case.case_id for case in result.cases] == sorted(official) == sorted(cases)
    for case in result.cases:
        for region in ("WT", "TC", "ET"):
            theirs, ours = official[case.case_id][region], case.metrics[region]
            counts = tuple(int(theirs[key]) for key in ("tp", "fp", "fn"))
            assert counts == cases[case.case_id][2][region], (case.case_id, region, "the case is not what it says")
            assert_lesion_figures_match(ours, theirs, (case.case_id, region))
            if theirs["dice"] is not None:
                assert ours["dice"] == pytest.approx(theirs["dice"], abs=1e-6), (case.case_id, region)
    shifted = official["BraTS-GLI-00106-000"]["ET"]
    assert 0 < shifted["sq_dsc"] < 1 and 1 < shifted["sq_hd95"] < 10  # a real distance, not a convention


def test_hd95_in_mm_under_anisotropic_spacing_matches_brute_force():
    """Our spacing-aware HD95 against the same brute force on physical coordinates."""
    truth, pred = crosscheck_cases()["BraTS-GLI-00008-000"]
    spacing = np.array([3.0, 0.8, 1.25])
    for labels in ((1, 2, 3), (3,)):
        pred_mask, truth_mask = np.isin(pred, labels), np.isin(truth, labels)
        distances = []
        for a, b in ((pred_mask, truth_mask), (truth_mask, pred_mask)):
            points_a = np.argwhere(a & ~_erode_edge(a)) * spacing
            points_b = np.argwhere(b & ~_erode_edge(b)) * spacing
            distances.append(cKDTree(points_b).query(points_a)[0])
        expected = np.percentile(np.concatenate(distances), 95)
        assert region_metrics(pred_mask, truth_mask, tuple(spacing))["hd95"] == pytest.approx(expected, abs=1e-9)


def _erode_edge(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


# ---------------------------------------------------------------------------------------------------
# Command line and pictures


def _write_case_images(images_dir: Path, case_id: str, labels: np.ndarray) -> None:
    folder = images_dir / case_id
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    brain = ellipsoid(SHAPE, (20, 24, 24), (18, 22, 22))
    for suffix, gain in (("t2f", 1.0), ("t1n", 0.6), ("t1c", 0.8), ("t2w", 0.9)):
        image = brain * (100 + 10 * rng.standard_normal(SHAPE)) + 60 * gain * (labels > 0) + 80 * (labels == 3)
        sitk_image = geometry().apply(sitk.GetImageFromArray(image.astype(np.float32)))
        sitk.WriteImage(sitk_image, str(folder / f"{case_id}-{suffix}.nii.gz"))


def test_cli_writes_table_csv_json_plot_and_overlay(tmp_path):
    ref_dir, pred_dir = write_crosscheck_folders(tmp_path)
    images_dir = tmp_path / "images"
    for case_id in ("BraTS-GLI-00002-000", "BraTS-GLI-00004-000"):
        _write_case_images(images_dir, case_id, crosscheck_cases()[case_id][0])
    (pred_dir / "BraTS-GLI-00003-000.nii.gz").unlink()
    out = tmp_path / "out"
    args = ["evaluate", "--pred", str(pred_dir), "--truth", str(ref_dir), "--csv", str(out / "m.csv"),
            "--json", str(out / "m.json"), "--plot", str(out / "dice.png"), "--overlay", str(out / "overlay"),
            "--images", str(images_dir)]
    out.mkdir()
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert "8 case(s) scored" in run.output
    assert "1 failed case(s)" in run.output and "BraTS-GLI-00003-000 (prediction missing)" in run.output
    table = run.output.splitlines()
    assert sum(line.startswith("ET") for line in table) == 2 and sum(line.startswith("WT") for line in table) == 2
    lesion_header = table.index(next(line for line in table if line.startswith("lesion-wise, as BraTS ranks")))
    assert table[lesion_header + 1].split() == ["region", *LESION_METRICS]

    with open(out / "m.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = (out / "m.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["case_id", "status", "scheme", "dice_ET"]
    assert {f"{m}_{r}" for m in LESION_METRICS for r in ("ET", "TC", "WT")} <= set(header)
    assert len(rows) == 8
    by_id = {row["case_id"]: row for row in rows}
    assert by_id["BraTS-GLI-00003-000"]["status"] == "failed: prediction missing"
    assert float(by_id["BraTS-GLI-00003-000"]["hd95_WT"]) == float(by_id["BraTS-GLI-00003-000"]["sq_hd95_WT"]) == 373.0
    assert by_id["BraTS-GLI-00007-000"]["sq_dsc_ET"] == ""  # ET in neither: undefined, an empty cell
    assert float(by_id["BraTS-GLI-00004-000"]["fp_ET"]) == 1  # the invented ET blob

    def not_json(constant):
        raise AssertionError(f"{constant} in the JSON report: not RFC 8259 JSON")

    report = json.loads((out / "m.json").read_text(), parse_constant=not_json)
    assert report["failures"] == [{"case_id": "BraTS-GLI-00003-000", "reason": "prediction missing"}]
    assert report["summary"]["WT"]["dice"]["mean"] < 1.0 and report["hd95_method"] == "pooled"
    cases = {case["case_id"]: case for case in report["cases"]}
    for region in ("ET", "TC", "WT"):
        assert set(LESION_METRICS) <= set(cases["BraTS-GLI-00001-000"]["metrics"][region])
    assert cases["BraTS-GLI-00001-000"]["metrics"]["ET"]["pq_dsc"] == 1.0
    assert cases["BraTS-GLI-00007-000"]["metrics"]["ET"]["sq_dsc"] is None
    # the summary's lesion-wise mean leaves the undefined case out: 7 of 8 cases have ET somewhere
    et_sq = report["summary"]["ET"]["sq_dsc"]
    defined = [c["metrics"]["ET"]["sq_dsc"] for c in report["cases"] if c["metrics"]["ET"]["sq_dsc"] is not None]
    assert et_sq["n"] == len(defined) == 7 and et_sq["mean"] == pytest.approx(float(np.mean(defined)))
    assert (out / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    overlays = sorted(p.name for p in (out / "overlay").iterdir())
    assert overlays == ["BraTS-GLI-00002-000.png", "BraTS-GLI-00004-000.png"]
    import matplotlib.image

    pixels = matplotlib.image.imread(out / "overlay" / "BraTS-GLI-00004-000.png")[..., :3]
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)  # ET contours
    green = (pixels[..., 1] > 0.4) & (pixels[..., 0] < 0.3) & (pixels[..., 2] < 0.3)  # WT contours
    assert red.sum() > 50 and green.sum() > 50


def test_cli_usage_errors(tmp_path):
    ref_dir, pred_dir = write_crosscheck_folders(tmp_path)
    run = CliRunner().invoke(main, ["evaluate", "--pred", str(pred_dir), "--truth", str(ref_dir),
                                    "--overlay", str(tmp_path / "o")])
    assert run.exit_code == 2 and "--images" in run.output
    empty = tmp_path / "empty"
    empty.mkdir()
    run = CliRunner().invoke(main, ["evaluate", "--pred", str(pred_dir), "--truth", str(empty)])
    assert run.exit_code == 2 and "no truth file" in run.output


def test_the_metrics_import_without_click_or_matplotlib():
    # the package exports its report and plot functions, yet a script that only scores pays for neither
    code = ("import sys, brats_cls.evaluate as e; "
            "assert callable(e.format_table) and callable(e.write_dice_boxplot); "
            "print(sorted(m for m in ('click', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
