"""BiFPN segmentation network with a slice classifier (paper section 2.1, Fig. 1, Tables 1 and 2).

Layout ``(B, C, D, H, W)``, D the axial slice axis. For a ``(4, 96, 128, 128)`` input at paper size:

    encoder   4 residual blocks     (16, 48, 64, 64) (32, 24, 32, 32) (64, 12, 16, 16) (128, 6, 8, 8)
    project   1x1x1 conv + GN       256 features at each of the four scales
    bifpn     3 BiFPN layers        256 features at each of the four scales
    decoder   Panoptic-FPN branch   4 x (256, 48, 64, 64) -> concatenated (1024, 48, 64, 64)
    seg head  1x1x1 conv, 2x up     (3, 96, 128, 128)
    classifier (Table 2)            (1024, 48, 64, 64) -> (3, 96)

Decisions where the paper is silent:

* BiFPN as in EfficientDet: fast normalised fusion (ReLU'd weights divided by their sum + 1e-4);
  a top-down node fuses 2 inputs (the level's input and the up-sampled coarser top-down node); a
  bottom-up node fuses 3 (level input, top-down node, down-sampled finer output), except at the
  coarsest level, which has no top-down node and fuses 2 (EfficientDet's P7_out). Each node is
  ReLU -> depth-wise conv3 -> point-wise 1x1x1 conv -> GN (EfficientDet's separable conv, ReLU in
  place of swish as the paper uses ReLU everywhere). Up-sampling inside BiFPN is nearest 2x and
  down-sampling a 3x3x3 stride-2 max pool, as in EfficientDet. The first layer reads the 1x1x1
  projections (conv + GN) of the encoder outputs for both its top-down and bottom-up inputs.
* Decoder level already at half the input size (the finest): one conv3/GN/ReLU block without
  up-sampling, as Panoptic FPN does for its 1/4 level; a level at 1/2^k gets k-1 up-sample blocks.
* Encoder dropout rate ``dropout`` defaults to 0.1 (Table 1 gives no rate).
* ``input_scale`` 1/k runs the whole network on a k times coarser grid (:class:`.blocks.WorkingGrid`);
  the paper's network runs at 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import (Conv3d, ConvNormAct, ResidualDownBlock, UpsampleBlock, check_groups, check_input, check_io,
                     check_positive_int, check_rate, check_scale, check_widths, feature_window, group_norm,
                     WorkingGrid, upsample2)
from .slice_classifier import SliceClassifier

#: Epsilon of EfficientDet's fast normalised fusion.
FUSION_EPSILON = 1e-4

#: The encoder has four stride-2 stages, hence four pyramid levels at 1/2 ... 1/16 of the input.
LEVELS = 4


class FusionNode(nn.Module):
    """One BiFPN node: fast normalised fusion of ``n_inputs`` maps of equal shape, then a conv.

    ``n_inputs x (B, C, d, h, w) -> (B, C, d, h, w)``.
    """

    def __init__(self, n_inputs: int, channels: int, norm_groups: int):
        super().__init__()
        self.fusion_weights = nn.Parameter(torch.ones(n_inputs))
        self.conv = nn.Sequential(
            nn.ReLU(),
            Conv3d(channels, channels, 3, padding=1, groups=channels, bias=False),  # depth-wise
            Conv3d(channels, channels, 1, bias=False),  # point-wise
            group_norm(channels, norm_groups),
        )

    def normalised_weights(self) -> torch.Tensor:
        weights = F.relu(self.fusion_weights)
        return weights / (weights.sum() + FUSION_EPSILON)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        weights = self.normalised_weights()
        fused = sum(w * x for w, x in zip(weights, inputs))
        return self.conv(fused)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, d, h, w) -> (B, C, 2d, 2h, 2w)


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(x, kernel_size=3, stride=2, padding=1)  # (B, C, 2d, 2h, 2w) -> (B, C, d, h, w)


class BiFPNLayer(nn.Module):
    """One BiFPN layer over pyramid levels ordered fine to coarse (level 0 = 1/2 of the input)."""

    def __init__(self, channels: int, norm_groups: int, levels: int = LEVELS):
        super().__init__()
        self.levels = levels
        # top_down[i] makes level i's top-down node, i = 0 .. levels-2 (the coarsest has none)
        self.top_down = nn.ModuleList(FusionNode(2, channels, norm_groups) for _ in range(levels - 1))
        # bottom_up[i-1] makes level i's output, i = 1 .. levels-1 (level 0's output is its top-down node)
        self.bottom_up = nn.ModuleList(
            FusionNode(3 if level < levels - 1 else 2, channels, norm_groups) for level in range(1, levels))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        top_down: list[torch.Tensor] = [None] * self.levels  # type: ignore[list-item]
        top_down[-1] = inputs[-1]
        for level in range(self.levels - 2, -1, -1):
            top_down[level] = self.top_down[level]([inputs[level], _up(top_down[level + 1])])
        outputs = [top_down[0]]
        for level in range(1, self.levels):
            candidates = [inputs[level], top_down[level]] if level < self.levels - 1 else [inputs[level]]
            outputs.append(self.bottom_up[level - 1]([*candidates, _down(outputs[-1])]))
        return outputs


class BiFPNSeg(nn.Module):
    """BiFPN encoder-decoder with slice classifier (Nguyen et al., BraTS 2020, section 2.1).

    Args (plain values; defaults are the paper's sizes):
        in_channels: 4 (FLAIR, T1, T1ce, T2).
        out_channels: 3 (WT, TC, ET), for both segmentation and slice logits.
        encoder_channels: widths of the four residual encoder blocks, default [16, 32, 64, 128].
        bifpn_channels: BiFPN feature width, default 256.
        bifpn_layers: consecutive BiFPN layers, default 3.
        decoder_channels: width of each decoder branch, default 256 (concatenation: 4x).
        classifier_channels: classifier conv-block width, default 512.
        lstm_hidden: classifier LSTM hidden size per direction, default 512.
        lstm_layers: classifier BiLSTM layers, default 2.
        dropout: encoder dropout rate (Table 1), default 0.1.
        lstm_dropout: dropout between LSTM layers, default 0.1.
        norm_groups: GroupNorm groups, default 8.
        input_scale: resolution factor the network runs at, 1/k for a whole k, default 1.0.
        classifier_window: in-plane size (input voxels) of the classifier's pooling windows, the
            training crop's; default 128, the paper's 128 x 128 crops. See :mod:`.slice_classifier`.

    ``forward(x)`` with ``x`` of shape ``(B, 4, D, H, W)`` (multiples of 16) returns
    ``{"seg": (B, 3, D, H, W), "slices": (B, 3, D)}`` logits.
    """

    arch = "bifpn"

    def __init__(self, in_channels: int = 4, out_channels: int = 3,
                 encoder_channels: list[int] = (16, 32, 64, 128), bifpn_channels: int = 256,
                 bifpn_layers: int = 3, decoder_channels: int = 256, classifier_channels: int = 512,
                 lstm_hidden: int = 512, lstm_layers: int = 2, dropout: float = 0.1,
                 lstm_dropout: float = 0.1, norm_groups: int = 8, input_scale: float = 1.0,
                 classifier_window: int = 128):
        super().__init__()
        check_io(in_channels, out_channels, norm_groups)
        encoder_channels = check_widths("encoder_channels", encoder_channels, LEVELS, norm_groups)
        check_groups("bifpn_channels", bifpn_channels, norm_groups)
        check_positive_int("bifpn_layers", bifpn_layers)
        check_groups("decoder_channels", decoder_channels, norm_groups)
        check_rate("dropout", dropout)
        factor = check_scale(input_scale)
        window = feature_window(classifier_window, factor, 2)  # the classifier reads half the working grid
        self.config = {
            "arch": self.arch, "in_channels": in_channels, "out_channels": out_channels,
            "encoder_channels": encoder_channels, "bifpn_channels": bifpn_channels,
            "bifpn_layers": bifpn_layers, "decoder_channels": decoder_channels,
            "classifier_channels": classifier_channels, "lstm_hidden": lstm_hidden,
            "lstm_layers": lstm_layers, "dropout": float(dropout), "lstm_dropout": float(lstm_dropout),
            "norm_groups": norm_groups, "input_scale": float(input_scale), "classifier_window": classifier_window,
        }
        self.in_channels = in_channels
        self.input_scale = float(input_scale)

        widths = [in_channels, *encoder_channels]
        self.encoder = nn.ModuleList(
            ResidualDownBlock(widths[i], widths[i + 1], norm_groups, dropout) for i in range(LEVELS))
        self.projections = nn.ModuleList(
            nn.Sequential(Conv3d(width, bifpn_channels, 1, bias=False), group_norm(bifpn_channels, norm_groups))
            for width in encoder_channels)
        self.bifpn = nn.ModuleList(BiFPNLayer(bifpn_channels, norm_groups) for _ in range(bifpn_layers))
        self.decoder = nn.ModuleList([ConvNormAct(bifpn_channels, decoder_channels, norm_groups)])
        for level in range(1, LEVELS):
            blocks = [UpsampleBlock(bifpn_channels if k == 0 else decoder_channels, decoder_channels, norm_groups)
                      for k in range(level)]
            self.decoder.append(nn.Sequential(*blocks))
        self.seg_head = Conv3d(LEVELS * decoder_channels, out_channels, 1)
        self.classifier = SliceClassifier(LEVELS * decoder_channels, classifier_channels, lstm_hidden,
                                          lstm_layers, lstm_dropout, norm_groups, upsample_depth=True,
                                          out_channels=out_channels, window=window)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder pyramid, fine to coarse: ``(B, 4, D, H, W) -> [(B, C_k, D/2^k, ...), k = 1..4]``."""
        pyramid = []
        for block in self.encoder:
            x = block(x)
            pyramid.append(x)
        return pyramid

    def fuse(self, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        """Projections and the BiFPN layers: four maps of ``bifpn_channels`` at the pyramid's sizes."""
        levels = [project(level) for project, level in zip(self.projections, pyramid)]
        for layer in self.bifpn:
            levels = layer(levels)
        return levels

    def decode(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Panoptic-FPN branch: every level to half the input size, concatenated.

        ``4 x (B, C, D/2^k, ...) -> (B, 4*decoder_channels, D/2, H/2, W/2)``.
        """
        return torch.cat([branch(level) for branch, level in zip(self.decoder, levels)], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated feature map that both the segmentation head and the classifier read."""
        return self.decode(self.fuse(self.encode(x)))

    @property
    def logit_factor(self) -> int | None:
        """How much coarser than the input :meth:`forward_coarse`'s segmentation logits are (2), or None
        where ``forward`` does not end in one trilinear up-sampling (``input_scale`` below 1: two)."""
        return 2 if check_scale(self.input_scale) == 1 else None

    def _heads(self, x: torch.Tensor) -> tuple[WorkingGrid, torch.Tensor, torch.Tensor]:
        """The working grid, the segmentation head's logits (half the working grid) and the slice logits
        (on the input's slices)."""
        check_input(x, self.in_channels)
        grid = WorkingGrid.of(x.shape[2:], self.input_scale)
        features = self.features(grid.enter(x))  # (B, 4, D, H, W) -> working grid -> (B, 1024, d/2, h/2, w/2)
        # (B, 3, d/2, h/2, w/2) and (B, 3, d) -> (B, 3, D)
        return grid, self.seg_head(features), grid.leave_slices(self.classifier(features))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grid, seg, slices = self._heads(x)
        return {"seg": grid.leave(upsample2(seg)), "slices": slices}  # seg -> (B, 3, D, H, W)

    def forward_coarse(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward`` before its last step: ``seg`` on the grid :attr:`logit_factor` times coarser,
        which ``forward`` up-samples (trilinear, half-pixel centres) and crops to the input; ``slices``
        as ``forward``'s. Only where :attr:`logit_factor` is not None."""
        if self.logit_factor is None:
            raise ValueError("forward_coarse needs input_scale 1: at other scales forward up-samples twice")
        _, seg, slices = self._heads(x)
        return {"seg": seg, "slices": slices}
