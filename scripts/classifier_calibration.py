"""What the slice classifier does at the paper's threshold, per model and for the ensemble, on the
PHANTOM tuning set (scripts/phantom_table.py SETS["tuning"]; never the held-out test set, never BraTS data).

    python scripts/classifier_calibration.py [--weights DIR] [--out docs/classifier_calibration.json]

For each region and each network (flip-averaged logits, as ``brats-cls infer`` computes them) and for
the equal-weight ensemble of all of them:

* ``auc``: the slice AUC of the slice logits against the ground truth (a slice is positive when it
  holds one voxel of the region, the training target);
* ``sensitivity`` / ``specificity``: shares of the positive / negative slices called so at logit 0;
* what suppression does to the segmentation: ``fp_slices`` (slices the segmentation marks but the
  truth does not) and how many of them the classifier erases; ``tp_slices`` (marked and true) and how
  many it erases, with the true-positive voxels lost and the false-positive voxels removed;
* ``dice_without`` / ``dice_with``: the region's Dice over the set (voxels pooled), without and with
  suppression.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from brats_cls.io import read_case, read_label
from brats_cls.predictor import Predictor, positive
from brats_cls.preprocess import preprocess, uncrop, uncrop_slices
from brats_cls.regions import REGIONS, labels_to_regions
from brats_cls.weights import load_ensemble

REPO = Path(__file__).resolve().parents[1]


def slice_auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Mann-Whitney AUC (ties count one half, by scipy's average ranks); None when one class is absent."""
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if not positives or not negatives:
        return None
    rank_sum = rankdata(scores)[truth].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


class Tally:
    """Slice logits and suppression effects of one predictor (a network or the ensemble), pooled over cases."""

    def __init__(self):
        self.logits = {r: [] for r in REGIONS}
        self.truth = {r: [] for r in REGIONS}
        self.counts = {r: dict.fromkeys(("fp_slices", "fp_slices_erased", "tp_slices", "tp_slices_erased",
                                         "tp_voxels_lost", "fp_voxels_removed", "intersection_without",
                                         "intersection_with", "predicted_without", "predicted_with",
                                         "truth_voxels"), 0) for r in REGIONS}

    def add(self, seg: np.ndarray, slices: np.ndarray, box, truth: np.ndarray) -> None:
        """``seg (3, d, h, w)`` and ``slices (3, d)`` logits on the padded grid; ``truth (3, D, H, W)`` bool."""
        marked = uncrop(positive(seg), box, fill=False)
        slice_logits = uncrop_slices(slices, box, fill=-np.inf)
        inside = slice(box.start[0], box.stop[0])
        for index, region in enumerate(REGIONS):
            true_slices = truth[index].any(axis=(1, 2))
            self.logits[region].append(slice_logits[index, inside])
            self.truth[region].append(true_slices[inside])
            erased = ~positive(slice_logits[index])
            kept = marked[index].copy()
            kept[erased] = False
            holds = marked[index].any(axis=(1, 2))
            c = self.counts[region]
            c["fp_slices"] += int((holds & ~true_slices).sum())
            c["fp_slices_erased"] += int((holds & ~true_slices & erased).sum())
            c["tp_slices"] += int((holds & true_slices).sum())
            c["tp_slices_erased"] += int((holds & true_slices & erased).sum())
            removed = marked[index] & ~kept
            c["tp_voxels_lost"] += int((removed & truth[index]).sum())
            c["fp_voxels_removed"] += int((removed & ~truth[index]).sum())
            c["intersection_without"] += int((marked[index] & truth[index]).sum())
            c["intersection_with"] += int((kept & truth[index]).sum())
            c["predicted_without"] += int(marked[index].sum())
            c["predicted_with"] += int(kept.sum())
            c["truth_voxels"] += int(truth[index].sum())

    def summary(self) -> dict:
        out = {}
        for region in REGIONS:
            scores, truth = np.concatenate(self.logits[region]), np.concatenate(self.truth[region])
            c = self.counts[region]
            called = scores >= 0
            out[region] = c | {
                "auc": slice_auc(scores, truth),
                "sensitivity": float(called[truth].mean()) if truth.any() else None,
                "specificity": float((~called[~truth]).mean()) if (~truth).any() else None,
                "dice_without": 2 * c["intersection_without"] / max(c["predicted_without"] + c["truth_voxels"], 1),
                "dice_with": 2 * c["intersection_with"] / max(c["predicted_with"] + c["truth_voxels"], 1),
            }
        return out


def main() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("phantom_table", REPO / "scripts" / "phantom_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--work", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "classifier_calibration.json")
    parser.add_argument("--no-tta", action="store_true")
    args = parser.parse_args()
    models, entries = load_ensemble(args.weights)
    cases = table.make_set(args.work / table.FOLDERS["tuning"], "tuning")
    predictors = [Predictor([model], tta=not args.no_tta, precision="auto") for model in models]
    names = [f"{e['arch']}_fold{e['fold']}" for e in entries]
    tallies = {name: Tally() for name in names + ["ensemble"]}
    for number, case in enumerate(cases, 1):
        images = read_case(case)
        truth = labels_to_regions(read_label(case.seg, case.case_id, images.geometry), case.scheme)
        volume, box = preprocess(images.image)
        per_model = [p.ensemble(volume) for p in predictors]
        for name, logits in zip(names, per_model):
            tallies[name].add(logits.seg, logits.slices, box, truth)
        tallies["ensemble"].add(np.mean([m.seg for m in per_model], axis=0),
                                np.mean([m.slices for m in per_model], axis=0), box, truth)
        print(f"{number}/{len(cases)} {case.case_id}", flush=True)
    result = {name: tally.summary() for name, tally in tallies.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"set": f"tuning (seed {table.SETS['tuning']['seed']}), phantoms", "weights": str(args.weights),
                                    "models": result}, indent=1) + "\n")
    for name, regions in result.items():
        for region, r in regions.items():
            print(f"{name:14s} {region}: AUC {r['auc'] or float('nan'):.3f} sens {r['sensitivity']:.3f} "
                  f"spec {r['specificity']:.3f} | FP slices {r['fp_slices']} erased {r['fp_slices_erased']} | "
                  f"TP slices {r['tp_slices']} erased {r['tp_slices_erased']} (voxels lost {r['tp_voxels_lost']}, "
                  f"FP voxels removed {r['fp_voxels_removed']}) | Dice {r['dice_without']:.4f} -> {r['dice_with']:.4f}")


if __name__ == "__main__":
    main()
