"""Learning-rate schedules of section 3.2: linear warm-up, then cosine (BiFPN) or polynomial (UNet++).

Both are stepped once per batch. With ``t`` the batch counter after warm-up and ``T`` the number of
batches after warm-up:

* cosine (eq. 4):      ``lr = base * (1 + cos(pi t / T)) / 2``
* polynomial (eq. 5):  ``lr = base * (1 - t / T) ** 0.9``  (eq. 5's epoch counter, taken per batch)
* warm-up: ``lr = base * (s + 1) / W`` for the first ``W`` batches, so the first step is not at 0.

Decision where the paper is silent: the paper warms up for 10 of 200 epochs; for short runs the
warm-up is scaled down to ``min(10, epochs // 10)`` epochs (no warm-up below 10 epochs), see
:func:`warmup_epochs`.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "poly")
POLY_POWER = 0.9
PAPER_WARMUP_EPOCHS = 10


def warmup_epochs(epochs: int) -> int:
    """Warm-up epochs for a run of ``epochs``: the paper's 10 of 200, scaled down for short runs."""
    return min(PAPER_WARMUP_EPOCHS, epochs // 10)


class WarmupDecay:
    """Learning-rate factor at batch ``step``: a picklable callable, so LambdaLR saves its state."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** POLY_POWER


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int) -> LambdaLR:
    """Per-batch scheduler over ``total_steps`` optimiser steps, the first ``warmup_steps`` warming up."""
    return LambdaLR(optimizer, WarmupDecay(kind, total_steps, warmup_steps))
