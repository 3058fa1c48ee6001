"""Do two engines give the same masks? The shipped ensemble on the held-out PHANTOM set (never BraTS
data), once per engine at the same precision, compared voxel by voxel and by Dice against the truth
(issue #24's agreement limits: >= 99.9 % identical voxels, mean Dice within 0.002).

    python scripts/engine_agreement.py                              # eager vs openvino, float32
    python scripts/engine_agreement.py --engines eager,onnxruntime --limit 4
    python scripts/engine_agreement.py --reference-full    # the reference without coarse logit sums

Writes ``bench/results/engine_agreement_<engines>_<precision>.json`` (per case: the share of identical
voxels, each engine's Dice per region and its seconds) and prints the summary. The set is
``scripts/phantom_table.py``'s held-out set, made there on first use. Each engine gets its own Predictor
on the same loaded networks, so a case is read and preprocessed once for both. ``--reference-full``:
the reference runs every network's full-resolution ``forward`` per flip (``coarse_logits=False``), the
path the coarse logit sums (:mod:`brats_cls.logit_grid`) replace; the file name then says ``full``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phantom_table import FOLDERS, REPO, make_set  # noqa: E402  (the held-out set and its folder)

from brats_cls.evaluate import evaluate_case  # noqa: E402
from brats_cls.io import read_case, read_label  # noqa: E402
from brats_cls.predictor import Predictor  # noqa: E402
from brats_cls.preprocess import preprocess, uncrop  # noqa: E402
from brats_cls.regions import REGIONS, regions_to_labels  # noqa: E402
from brats_cls.weights import ensemble_weights, load_ensemble  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--work", type=Path, default=REPO / "runs")
    parser.add_argument("--engines", default="eager,openvino", help="reference,candidate")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--limit", type=int, default=None, help="the first N cases only (a quick check)")
    parser.add_argument("--reference-full", action="store_true",
                        help="the reference at full resolution per flip (coarse_logits=False)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = args.engines.split(",")
    if len(names) != 2:
        parser.error("--engines takes two names: reference,candidate")
    cases = make_set(args.work / FOLDERS["heldout"], "heldout")[: args.limit]
    models, entries = load_ensemble(args.weights, skip_unweighted=True)
    if args.reference_full:
        names[0] += "-full"
    predictors = {name: Predictor(models, precision=args.precision, weights=ensemble_weights(entries),
                                  engine=name.removesuffix("-full"), coarse_logits=not name.endswith("-full"))
                  for name in names}
    rows = []
    for number, case in enumerate(cases, 1):
        images = read_case(case)
        truth = read_label(case.seg, case.case_id, images.geometry)
        volume, box = preprocess(images.image)
        labels, seconds = {}, {}
        for name, predictor in predictors.items():
            started = time.perf_counter()
            logits = predictor.ensemble(volume)
            regions = predictor.decide(logits.seg, logits.slices).regions
            labels[name] = uncrop(regions_to_labels(regions, case.scheme), box)
            seconds[name] = time.perf_counter() - started
        reference, candidate = (labels[name] for name in names)
        dice = {name: {r: v["dice"] for r, v in evaluate_case(labels[name], truth, images.geometry.spacing[::-1],
                                                               case.scheme).items() if r in REGIONS}
                for name in names}
        rows.append({"case": case.case_id, "differing_voxels": int(np.count_nonzero(reference != candidate)),
                     "voxels": int(reference.size), "dice": dice, "seconds": seconds})
        print(f"{number}/{len(cases)} {case.case_id}: {rows[-1]['differing_voxels']} voxels differ; "
              + ", ".join(f"{name} {seconds[name]:.1f} s" for name in names), flush=True)
    mean = {name: {r: float(np.mean([row["dice"][name][r] for row in rows])) for r in REGIONS} for name in names}
    summary = {
        "engines": names, "precision": args.precision, "cases": len(rows),
        "models": [entry["name"] for entry in entries],
        "identical_share": 1.0 - sum(r["differing_voxels"] for r in rows) / sum(r["voxels"] for r in rows),
        "worst_case_identical_share": min(1.0 - r["differing_voxels"] / r["voxels"] for r in rows),
        "mean_dice": mean,
        "mean_dice_difference": {r: mean[names[1]][r] - mean[names[0]][r] for r in REGIONS},
        "seconds_per_case": {name: float(np.mean([row["seconds"][name] for row in rows])) for name in names},
        "per_case": rows,
    }
    out = args.out or REPO / "bench" / "results" / f"engine_agreement_{'_'.join(names)}_{args.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_case"}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
