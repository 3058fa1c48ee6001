"""Reproduce every file in weights/: phantom training set -> cache -> 5 folds x 2 architectures (demo
preset and recipe) -> weights/<arch>_fold<N>.pt + weights/manifest.json. Resumable and idempotent.

    python scripts/train_shipped_weights.py                      # CPU or GPU, the defaults below
    python scripts/train_shipped_weights.py --only bifpn:0       # one model
    python scripts/train_shipped_weights.py --only bifpn:1,unetpp:0,bifpn:2   # these, in this order

* The current models are **warm-started** from the previous shipped ones (:data:`PARENT_TAGS`, the
  models in git history before this recipe) and trained :data:`FINE_TUNE` more on ``synth`` v3
  phantoms (stronger, shared bias fields, small and multiple lesions, a quarter tumour-free) with the
  shading augmentation. Before the first run the parents are copied to ``<work>/parents/``, so that a
  resumed run still finds the parent it grew from after weights/ holds its child. The manifest's
  ``training`` block records the parent (file, sha256, recipe) and the steps added.
* The five BiFPN folds first, then the five UNet++ folds (the BiFPN models are the stronger half of
  the ensemble, so a usable ensemble exists sooner).
* A model counts as finished when weights/ holds it with the current recipe (``training.recipe_tag``
  in the manifest) and its checksum; a run in progress continues from its ``last.pt``.
* After each finished model, weights/<arch>_fold<N>.pt and the manifest are rewritten, so the model
  can be committed at once (a background job ends with the session: commit as they land).
* Speed settings (``brats-cls bench --training``): float32 with channels_last_3d for both networks
  (a bfloat16 UNet++ run went non-finite, see docs/design.md). They change arithmetic, not the recipe.
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
from brats_cls.synth.phantom import SYNTH_VERSION
from brats_cls.training.data import preprocess_dataset
from brats_cls.training.loop import TrainOptions, run_name, train
from brats_cls.weights import sha256_of, write_manifest

REPO = Path(__file__).resolve().parents[1]
#: Per architecture; bumped whenever its preset, the recipe or the training data change: models of an older
#: tag are retrained.
RECIPE_TAGS = {
    "bifpn": "demo-v3: demo-v2 + 2500 steps of 64^3 at lr 5e-4, shading augmentation, synth v3 x160",
    "unetpp": "demo-v3: demo-v2.1 + 2500 steps of 64^3 at lr 5e-4, shading augmentation, synth v3 x160",
}
#: The recipe tag that a parent of the current warm start must carry.
PARENT_TAGS = {
    "bifpn": "demo-v2: 2 mm logits, classifier windows, 5000 steps of 64^3, wide augmentation, synth v2 x150",
    "unetpp": "demo-v2.1: UNet++ filters 6-8-16-32-64 + learned 2x2x2 stem, 2 mm logits, classifier windows, "
              "5000 steps of 64^3, wide augmentation, synth v2 x150",
}
#: The warm start's budget: 10 epochs of the demo recipe's 250 steps, at half its learning rate.
FINE_TUNE = {"epochs": 10, "learning_rate": 5e-4}
#: Tumour-free share of the training phantoms.
HEALTHY_FRACTION = 0.25
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


def parent_of(work: Path, weights: Path, name: str, arch: str) -> tuple[Path, dict]:
    """The parent model of ``name`` and its manifest entry, copied once to ``work/parents/``."""
    parents = work / "parents"
    parents.mkdir(parents=True, exist_ok=True)
    copy, entry_file = parents / f"{name}.pt", parents / f"{name}.json"
    if not copy.is_file():
        entry = read_entries(weights).get(name)
        if not entry or entry.get("training", {}).get("recipe_tag") != PARENT_TAGS[arch] \
                or sha256_of(weights / entry["file"]) != entry.get("sha256"):
            raise SystemExit(f"{name}: weights/ does not hold its parent ({PARENT_TAGS[arch]!r}); check out the "
                             "commit that shipped it, or copy it to " + str(copy))
        shutil.copyfile(weights / entry["file"], copy.with_suffix(".tmp"))
        entry_file.write_text(json.dumps(entry, indent=1))
        copy.with_suffix(".tmp").replace(copy)
    return copy, json.loads(entry_file.read_text())


def ship(run_dir: Path, weights: Path, args, parent: dict) -> None:
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
    added = run["recipe"]["epochs"] * run["steps_per_epoch"]
    entries[name] = {
        "name": name, "file": target.name, "arch": run["arch"], "fold": run["fold"], "size": run["size"],
        "config": model.config, "parameters": count_parameters(model),
        "training": {
            "data": f"phantom cases: synth v{SYNTH_VERSION}, {args.cases} cases, seed {args.data_seed}, "
                    f"{HEALTHY_FRACTION:.0%} tumour-free",
            "parent": {"file": run["init"]["file"], "sha256": run["init"]["sha256"],
                       "recipe_tag": parent["training"]["recipe_tag"], "steps": parent["training"]["steps"],
                       "data": parent["training"]["data"]},
            "steps_added": added,
            "recipe_tag": RECIPE_TAGS[run["arch"]], "recipe": run["recipe"], "precision": run["precision"],
            "channels_last": run["channels_last"], "training_cases": len(run["training_cases"]),
            "validation_cases": len(run["validation_cases"]), "epochs": run["recipe"]["epochs"],
            "steps": parent["training"]["steps"] + added, "best_epoch": metadata.get("epoch"),
            "best_step": metadata.get("step"), "seed": run["seed"], "split_seed": run["split_seed"],
            "commit": commit_of(REPO), "best_validation_dice": metadata.get("val_dice"),
            "best_validation_cls_dice": metadata.get("val_cls_dice"), "log": f"docs/training_logs/{name}.csv",
        },
    }
    write_manifest(weights, sorted(entries.values(), key=lambda e: (e["arch"], e["fold"])))


def prepare_data(work: Path, cases: int, data_seed: int) -> Path:
    data, cache = work / f"phantom-train-v{SYNTH_VERSION}", work / f"cache-v{SYNTH_VERSION}"
    if not (data / ".complete").exists():
        print(f"== synthesising {cases} training phantoms (synth v{SYNTH_VERSION}, seed {data_seed})", flush=True)
        write_cases(data, cases, seed=data_seed, naming="2021", healthy_fraction=HEALTHY_FRACTION)
        (data / ".complete").write_text("")
    print("== preprocessing (intact cached cases are skipped)", flush=True)
    preprocess_dataset(data, cache, progress=False)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "shipped")
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--cases", type=int, default=160)
    parser.add_argument("--data-seed", type=int, default=20301)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=2)
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
        parent_file, parent = parent_of(args.work, args.weights, name, arch)
        print(f"== {name}: training ({time.time() - started:.0f} s into this sitting)", flush=True)
        options = TrainOptions(arch=arch, size="demo", fold=fold, workers=args.workers, val_every=args.val_every,
                               device="auto", progress=False, init=parent_file, **FINE_TUNE, **SPEED[arch])
        train(options, args.work / f"runs-v{SYNTH_VERSION}", cache_dir=cache, resume=True)
        ship(args.work / f"runs-v{SYNTH_VERSION}" / run_name(arch, fold), args.weights, args, parent)
        print(f"== {name}: shipped to {args.weights} (sha256 {sha256_of(args.weights / f'{name}.pt')[:12]}); "
              "commit it", flush=True)


if __name__ == "__main__":
    main()
