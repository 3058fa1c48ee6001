"""The paper's Table 4 in miniature, on a held-out PHANTOM test set (never BraTS data).

    python scripts/phantom_table.py --weights weights --heldout runs/heldout --out docs/phantom_results.md

The held-out set (20 cases, seed 777, never trained on: the shipped weights were trained on seed 20201)
is generated on first use: 10 cases in 2023 naming and 10 in 2021 naming, two of them forced tumour-free.
Each model's flip-averaged logits are computed once per case and then combined into every row of the
table (best single model per architecture by validation Dice from the manifest, each 5-fold
ensemble, the 10-model ensemble), each with and without classifier suppression, exactly as
``brats-cls infer`` combines them (logits averaged before the sigmoid).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from brats_cls.cases import find_cases
from brats_cls.evaluate import evaluate_case
from brats_cls.predictor import Predictor
from brats_cls.io import read_case, read_label
from brats_cls.preprocess import preprocess, uncrop
from brats_cls.regions import REGIONS, regions_to_labels
from brats_cls.synth import write_cases
from brats_cls.weights import load_ensemble

HELDOUT_SEED = 777
HEALTHY = {4, 15}


def make_heldout(folder: Path, shape=None) -> None:
    if (folder / ".complete").exists():
        return
    extra = {} if shape is None else {"shape": shape}
    write_cases(folder, 10, seed=HELDOUT_SEED, naming="2023", start_index=1, healthy_indices={i for i in HEALTHY if i <= 10}, **extra)
    write_cases(folder, 10, seed=HELDOUT_SEED, naming="2021", start_index=11, healthy_indices={i for i in HEALTHY if i > 10}, **extra)
    (folder / ".complete").write_text("")


def best_by_validation(entries: list[dict], arch: str) -> int:
    candidates = [i for i, e in enumerate(entries) if e["arch"] == arch]
    return max(candidates, key=lambda i: entries[i]["training"]["best_validation_dice"]["mean"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--heldout", type=Path, default=Path("runs/heldout"))
    parser.add_argument("--out", type=Path, default=Path("docs/phantom_results.md"))
    parser.add_argument("--no-tta", action="store_true", help="identity only instead of the 8 flips")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="forward precision (infer's default on CPU is fp32)")
    parser.add_argument("--shape", default=None, help="D,H,W of a smaller held-out grid, for a quick check only")
    args = parser.parse_args()

    make_heldout(args.heldout, tuple(int(v) for v in args.shape.split(",")) if args.shape else None)
    models, entries = load_ensemble(args.weights)
    groups = {}
    for arch, label in (("unetpp", "UNet++"), ("bifpn", "BiFPN")):
        members = [i for i, e in enumerate(entries) if e["arch"] == arch]
        if members:
            groups[f"best single {label}"] = [best_by_validation(entries, arch)]
            groups[f"ensemble of {len(members)}-fold {label}"] = members
    if len(groups) > 2:
        groups[f"ensemble of {len(entries)} models"] = list(range(len(entries)))
    single = [Predictor([model], tta=not args.no_tta, precision=args.precision) for model in models]
    flips = single[0].flips
    cases = find_cases(args.heldout).cases
    scores: dict[str, list[dict]] = {}
    false_positive: dict[str, list[int]] = {}
    counts = {"cases": len(cases), "tumour_free": 0, "without_enhancing": 0}
    started = time.perf_counter()
    for number, case in enumerate(cases, 1):
        images = read_case(case)
        truth = read_label(case.seg, case.case_id, images.geometry)
        spacing = images.geometry.spacing[::-1]
        volume, box = preprocess(images.image)
        per_model = [predictor.ensemble(volume) for predictor in single]
        healthy = not truth.any()
        counts["tumour_free"] += healthy
        counts["without_enhancing"] += (not healthy) and not (truth == (4 if case.scheme == "2021" else 3)).any()
        for name, members in groups.items():
            seg = np.mean([per_model[i].seg for i in members], axis=0)
            slices = np.mean([per_model[i].slices for i in members], axis=0)
            for suppression in (False, True):
                row = f"{name} {'w.' if suppression else 'w/o'} cls"
                single[0].suppression = suppression
                regions = single[0].decide(seg, slices).regions
                labels = uncrop(regions_to_labels(regions, case.scheme), box)
                scores.setdefault(row, []).append(evaluate_case(labels, truth, spacing, case.scheme))
                if healthy:
                    false_positive.setdefault(row, []).append(int(regions[0].sum()))
        elapsed = time.perf_counter() - started
        print(f"{number}/{len(cases)} {case.case_id}: {elapsed / number:.1f} s per case", flush=True)

    table = {}
    for row, per_case in scores.items():
        dice = {r: float(np.mean([c[r]["dice"] for c in per_case])) for r in REGIONS}
        hd95 = {r: float(np.mean([c[r]["hd95"] for c in per_case])) for r in REGIONS}
        table[row] = {"dice": dice, "hd95": hd95, "mean_dice": float(np.mean(list(dice.values()))),
                      "mean_hd95": float(np.mean(list(hd95.values()))),
                      "false_positive_wt_voxels_on_tumour_free": false_positive.get(row, [])}
    lines = [
        "| Method (PHANTOM held-out set) | ET Dice | WT Dice | TC Dice | Mean | ET HD95 | WT HD95 | TC HD95 | Mean | FP WT voxels, tumour-free cases |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, values in table.items():
        d, h = values["dice"], values["hd95"]
        fp = ", ".join(str(v) for v in values["false_positive_wt_voxels_on_tumour_free"]) or "-"
        lines.append(f"| {row} | {d['ET']:.4f} | {d['WT']:.4f} | {d['TC']:.4f} | {values['mean_dice']:.4f} | "
                     f"{h['ET']:.2f} | {h['WT']:.2f} | {h['TC']:.2f} | {values['mean_hd95']:.2f} | {fp} |")
    header = (f"Held-out phantom set: {counts['cases']} cases (seed {HELDOUT_SEED}; {counts['tumour_free']} tumour-free, "
              f"{counts['without_enhancing']} without enhancing tumour), {len(flips)} flip(s), {args.precision}, weights `{args.weights}`. "
              f"HD95 in mm; 373 for a region missed or invented. Phantom data, not BraTS: these figures say "
              f"nothing about performance on real scans.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"counts": counts, "flips": len(flips), "precision": args.precision,
                                                             "seconds_per_case": elapsed / len(cases), "table": table}, indent=1))
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
