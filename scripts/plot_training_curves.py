"""Validation Dice against optimiser steps for the shipped models: docs/training_curves.png.

    python scripts/plot_training_curves.py [--logs docs/training_logs] [--out docs/training_curves.png]

One panel per architecture, from the training logs that scripts/train_shipped_weights.py copies into
docs/training_logs/<arch>_fold<N>.csv: the mean Dice over WT, TC and ET on the fold's validation
phantoms, with the classifier suppression (solid, the configuration `infer` runs) and without it
(dashed), one colour per fold; and per region for the first fold of each architecture (thin lines).
``--run runs/shipped/runs/unetpp-fold1`` adds a run folder that was not shipped (one still training,
or one given up: its ``log.csv``), labelled with the folder's name, to its architecture's panel.

A model warm-started from a parent (its manifest entry's ``training.parent``) is drawn after its
parent's curve (``docs/training_logs/parents/<arch>_fold<N>.csv``, thin), its steps counted on from
the parent's, with a vertical line at the warm start. The two were validated on different phantom
sets (each run's own fold of its own training data), so a jump at the line is the change of set, not
of the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure

from brats_cls.regions import REGIONS
from brats_cls.training.history import read_log
from brats_cls.weights import read_manifest

REPO = Path(__file__).resolve().parents[1]
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", type=Path, default=REPO / "docs" / "training_logs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "training_curves.png")
    parser.add_argument("--weights", type=Path, default=REPO / "weights", help="whose manifest names the parents")
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="a run folder <arch>-fold<N>... that was not shipped (repeatable)")
    args = parser.parse_args()
    figure = Figure(figsize=(12, 4.5), dpi=90)
    panels = figure.subplots(1, 2, sharey=True)
    parents = {entry["name"]: entry["training"]["parent"] for entry in read_manifest(args.weights)
               if "parent" in entry.get("training", {})}
    for panel, (arch, label) in zip(panels, (("bifpn", "BiFPN"), ("unetpp", "UNet++"))):
        logs = [(path, path.stem) for path in sorted(args.logs.glob(f"{arch}_fold*.csv"))]
        logs += [(run / "log.csv", f"{run.name} (not shipped)") for run in args.run if run.name.startswith(arch)]
        for index, (path, name) in enumerate(logs):
            rows = [row for row in read_log(path) if row.get("val_dice_mean") is not None]
            colour = "black" if name.endswith("(not shipped)") else COLOURS[index % len(COLOURS)]
            offset = 0
            parent_log = args.logs / "parents" / f"{name}.csv"
            if name in parents and parent_log.is_file():
                offset = parents[name]["steps"]
                earlier = [row for row in read_log(parent_log) if row.get("val_cls_dice_mean") is not None]
                panel.plot([row["step"] for row in earlier], [row["val_cls_dice_mean"] for row in earlier], "-",
                           color=colour, linewidth=0.8, alpha=0.6)
                panel.axvline(offset, color="grey", linewidth=0.6, linestyle=":")
            steps = [offset + row["step"] for row in rows]
            panel.plot(steps, [row["val_cls_dice_mean"] for row in rows], "-o", color=colour, markersize=3,
                       label=f"{name} mean, with suppression")
            panel.plot(steps, [row["val_dice_mean"] for row in rows], "--", color=colour, label=f"{name} without")
            if index == 0:
                for region, style in zip(REGIONS, (":", "-.", (0, (1, 3)))):
                    panel.plot(steps, [row[f"val_cls_dice_{region}"] for row in rows], linestyle=style,
                               color="grey", linewidth=1, label=f"{name} {region}, with suppression")
        panel.set(title=f"{label}: validation Dice (phantoms)", xlabel="optimiser step (parent's, then the warm start's)",
                  ylim=(0, 1))
        panel.grid(alpha=0.3)
        if logs:
            panel.legend(fontsize=6, loc="lower right")
    panels[0].set_ylabel("Dice")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
