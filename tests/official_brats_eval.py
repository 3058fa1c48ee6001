"""Runs the official ``brats-evaluation`` package (panoptica, BraTS-GLI config) on a folder of
``<ID>-seg.nii.gz`` truths and ``<ID>.nii.gz`` predictions, and prints per case and region its figures
as JSON: the global Dice and HD95 (``dice``, ``hd95``) and the lesion-wise ``tp``, ``fp``, ``fn``,
``rq``, ``sq_dsc``, ``pq_dsc`` and ``sq_hd95``. Executed by tests/test_evaluate.py with the interpreter
of a separate virtual environment (``BRATS_EVAL_PYTHON``, see requirements-crosscheck.txt); it imports
nothing of brats-cls.

    python official_brats_eval.py REF_DIR PRED_DIR

NaN is written as null and an infinite value as the string "inf" (JSON has neither). A key the
package did not report at all is written as the string "missing".
"""

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

from brats_evaluation import config_path, evaluate_single_exam
from panoptica import Panoptica_Evaluator

REGIONS = {"wt": "WT", "tc": "TC", "et": "ET"}
FIGURES = {"dice": "global_bin_dsc", "hd95": "global_bin_hd95", "tp": "tp", "fp": "fp", "fn": "fn", "rq": "rq",
           "sq_dsc": "sq_dsc", "pq_dsc": "pq_dsc", "sq_hd95": "sq_hd95"}


def plain(value):
    if value is None:
        return "missing"
    value = float(value)
    if math.isnan(value):
        return None
    return "inf" if math.isinf(value) else value


def main(ref_dir: Path, pred_dir: Path) -> dict:
    warnings.simplefilter("ignore")
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    results = {}
    for ref in sorted(ref_dir.glob("*-seg.nii.gz")):
        case_id = ref.name[: -len("-seg.nii.gz")]
        found = evaluate_single_exam(str(pred_dir / f"{case_id}.nii.gz"), str(ref), case_id, evaluator)
        if "error" in found:
            raise SystemExit(f"{case_id}: brats-evaluation failed: {found['error']}")
        results[case_id] = {
            ours: {name: plain(found[theirs].get(key)) for name, key in FIGURES.items()}
            for theirs, ours in REGIONS.items()
        }
    return results


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # panoptica prints banners; stdout carries only the JSON
        found = main(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(found))
