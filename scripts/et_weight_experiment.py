"""Does a heavier ET term in the segmentation loss lift ET Dice? A controlled warm-start experiment on
one BiFPN fold (issue #22's missed target is held-out ET >= 0.80).

    python scripts/et_weight_experiment.py                     # train both arms (resumable), then score
    python scripts/et_weight_experiment.py --score-only        # score what has been trained

Two arms grow from the same parent (the shipped ``weights/bifpn_fold<F>.pt``) with the same data
(the shipped models' ``synth`` v3 training cache, made by ``scripts/train_shipped_weights.py``), the
same seeds, split, crops, augmentation and schedule; they differ only in ``region_weights``:

* ``control``: the paper's (1, 1, 1): what more steps alone give;
* ``et-weight``: (1, 1, ET_WEIGHT).

Both run at the same time, one thread each (two cores). Scored on the TUNING set (never the held-out
set): the parent and each arm as a single model, 8 flips, with and without suppression, by
``scripts/phantom_table.py``'s scorer. Writes ``docs/et_weight_experiment.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = {"control": (1.0, 1.0, 1.0), "et-weight": None}  # et-weight filled from --et-weight


def train_arm(args, arm: str, weights: tuple[float, float, float]) -> None:
    from brats_cls.training.loop import TrainOptions, train
    import torch

    torch.set_num_threads(1)
    options = TrainOptions(arch="bifpn", size="demo", fold=args.fold, workers=0, val_every=2, device="cpu",
                           progress=False, init=args.weights / f"bifpn_fold{args.fold}.pt", epochs=args.epochs,
                           learning_rate=args.lr, precision="fp32", channels_last=True, region_weights=weights)
    train(options, args.work / arm, cache_dir=args.cache, resume=True)


def score(args) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    from phantom_table import FOLDERS, make_set, score_set, summary_table
    from brats_cls.models.registry import load_model

    from brats_cls.training.loop import run_name

    files = {"parent": args.weights / f"bifpn_fold{args.fold}.pt"}
    for arm in ARMS:
        files[arm] = args.work / arm / run_name("bifpn", args.fold) / "best.pt"
    present = {name: path for name, path in files.items() if path.is_file()}
    models = [load_model(path)[0].eval() for path in present.values()]
    entries = [{"arch": "bifpn", "name": name} for name in present]
    rows = {name: ([i], None) for i, name in enumerate(present)}
    cases = make_set(args.tuning / FOLDERS["tuning"], "tuning")
    args.no_tta, args.precision = False, "fp32"
    table = summary_table(score_set(cases, models, entries, args, rows))
    result = {"fold": args.fold, "epochs_added": args.epochs, "learning_rate": args.lr,
              "region_weights": {arm: list(w) for arm, w in ARMS.items()},
              "validation": {}, "tuning": {}}
    for name in present:
        for suppression in ("w. cls", "w/o cls"):
            row = table[f"{name} {suppression}"]
            result["tuning"][f"{name} {suppression}"] = {"dice": row["dice"], "mean_dice": row["mean_dice"]}
    for arm in ARMS:
        log = args.work / arm / run_name("bifpn", args.fold) / "log.csv"
        if log.is_file():
            result["validation"][arm] = [
                {"epoch": int(r["epoch"]), **{k: round(float(r[k]), 4) for k in
                                              ("val_dice_WT", "val_dice_TC", "val_dice_ET", "val_dice_mean")}}
                for r in csv.DictReader(log.open()) if r["val_dice_ET"]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of 250 steps added to the parent")
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--et-weight", type=float, default=2.0)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "shipped" / "cache-v3")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "et-weight")
    parser.add_argument("--tuning", type=Path, default=REPO / "runs", help="folder of the tuning set")
    parser.add_argument("--arm", choices=sorted(ARMS), default=None, help=argparse.SUPPRESS)  # one arm's process
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "et_weight_experiment.json")
    args = parser.parse_args()
    ARMS["et-weight"] = (1.0, 1.0, args.et_weight)
    if args.arm:
        train_arm(args, args.arm, ARMS[args.arm])
        return
    if not args.score_only:
        if not args.cache.is_dir():
            raise SystemExit(f"no training cache at {args.cache}: run scripts/train_shipped_weights.py first")
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        base = [sys.executable, __file__, "--fold", str(args.fold), "--epochs", str(args.epochs), "--lr", str(args.lr),
                "--et-weight", str(args.et_weight), "--weights", str(args.weights), "--cache", str(args.cache),
                "--work", str(args.work)]
        args.work.mkdir(parents=True, exist_ok=True)
        jobs = [subprocess.Popen(base + ["--arm", arm], env=env, stdout=(args.work / f"{arm}.log").open("a"),
                                 stderr=subprocess.STDOUT) for arm in ARMS]
        if any(job.wait() for job in jobs):
            raise SystemExit(f"an arm failed: see {args.work}/*.log")
    result = score(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["tuning"], indent=1))


if __name__ == "__main__":
    main()
