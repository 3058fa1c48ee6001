"""Short training runs of UNet++ ``demo`` variants, to choose the preset: docs/design.md#unetpp-demo-stem.

    python scripts/compare_unetpp_variants.py NAME '{"filters": [6, 8, 16, 32, 64], "norm_groups": 2}' [STEPS]

Each run trains fold 0 of the shipped training cache (``scripts/train_shipped_weights.py`` makes it in
runs/shipped/cache) for STEPS optimiser steps (default 600: three epochs, the schedule shortened to
them) with the demo recipe, float32 + channels_last_3d, seed 0, and validates once at the end on the
fold's 30 validation phantoms (one model, no TTA, with and without the slice suppression). JSON keys
override the demo preset's hyper-parameters; a ``"recipe"`` key overrides recipe fields. Prints the
mean training Dice loss of each epoch and the validation mean Dice.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import brats_cls.models.registry as registry
import brats_cls.training.recipe as recipes
from brats_cls.training.loop import TrainOptions, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    name, overrides = sys.argv[1], json.loads(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 600
    recipe_changes = overrides.pop("recipe", {})
    registry.PRESETS["unetpp"]["demo"] = {**registry.PRESETS["unetpp"]["demo"], **overrides}
    recipes.RECIPES["unetpp"]["demo"] = dataclasses.replace(recipes.RECIPES["unetpp"]["demo"], **recipe_changes)
    print(name, registry.PRESETS["unetpp"]["demo"], flush=True)
    options = TrainOptions(arch="unetpp", size="demo", fold=0, workers=0, epochs=3, steps_per_epoch=steps // 3,
                           val_every=3, precision="fp32", channels_last=True, progress=False)
    started = time.time()
    result = train(options, REPO / "runs" / "variants" / name, cache_dir=REPO / "runs" / "shipped" / "cache")
    print(f"{name}: {time.time() - started:.0f} s")
    for row in result.history:
        print(f"  step {row['step']}: training Dice loss {row['dice']:.3f}, validation mean Dice "
              f"{row.get('val_dice_mean') or float('nan'):.3f} without / {row.get('val_cls_dice_mean') or float('nan'):.3f} "
              "with suppression")


if __name__ == "__main__":
    main()
