"""Do engines give the same masks? The shipped ensemble on the held-out PHANTOM set (never BraTS data),
once per engine, compared voxel by voxel with the reference and by Dice against the truth (issue #24's
agreement limits: >= 99.9 % identical voxels, mean Dice within 0.002).

    python scripts/engine_agreement.py                              # eager vs openvino, float32
    python scripts/engine_agreement.py --engines eager,onnxruntime --limit 4
    python scripts/engine_agreement.py --reference-full --engines eager:fp32,openvino:fp32,openvino:bf16

The first engine is the reference, every other one a candidate compared with it; ``NAME:PRECISION``
sets an engine's precision (else ``--precision``). Writes ``bench/results/engine_agreement_<engines>.json``
(per case: the voxels that differ from the reference, each engine's Dice per region and its seconds)
and prints the summary. The set is
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


def spec(item: str, precision: str, full: bool = False) -> tuple[str, str, str, bool]:
    """``NAME[:PRECISION]`` -> (label, engine, precision, coarse logit sums)."""
    name, _, own = item.partition(":")
    precision = own or precision
    return f"{name}{'-full' * full}:{precision}", name, precision, not full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--work", type=Path, default=REPO / "runs")
    parser.add_argument("--engines", default="eager,openvino",
                        help="reference,candidate[,candidate...], each NAME[:PRECISION]")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="where an engine names none")
    parser.add_argument("--limit", type=int, default=None, help="the first N cases only (a quick check)")
    parser.add_argument("--reference-full", action="store_true",
                        help="the reference at full resolution per flip (coarse_logits=False)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    items = args.engines.split(",")
    if len(items) < 2:
        parser.error("--engines takes a reference and at least one candidate")
    specs = [spec(items[0], args.precision, args.reference_full)] + [spec(item, args.precision) for item in items[1:]]
    names = [label for label, *_ in specs]
    cases = make_set(args.work / FOLDERS["heldout"], "heldout")[: args.limit]
    models, entries = load_ensemble(args.weights, skip_unweighted=True)
    predictors = {label: Predictor(models, precision=precision, weights=ensemble_weights(entries), engine=engine,
                                   coarse_logits=coarse)
                  for label, engine, precision, coarse in specs}
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
        reference = labels[names[0]]
        dice = {name: {r: v["dice"] for r, v in evaluate_case(labels[name], truth, images.geometry.spacing[::-1],
                                                               case.scheme).items() if r in REGIONS}
                for name in names}
        rows.append({"case": case.case_id, "voxels": int(reference.size), "dice": dice, "seconds": seconds,
                     "differing_voxels": {name: int(np.count_nonzero(reference != labels[name])) for name in names[1:]}})
        print(f"{number}/{len(cases)} {case.case_id}: "
              + ", ".join(f"{name} {rows[-1]['differing_voxels'][name]} voxels differ" for name in names[1:]) + "; "
              + ", ".join(f"{name} {seconds[name]:.1f} s" for name in names), flush=True)
    mean = {name: {r: float(np.mean([row["dice"][name][r] for row in rows])) for r in REGIONS} for name in names}
    voxels = sum(r["voxels"] for r in rows)
    summary = {
        "reference": names[0], "cases": len(rows), "models": [entry["name"] for entry in entries],
        "mean_dice": mean,
        "seconds_per_case": {name: float(np.mean([row["seconds"][name] for row in rows])) for name in names},
        "candidates": {name: {
            "identical_share": 1.0 - sum(r["differing_voxels"][name] for r in rows) / voxels,
            "worst_case_identical_share": min(1.0 - r["differing_voxels"][name] / r["voxels"] for r in rows),
            "mean_dice_difference": {r: mean[name][r] - mean[names[0]][r] for r in REGIONS},
        } for name in names[1:]},
        "per_case": rows,
    }
    tag = "_".join(name.replace(":", "-") for name in names)
    out = args.out or REPO / "bench" / "results" / f"engine_agreement_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_case"}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
