"""Nested U-Net (UNet++) with deep supervision and a slice classifier (paper section 2.2, Fig. 3, Table 3).

Nodes X(i, j): i the depth (resolution 1/2^i), j the position along the skip pathway. X(i, 0) is the
encoder (max-pool then two convs); X(i, j), j >= 1, reads the concatenation of X(i, 0..j-1) and the
2x up-sampled X(i+1, j-1). Five levels, filters (32, 64, 128, 256, 512) at paper size: four poolings.
The four top-row nodes X(0, 1..4) each feed a 1x1x1 head (deep supervision) and, concatenated
(4 x 32 = 128 channels, full resolution), the classifier (Table 3):
(128, 128, 128, 128) -> (3, 128) for a (4, 128, 128, 128) input.

Decisions where the paper is silent:

* "our final prediction mask upsamples directly from last layer": the top row already has the input's
  resolution, so each head is just a 1x1x1 conv on its X(0, j), with no extra layer before it; the only
  up-sampling is back from the working grid when ``input_scale`` < 1 (trilinear).
* "seg" is the mean of the four heads' *logits* (the paper averages the branches; sigmoid comes
  later, as at inference the paper averages outputs before the sigmoid). In training, ``"deep"``
  holds the four heads' logits as well, for a loss on each.
* Each node is (conv3, GN, ReLU) x 2, the VGG block of the repository the paper used; down-sampling
  is a 2x max pool, up-sampling 2x trilinear. No dropout except in the classifier's LSTM.
* ``stem_channels`` (not in the paper, whose network runs at full resolution; off by default, used by
  the CPU ``demo`` preset at ``input_scale`` 1/2): the input enters the working grid through a learned
  k x k x k convolution of stride k (a patch embedding: every input voxel counts once, as in the block
  average it generalises) to that many channels, so that the thin enhancing rims a 1/2 grid averages
  away can still be seen (evidence: docs/design.md#unetpp-demo-stem).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import (Conv3d, DoubleConv, check_input, check_io, check_scale, check_widths, feature_window,
                     WorkingGrid, upsample2)
from .slice_classifier import SliceClassifier

#: Pyramid levels; four poolings, hence inputs in multiples of 16.
LEVELS = 5


class UNetPlusPlus(nn.Module):
    """UNet++ with deep supervision and slice classifier (Nguyen et al., BraTS 2020, section 2.2).

    Args (plain values; defaults are the paper's sizes):
        in_channels: 4 (FLAIR, T1, T1ce, T2).
        out_channels: 3 (WT, TC, ET).
        filters: widths of the five levels, default [32, 64, 128, 256, 512].
        classifier_channels: classifier conv-block width, default 256.
        lstm_hidden: LSTM hidden size per direction, default 256.
        lstm_layers: BiLSTM layers, default 3.
        lstm_dropout: dropout between LSTM layers, default 0.1.
        norm_groups: GroupNorm groups, default 8.
        input_scale, classifier_window: the working grid's scale 1/k (default 1.0) and the in-plane
            size of the classifier's windows (default 128, the paper's crops), as for :class:`BiFPNSeg`.
        stem_channels: width of a learned patch embedding onto a 1/k working grid (default None: the
            block average; see the module docstring).

    ``forward(x)`` returns ``{"seg": (B, 3, D, H, W), "slices": (B, 3, D)}`` logits and, in training
    mode, ``"deep"``: the four deep-supervision heads' logits, each ``(B, 3, D, H, W)``.
    """

    arch = "unetpp"

    def __init__(self, in_channels: int = 4, out_channels: int = 3,
                 filters: list[int] = (32, 64, 128, 256, 512), classifier_channels: int = 256,
                 lstm_hidden: int = 256, lstm_layers: int = 3, lstm_dropout: float = 0.1,
                 norm_groups: int = 8, input_scale: float = 1.0, classifier_window: int = 128,
                 stem_channels: int | None = None):
        super().__init__()
        check_io(in_channels, out_channels, norm_groups)
        factor = check_scale(input_scale)
        filters = check_widths("filters", filters, LEVELS, norm_groups)
        stem_channels = None if stem_channels is None else int(stem_channels)
        if stem_channels is not None and (factor < 2 or stem_channels < 1):
            raise ValueError(f"stem_channels needs an input_scale of 1/k with k >= 2 and a positive width; got "
                             f"input_scale {input_scale}, stem_channels {stem_channels}")
        window = feature_window(classifier_window, factor, 1)  # the top row is the working grid
        self.config = {
            "arch": self.arch, "in_channels": in_channels, "out_channels": out_channels, "filters": filters,
            "classifier_channels": classifier_channels, "lstm_hidden": lstm_hidden,
            "lstm_layers": lstm_layers, "lstm_dropout": float(lstm_dropout), "norm_groups": norm_groups,
            "input_scale": float(input_scale), "classifier_window": classifier_window,
        }
        if stem_channels is not None:
            self.config["stem_channels"] = stem_channels
        self.in_channels = in_channels
        self.input_scale = float(input_scale)
        # a learned k x k x k patch embedding onto the working grid instead of the block average
        self.stem = None if stem_channels is None else Conv3d(in_channels, stem_channels, factor, stride=factor)
        first = in_channels if stem_channels is None else stem_channels  # what X(0, 0) reads

        self.nodes = nn.ModuleDict()
        for depth in range(LEVELS):
            self.nodes[_name(depth, 0)] = DoubleConv(first if depth == 0 else filters[depth - 1],
                                                     filters[depth], norm_groups)
            for position in range(1, LEVELS - depth):
                node_in = filters[depth] * position + filters[depth + 1]
                self.nodes[_name(depth, position)] = DoubleConv(node_in, filters[depth], norm_groups)
        self.heads = nn.ModuleList(Conv3d(filters[0], out_channels, 1) for _ in range(LEVELS - 1))
        self.classifier = SliceClassifier((LEVELS - 1) * filters[0], classifier_channels, lstm_hidden,
                                          lstm_layers, lstm_dropout, norm_groups, upsample_depth=False,
                                          out_channels=out_channels, window=window)

    def top_row(self, x: torch.Tensor) -> list[torch.Tensor]:
        """X(0, 1..4), each ``(B, filters[0], D, H, W)``, for an input on the working grid."""
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for depth in range(LEVELS):
            below = x if depth == 0 else F.max_pool3d(grid[depth - 1, 0], 2)  # halves D, H, W
            grid[depth, 0] = self.nodes[_name(depth, 0)](below)
            # the anti-diagonal ending at X(0, depth): every input it needs now exists
            for position in range(1, depth + 1):
                row = depth - position
                inputs = [grid[row, k] for k in range(position)] + [upsample2(grid[row + 1, position - 1])]
                grid[row, position] = self.nodes[_name(row, position)](torch.cat(inputs, dim=1))
        return [grid[0, position] for position in range(1, LEVELS)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input: top-row nodes concatenated, ``(B, 4*filters[0], D, H, W)``."""
        return torch.cat(self.top_row(x), dim=1)

    @property
    def logit_factor(self) -> int:
        """How much coarser than the input :meth:`forward_coarse`'s segmentation logits are: the
        working grid's k (1 at the paper's full resolution)."""
        return check_scale(self.input_scale)

    def _heads(self, x: torch.Tensor) -> tuple[WorkingGrid, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The working grid, the four heads' logits, their mean and the slice logits, on the working grid."""
        check_input(x, self.in_channels)
        grid = WorkingGrid.of(x.shape[2:], self.input_scale)
        working = grid.enter(x) if self.stem is None else self.stem(grid.pad(x))  # (B, 4 | stem, d, h, w)
        top = self.top_row(working)  # 4 x (B, filters[0], d, h, w)
        deep = [head(node) for head, node in zip(self.heads, top)]  # 4 x (B, 3, d, h, w)
        seg = torch.stack(deep).mean(dim=0)  # (B, 3, d, h, w)
        slices = self.classifier(torch.cat(top, dim=1))  # (B, 4*filters[0], d, h, w) -> (B, 3, d)
        return grid, deep, seg, grid.leave_slices(slices)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grid, deep, seg, slices = self._heads(x)
        outputs = {"seg": grid.leave(seg), "slices": slices}
        if self.training:
            outputs["deep"] = [grid.leave(head) for head in deep]
        return outputs

    def forward_coarse(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward`` before its last step: ``seg`` on the working grid (:attr:`logit_factor` times
        coarser, padded), which ``forward`` up-samples (trilinear, half-pixel centres) and crops to the
        input; ``slices`` as ``forward``'s."""
        _, _, seg, slices = self._heads(x)
        return {"seg": seg, "slices": slices}


def _name(depth: int, position: int) -> str:
    return f"x{depth}_{position}"
