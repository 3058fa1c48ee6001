"""Reproduce every file in weights/: phantom training set -> cache -> 5 folds x 2 architectures (demo
preset and recipe) -> weights/<arch>_fold<N>.pt + weights/manifest.json. Resumable and idempotent.

    python scripts/train_shipped_weights.py                      # CPU or GPU, the defaults below
    python scripts/train_shipped_weights.py --only bifpn:0       # one model
    python scripts/train_shipped_weights.py --only bifpn:1,unetpp:0,bifpn:2   # these, in this order

* The five BiFPN folds first, then the five UNet++ folds: on the validation phantoms the demo BiFPN
  learns much faster (mean Dice 0.64 against 0.31 after 1,000 steps, fold 0), so a usable ensemble
  exists sooner.
* A model counts as finished when weights/ holds it with the current recipe (``training.recipe_tag``
  in the manifest) and its checksum; a run in progress continues from its ``last.pt``.
* After each finished model, weights/<arch>_fold<N>.pt and the manifest are rewritten, so the model
  can be committed at once (a background job ends with the session: commit as they land).
* Speed settings measured on a 2-core CPU (BENCHMARKS.md, ``brats-cls bench --training``): both in
  float32 with channels_last_3d. UNet++ steps faster in bfloat16 (6.1 against 5.6 samples/s), but its
  first bfloat16 run reached NaN weights at step ~1,600 (kept in runs/shipped/unetpp-fold0-bf16-diverged
  on the machine that ran it); float32 it is. They change arithmetic, not the recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from brats_cls.models.registry import count_parameters, load_model
from brats_cls.synth import write_cases
from brats_cls.training.data import preprocess_dataset
from brats_cls.training.loop import TrainOptions, run_name, train
from brats_cls.weights import sha256_of, write_manifest

REPO = Path(__file__).resolve().parents[1]
#: Per architecture; bumped whenever its preset, the recipe or the training data change: models of an older
#: tag are retrained.
RECIPE_TAGS = {
    "bifpn": "demo-v2: 2 mm logits, classifier windows, 5000 steps of 64^3, wide augmentation, synth v2 x150",
    "unetpp": "demo-v2.1: UNet++ filters 6-8-16-32-64 + learned 2x2x2 stem, 2 mm logits, classifier windows, "
              "5000 steps of 64^3, wide augmentation, synth v2 x150",
}
SPEED = {"bifpn": {"precision": "fp32", "channels_last": True}, "unetpp": {"precision": "fp32", "channels_last": True}}


def commit_of(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_entries(weights: Path) -> dict[str, dict]:
    manifest = weights / "manifest.json"
    if not manifest.is_file():
        return {}
    return {entry["name"]: entry for entry in json.loads(manifest.read_text())["models"]
            if (weights / entry["file"]).is_file()}


def finished(weights: Path, name: str, arch: str) -> bool:
    entry = read_entries(weights).get(name)
    return bool(entry and entry.get("training", {}).get("recipe_tag") == RECIPE_TAGS[arch]
                and sha256_of(weights / entry["file"]) == entry.get("sha256"))


def ship(run_dir: Path, weights: Path, args) -> None:
    """Copy ``run_dir/best.pt`` into weights/ and describe it in the manifest (other models kept)."""
    run = json.loads((run_dir / "run.json").read_text())
    model, metadata = load_model(run_dir / "best.pt")
    name = f"{run['arch']}_fold{run['fold']}"
    target = weights / f"{name}.pt"
    shutil.copyfile(run_dir / "best.pt", target.with_suffix(".tmp"))
    target.with_suffix(".tmp").replace(target)
    logs = REPO / "docs" / "training_logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "log.csv", logs / f"{name}.csv")  # for the curve of Dice against steps
    entries = read_entries(weights)
    entries[name] = {
        "name": name, "file": target.name, "arch": run["arch"], "fold": run["fold"], "size": run["size"],
        "config": model.config, "parameters": count_parameters(model),
        "training": {
            "data": f"phantom cases: brats-cls synth --cases {args.cases} --seed {args.data_seed} (synth v2)",
            "recipe_tag": RECIPE_TAGS[run["arch"]], "recipe": run["recipe"], "precision": run["precision"],
            "channels_last": run["channels_last"], "training_cases": len(run["training_cases"]),
            "validation_cases": len(run["validation_cases"]), "epochs": run["recipe"]["epochs"],
            "steps": run["recipe"]["epochs"] * run["steps_per_epoch"], "best_epoch": metadata.get("epoch"),
            "best_step": metadata.get("step"), "seed": run["seed"], "split_seed": run["split_seed"],
            "commit": commit_of(REPO), "best_validation_dice": metadata.get("val_dice"),
            "best_validation_cls_dice": metadata.get("val_cls_dice"), "log": f"docs/training_logs/{name}.csv",
        },
    }
    write_manifest(weights, sorted(entries.values(), key=lambda e: (e["arch"], e["fold"])))


def prepare_data(work: Path, cases: int, data_seed: int) -> Path:
    data = work / "phantom-train"
    if not (data / ".complete").exists():
        print(f"== synthesising {cases} training phantoms (seed {data_seed})", flush=True)
        write_cases(data, cases, seed=data_seed, naming="2021", healthy_fraction=0.1)
        (data / ".complete").write_text("")
    print("== preprocessing (intact cached cases are skipped)", flush=True)
    preprocess_dataset(data, work / "cache", progress=False)
    return work / "cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "shipped")
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--cases", type=int, default=150)
    parser.add_argument("--data-seed", type=int, default=20201)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=4)
    parser.add_argument("--only", default=None,
                        help="comma list of arch:fold to train, in that order (default: all ten)")
    args = parser.parse_args()
    cache = prepare_data(args.work, args.cases, args.data_seed)
    order = [(arch, fold) for arch in ("bifpn", "unetpp") for fold in range(5)]
    if args.only:
        wanted = [(arch, int(fold)) for arch, fold in (item.split(":") for item in args.only.split(","))]
        unknown = set(wanted) - set(order)
        if unknown:
            parser.error(f"--only: no such model {sorted(unknown)}; give arch:fold, e.g. bifpn:0")
        order = wanted
    started = time.time()
    for arch, fold in order:
        name = f"{arch}_fold{fold}"
        if finished(args.weights, name, arch):
            print(f"== {name}: finished earlier with this recipe, checksum verified, skipped", flush=True)
            continue
        print(f"== {name}: training ({time.time() - started:.0f} s into this sitting)", flush=True)
        options = TrainOptions(arch=arch, size="demo", fold=fold, workers=args.workers, val_every=args.val_every,
                               device="auto", progress=False, **SPEED[arch])
        train(options, args.work / "runs", cache_dir=cache, resume=True)
        ship(args.work / "runs" / run_name(arch, fold), args.weights, args)
        print(f"== {name}: shipped to {args.weights} (sha256 {sha256_of(args.weights / f'{name}.pt')[:12]}); "
              "commit it", flush=True)


if __name__ == "__main__":
    main()
