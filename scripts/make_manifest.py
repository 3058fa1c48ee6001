"""Copy finished training runs into weights/ and (re)write weights/manifest.json.

Usage: python scripts/make_manifest.py RUNS_DIR WEIGHTS_DIR [--cases N] [--data-seed S]

For every RUNS_DIR/<arch>-fold<N>/best.pt, the model is copied to WEIGHTS_DIR/<arch>_fold<N>.pt and
described in the manifest: architecture, fold, size preset and hyper-parameters, sha256, parameter
count, and the training summary (cases, epochs, seed, commit, best validation Dice per region).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from brats_cls.models.registry import count_parameters, load_model
from brats_cls.weights import write_manifest


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def commit_of(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--cases", type=int, required=True, help="phantom cases in the training set")
    parser.add_argument("--data-seed", type=int, required=True, help="seed of `brats-cls synth` for the training set")
    args = parser.parse_args()
    args.weights.mkdir(parents=True, exist_ok=True)
    commit = commit_of(Path(__file__).resolve().parents[1])
    # Models shipped earlier (e.g. committed from another machine) stay unless a run here replaces them.
    manifest = args.weights / "manifest.json"
    kept = json.loads(manifest.read_text())["models"] if manifest.is_file() else []
    entries_by_name = {e["name"]: e for e in kept if (args.weights / e["file"]).is_file()}
    for best in sorted(args.runs.glob("*-fold*/best.pt")):
        run = json.loads((best.parent / "run.json").read_text())
        model, metadata = load_model(best)
        name = f"{run['arch']}_fold{run['fold']}"
        target = args.weights / f"{name}.pt"
        if not target.exists() or target.read_bytes() != best.read_bytes():
            shutil.copyfile(best, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").replace(target)
        entries_by_name[name] = {
            "name": name,
            "file": target.name,
            "arch": run["arch"],
            "fold": run["fold"],
            "size": run["size"],
            "config": model.config,
            "parameters": count_parameters(model),
            "training": {
                "data": f"phantom cases: brats-cls synth --cases {args.cases} --seed {args.data_seed}",
                "training_cases": len(run["training_cases"]),
                "validation_cases": len(run["validation_cases"]),
                "epochs": run["recipe"]["epochs"],
                "best_epoch": metadata.get("epoch"),
                "seed": run["seed"],
                "split_seed": run["split_seed"],
                "commit": commit,
                "best_validation_dice": metadata.get("val_dice"),
            },
        }
        if name in {e["name"] for e in kept} and entries_by_name[name]["training"]["commit"] != commit:
            previous = next(e for e in kept if e["name"] == name)
            if previous.get("sha256") and previous["sha256"] == _sha(target):
                entries_by_name[name]["training"]["commit"] = previous["training"]["commit"]
    entries = sorted(entries_by_name.values(), key=lambda e: (e["arch"], e["fold"]))
    write_manifest(args.weights, entries)
    print(f"{len(entries)} model(s) in {args.weights / 'manifest.json'}")


if __name__ == "__main__":
    main()
