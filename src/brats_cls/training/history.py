"""A run's history: the CSV log and the curves picture, both rewritten whole (atomically) after each epoch.

One row per epoch: ``epoch``, ``step`` (optimiser steps so far), the loss and its four terms (means over
the epoch), the learning rate at the end of the epoch, validation Dice per region without the
classifier suppression (``val_dice_*``) and with it (``val_cls_dice_*``), the steps skipped for a
non-finite loss or gradient, seconds and samples/s.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import write_bytes_atomically
from ..regions import REGIONS
from .losses import LOSS_TERMS

VALIDATION_KINDS = {"val_dice": "w/o suppression", "val_cls_dice": "with suppression"}
LOG_COLUMNS = ("epoch", "step", "loss", *LOSS_TERMS, "lr",
               *(f"{kind}_{r}" for kind in VALIDATION_KINDS for r in (*REGIONS, "mean")),
               "skipped_steps", "seconds", "samples_per_s")


def write_log(history: list[dict], path: Path) -> None:
    """The whole history as CSV (rewritten each epoch, so a resumed run's log is whole)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in LOG_COLUMNS})
    write_bytes_atomically(path, buffer.getvalue().encode())


def read_log(path: Path) -> list[dict]:
    """The rows of a ``log.csv``, numbers as floats (empty cells: None)."""
    with open(path, newline="") as handle:
        return [{key: (float(value) if value not in ("", None) else None) for key, value in row.items()}
                for row in csv.DictReader(handle)]


def plot_curves(history: list[dict], path: Path) -> None:
    """Losses by term, learning rate and validation Dice per region against optimiser steps, as a PNG."""
    from matplotlib.figure import Figure

    steps = [row.get("step") or row["epoch"] for row in history]
    figure = Figure(figsize=(15, 4), dpi=80)
    losses, rate, dice = figure.subplots(1, 3)
    for key in ("loss", *LOSS_TERMS):
        losses.plot(steps, [row[key] for row in history], marker=".", label=key)
    losses.set(title="training loss", xlabel="optimiser step", yscale="log")
    losses.legend()
    rate.plot(steps, [row["lr"] for row in history], marker=".")
    rate.set(title="learning rate (end of epoch)", xlabel="optimiser step")
    for kind, style in zip(VALIDATION_KINDS, ("-", "--")):
        validated = [(step, row) for step, row in zip(steps, history) if row.get(f"{kind}_mean") is not None]
        for key in (*REGIONS, "mean"):
            dice.plot([step for step, _ in validated], [row[f"{kind}_{key}"] for _, row in validated], style,
                      marker="o", markersize=3, label=f"{key} {VALIDATION_KINDS[kind]}")
    dice.set(title="validation Dice", xlabel="optimiser step", ylim=(0, 1))
    dice.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomically(path, buffer.getvalue())
