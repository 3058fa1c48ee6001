"""Training recipes: every per-architecture and per-size default, in this one place.

``paper`` is the recipe of section 3.2: Adam, base learning rate 1e-3, 200 epochs, 10 warm-up epochs,
cosine decay and batch 4 of (D, H, W) = (96, 128, 128) crops for BiFPN, polynomial decay and batch 2
of 128^3 crops for UNet++.

Decisions: ``demo`` (CPU demonstration, half-resolution demo networks) trains 96^3 crops in batches
of 2 for both networks, half of them placed on a tumour voxel (``foreground_crop = 0.5``, see
:mod:`brats_cls.training.augment`): a 96^3 crop holds only about a quarter of a brain, so uniform crops
alone show the small networks too little tumour in a CPU-sized budget; ``paper`` keeps the paper's
uniform random crop; ``tiny`` (tests) 32^3 crops in batches of 2. A hyper-parameter JSON file as
``--size`` takes the ``paper`` recipe of its architecture; command-line flags override any field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .augment import PAPER_AUGMENTATION, Augmentation
from .schedules import SCHEDULES


@dataclass(frozen=True)
class Recipe:
    crop: tuple[int, int, int]  # (D, H, W), multiples of 16
    batch_size: int
    schedule: str  # "cosine" | "poly"
    epochs: int = 200
    learning_rate: float = 1e-3
    foreground_crop: float = 0.0  # probability that a crop is placed on a tumour voxel

    def __post_init__(self):
        if len(self.crop) != 3 or any(c <= 0 or c % 16 for c in self.crop):
            raise ValueError(f"crop {self.crop} must be three positive multiples of 16")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if not 0.0 <= self.foreground_crop <= 1.0:
            raise ValueError(f"foreground_crop {self.foreground_crop} must lie in [0, 1]")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch size and epochs must be at least 1")

    def augmentation(self) -> Augmentation:
        """The paper's augmentation, with this recipe's probability of a tumour-centred crop."""
        return replace(PAPER_AUGMENTATION, foreground_probability=self.foreground_crop)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["crop"] = list(self.crop)
        return values


RECIPES: dict[str, dict[str, Recipe]] = {
    "bifpn": {
        "paper": Recipe(crop=(96, 128, 128), batch_size=4, schedule="cosine"),
        "demo": Recipe(crop=(96, 96, 96), batch_size=2, schedule="cosine", foreground_crop=0.5),
        "tiny": Recipe(crop=(32, 32, 32), batch_size=2, schedule="cosine"),
    },
    "unetpp": {
        "paper": Recipe(crop=(128, 128, 128), batch_size=2, schedule="poly"),
        "demo": Recipe(crop=(96, 96, 96), batch_size=2, schedule="poly", foreground_crop=0.5),
        "tiny": Recipe(crop=(32, 32, 32), batch_size=2, schedule="poly"),
    },
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
    return replace(RECIPES[arch][preset], **changes)
