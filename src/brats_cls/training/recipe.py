"""Training recipes: every per-architecture and per-size default, in this one place.

``paper`` is the recipe of section 3.2: Adam, base learning rate 1e-3, 200 epochs of one pass over the
training cases, 10 warm-up epochs, cosine decay and batch 4 of (D, H, W) = (96, 128, 128) crops for
BiFPN, polynomial decay and batch 2 of 128^3 crops for UNet++, the paper's augmentation.

Decisions:

* ``demo`` (the shipped CPU-trained weights) counts its budget in optimiser steps: epochs of a fixed
  250 steps (``steps_per_epoch``), 20 of them (5,000 steps, a third of the paper's ~15,000 BiFPN
  steps, what two CPU cores give each of ten models in about half an hour), batches of 2 crops of
  64^3, half of them placed on a tumour voxel (``foreground_crop = 0.5``, see
  :mod:`brats_cls.training.augment`), and the shading augmentation
  (:data:`~.augment.SHADING_AUGMENTATION`: the wide one plus bias fields), since the shipped models
  meet scans and phantoms of other generators, whose shading must not read as edema. Its networks run
  the same scale in training and inference (:mod:`brats_cls.models.registry`).
* ``tiny`` (tests): 32^3 crops in batches of 2.
* A hyper-parameter JSON file as ``--size`` takes the ``paper`` recipe of its architecture; command-line
  flags override any field.
* ``precision`` and ``channels_last`` are speed settings of the machine, not of the method: ``auto``
  and off by default; ``brats-cls bench --training`` measures which pays (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .augment import AUGMENTATIONS, Augmentation
from .losses import PAPER_REGION_WEIGHTS, checked_region_weights
from .schedules import SCHEDULES


@dataclass(frozen=True)
class Recipe:
    crop: tuple[int, int, int]  # (D, H, W), multiples of 16
    batch_size: int
    schedule: str  # "cosine" | "poly"
    epochs: int = 200
    learning_rate: float = 1e-3
    foreground_crop: float = 0.0  # probability that a crop is placed on a tumour voxel
    steps_per_epoch: int | None = None  # None: one pass over the training cases (the paper's epoch)
    augmentation_kind: str = "paper"  # a key of augment.AUGMENTATIONS: "paper", "wide", "shading"
    region_weights: tuple[float, float, float] = PAPER_REGION_WEIGHTS  # WT, TC, ET segmentation loss (losses.py)

    def __post_init__(self):
        if len(self.crop) != 3 or any(c <= 0 or c % 16 for c in self.crop):
            raise ValueError(f"crop {self.crop} must be three positive multiples of 16")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if not 0.0 <= self.foreground_crop <= 1.0:
            raise ValueError(f"foreground_crop {self.foreground_crop} must lie in [0, 1]")
        if self.batch_size < 1 or self.epochs < 1 or (self.steps_per_epoch is not None and self.steps_per_epoch < 1):
            raise ValueError("batch size, epochs and steps per epoch must be at least 1")
        checked_region_weights(self.region_weights)
        if self.augmentation_kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augmentation_kind!r}; expected one of {sorted(AUGMENTATIONS)}")

    def augmentation(self) -> Augmentation:
        """This recipe's augmentation, with its probability of a tumour-centred crop."""
        return replace(AUGMENTATIONS[self.augmentation_kind], foreground_probability=self.foreground_crop)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["crop"] = list(self.crop)
        values["region_weights"] = [float(w) for w in self.region_weights]
        return values


#: The demo budget and crops, the same for both networks (module docstring).
_DEMO = {"crop": (64, 64, 64), "batch_size": 2, "epochs": 20, "foreground_crop": 0.5, "steps_per_epoch": 250,
         "augmentation_kind": "shading"}

_SCHEDULES = {"bifpn": "cosine", "unetpp": "poly"}
_PAPER = {"bifpn": {"crop": (96, 128, 128), "batch_size": 4}, "unetpp": {"crop": (128, 128, 128), "batch_size": 2}}
_TINY = {"crop": (32, 32, 32), "batch_size": 2}

RECIPES: dict[str, dict[str, Recipe]] = {
    arch: {"paper": Recipe(schedule=schedule, **_PAPER[arch]), "demo": Recipe(schedule=schedule, **_DEMO),
           "tiny": Recipe(schedule=schedule, **_TINY)}
    for arch, schedule in _SCHEDULES.items()
}


def recipe_for(arch: str, size: str | dict, **overrides) -> Recipe:
    """The recipe of ``arch`` at preset ``size`` (a dict of hyper-parameters takes ``paper``), with
    the non-None ``overrides`` (e.g. ``epochs=2``) applied."""
    if arch not in RECIPES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(RECIPES)}")
    preset = size if isinstance(size, str) else "paper"
    if preset not in RECIPES[arch]:
        raise ValueError(f"unknown size {preset!r}; choose one of {sorted(RECIPES[arch])} or a JSON file")
    changes = {key: value for key, value in overrides.items() if value is not None}
    if "crop" in changes:
        changes["crop"] = tuple(int(c) for c in changes["crop"])
    if "region_weights" in changes:
        changes["region_weights"] = checked_region_weights(changes["region_weights"])
    return replace(RECIPES[arch][preset], **changes)
