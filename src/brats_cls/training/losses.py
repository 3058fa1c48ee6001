"""The paper's losses (section 2.4, eq. 1-3), on the three region channels (WT, TC, ET).

    L_total = L_focal_seg + L_dice + L_focal_cls + L_BCE                                  (3)

* ``L_dice`` (eq. 1): ``1 - 2 sum(p g) / (sum(p^2) + sum(g^2) + eps)`` with ``eps = 1e-5`` and
  ``p = sigmoid(logit)``; MONAI's ``DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0,
  smooth_dr=1e-5)`` is exactly this (``tests/test_training.py`` checks it against a hand computation).
* ``L_focal`` (eq. 2): ``-alpha_t (1 - p_t)^gamma log(p_t)`` per voxel (MONAI's sigmoid ``FocalLoss``),
  averaged over voxels, channels and the batch.
* the slice classifier gets the same focal loss plus binary cross-entropy on its ``(B, 3, D)`` logits.

Decisions where the paper is silent:

* **Batch Dice**: the sums of eq. 1 run over the whole batch and every voxel, one Dice per region,
  and the three are averaged. A random crop with no tumour (or a healthy case) would otherwise give a
  per-sample Dice loss of exactly 1 with no gradient, adding noise to the loss value and nothing else.
* **Focal alpha = 0.25, gamma = 2** for segmentation: the values recommended by the focal-loss paper
  the authors cite [15]; alpha weights positives, ``1 - alpha`` negatives.
* **Slice classifier: gamma = 2, no alpha** (positives and negatives weighted alike). Slices are far
  less imbalanced than voxels, and a negative slice *erases* the segmentation there, so a classifier
  tilted towards "absent" costs true tumour (evidence: docs/design.md#slice-focal-loss).
* **UNet++ deep supervision**: the segmentation losses (Dice + focal) are computed on each of the four
  heads and averaged; the slice losses once, on the single classifier output.
* Losses are computed in float32 even under mixed precision (sums over ~10^6 voxels).
* **Region weights** (``Recipe.region_weights``, default ``(1, 1, 1)``: the paper's eq. 3 exactly):
  optional per-region factors on the segmentation Dice and focal terms (MONAI's ``weight``), each
  region's term multiplied before the mean over regions, the slice terms untouched. A weight above 1
  on ET is a lever for the thin enhancing rim, the region a small network learns last
  (docs/design.md#et-weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

DICE_EPSILON = 1e-5
FOCAL_ALPHA = 0.25
SLICE_FOCAL_ALPHA = None  # see the module docstring
FOCAL_GAMMA = 2.0

#: The four terms of eq. 3, in the order they are logged.
LOSS_TERMS = ("dice", "focal_seg", "focal_cls", "bce")


#: The paper's equal weighting of WT, TC and ET.
PAPER_REGION_WEIGHTS = (1.0, 1.0, 1.0)


def checked_region_weights(region_weights) -> tuple[float, float, float]:
    """``region_weights`` as three floats (WT, TC, ET); ValueError unless they are three positive numbers."""
    weights = tuple(float(w) for w in region_weights)
    if len(weights) != 3 or any(w <= 0 for w in weights):
        raise ValueError(f"region weights {tuple(region_weights)} must be three positive numbers (WT, TC, ET)")
    return weights


def _class_weight(region_weights) -> list[float] | None:
    weights = checked_region_weights(region_weights)
    return None if weights == PAPER_REGION_WEIGHTS else list(weights)


def soft_dice_loss(region_weights=PAPER_REGION_WEIGHTS) -> DiceLoss:
    """Eq. 1 on sigmoid probabilities, batch Dice, averaged over the three region channels (each
    multiplied by its region weight first)."""
    return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=DICE_EPSILON, batch=True,
                    weight=_class_weight(region_weights))


def focal_loss(alpha: float | None = FOCAL_ALPHA, region_weights=PAPER_REGION_WEIGHTS) -> FocalLoss:
    """Eq. 2 with sigmoid probabilities, mean over every element (each region's elements multiplied by
    its region weight)."""
    return FocalLoss(gamma=FOCAL_GAMMA, alpha=alpha, use_softmax=False, reduction="mean",
                     weight=_class_weight(region_weights))


class PaperLoss(nn.Module):
    """Eq. 3: the sum of segmentation Dice + focal and slice-classification focal + BCE.

    ``forward(outputs, regions, slice_targets)`` takes the model's output dict (``seg`` logits
    ``(B, 3, D, H, W)``, ``slices`` logits ``(B, 3, D)``, optional ``deep`` list of UNet++ heads) and
    float targets of the same shapes; returns ``(total, terms)`` where ``terms`` maps each name in
    :data:`LOSS_TERMS` to a detached scalar tensor.
    """

    def __init__(self, region_weights=PAPER_REGION_WEIGHTS):
        super().__init__()
        self.dice = soft_dice_loss(region_weights)
        self.focal = focal_loss(FOCAL_ALPHA, region_weights)
        self.slice_focal = focal_loss(SLICE_FOCAL_ALPHA)

    def segmentation_terms(self, seg_logits: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg_logits = seg_logits.float()
        return self.dice(seg_logits, regions), self.focal(seg_logits, regions)

    def forward(
        self, outputs: dict, regions: torch.Tensor, slice_targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        regions = regions.float()
        slice_targets = slice_targets.float()
        heads = outputs.get("deep") or [outputs["seg"]]
        dice_terms, focal_terms = zip(*(self.segmentation_terms(head, regions) for head in heads))
        dice = torch.stack(dice_terms).mean()
        focal_seg = torch.stack(focal_terms).mean()
        slice_logits = outputs["slices"].float()  # (B, 3, D)
        focal_cls = self.slice_focal(slice_logits, slice_targets)
        bce = F.binary_cross_entropy_with_logits(slice_logits, slice_targets)
        total = dice + focal_seg + focal_cls + bce
        terms = dict(zip(LOSS_TERMS, (dice, focal_seg, focal_cls, bce)))
        return total, {name: value.detach() for name, value in terms.items()}
