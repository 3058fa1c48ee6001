"""One optimiser step of section 3.2, the only one in the project: ``brats-cls train`` and
``brats-cls bench --training`` both run :class:`TrainStep`.

A step: the batch to the device (``channels_last_3d`` when asked), the forward under the run's autocast
(:mod:`brats_cls.device`), the paper's loss in float32, backward (through a GradScaler for float16,
whose exponent range is too small for the gradients; bfloat16 needs none), Adam, then the per-batch
learning-rate schedule.

Decision (a guard the paper does not mention): a step whose loss or gradients are not finite is
skipped, the weights untouched, and counted (``skipped``); the learning-rate schedule still advances.
A demo UNet++ trained in bfloat16 on the CPU reached NaN weights at step ~1,600 without it (one
non-finite update makes every later step NaN). The GradScaler of float16 does the same for its
overflows on its own.
"""

from __future__ import annotations

import torch
from torch import nn

from ..device import autocast
from .losses import PaperLoss
from .recipe import Recipe
from .schedules import make_scheduler


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last_3d if channels_last else torch.contiguous_format


class TrainStep:
    """Optimiser, schedule, loss scaler and loss of one run; ``step(batch)`` takes one step.

    Args:
        model: the network (its parameters are optimised).
        network: what the forward calls: ``model`` itself, or its DistributedDataParallel wrapper.
        recipe: learning rate and schedule kind.
        device, precision: a concrete precision (``fp32``, ``bf16``, ``fp16``).
        total_steps, warmup_steps: the schedule's length, in optimiser steps.
        channels_last: feed and keep 5-D tensors in ``channels_last_3d`` layout.
    """

    def __init__(self, model: nn.Module, network: nn.Module, recipe: Recipe, device: torch.device, precision: str,
                 total_steps: int, warmup_steps: int, channels_last: bool = False):
        self.model, self.network, self.device, self.precision = model, network, device, precision
        self.layout = memory_format(channels_last)
        model.to(memory_format=self.layout)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
        self.scheduler = make_scheduler(self.optimizer, recipe.schedule, total_steps, warmup_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.criterion = PaperLoss(recipe.region_weights)
        self.skipped = 0

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        """One optimiser step on ``batch`` (``image``, ``regions``, ``slices``); returns the loss and its terms."""
        image = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        regions = batch["regions"].to(self.device, non_blocking=True)
        slices = batch["slices"].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            outputs = self.network(image)
        loss, terms = self.criterion(outputs, regions, slices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled() or self._finite(loss):
            self.scaler.step(self.optimizer)
        else:
            self.skipped += 1
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach()), {name: float(value) for name, value in terms.items()}

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss and every gradient are finite."""
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros(())
        return bool(torch.isfinite(loss.detach()) and torch.isfinite(norm))

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))
