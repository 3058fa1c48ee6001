"""Building blocks shared by both networks, and the checks on their plain-value arguments.

Decisions where the paper is silent:

* every convolution followed by a norm has no bias (the norm's shift replaces it, and a bias
  before GroupNorm would get a zero or near-zero gradient);
* dropout is element-wise ``nn.Dropout`` placed exactly where Table 1 puts it (after GN, before
  ReLU); its rate is a hyper-parameter of the BiFPN encoder (default 0.1);
* norm is GroupNorm with ``norm_groups`` groups (8 in the paper); a width that is not a
  multiple of the group count is refused at construction.

Performance: every 3-D convolution is a :class:`Conv3d`, which in CPU float32 inference (no
autograd, no autocast) calls oneDNN directly, a 1x1x1 convolution as one matrix product, because
PyTorch's heuristic sends a batch-1 conv3d with ``C*D*H <= 20480`` (small widths, the ``demo``
preset's deeper levels) to its slower im2col kernel ``slow_conv3d``. Results agree to float rounding
(tested). (evidence: docs/design.md#cpu-convolution-kernels)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

#: Every spatial size given to a network must be a multiple of this (four halvings).
SIZE_MULTIPLE = 16


# ---------------------------------------------------------------------------------------------
# argument checks: bad hyper-parameters raise ValueError at construction, never inside forward


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_widths(name: str, values, length: int | None = None, groups: int | None = None) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
    widths = [check_positive_int(name, v) for v in values]
    if length is not None and len(widths) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(widths)}: {values!r}")
    for width in widths:
        check_groups(name, width, groups)
    return widths


def check_groups(name: str, channels: int, groups: int | None) -> int:
    check_positive_int(name, channels)
    if groups is not None and channels % groups:
        raise ValueError(f"{name}={channels} is not a multiple of norm_groups={groups} (GroupNorm)")
    return channels


def check_io(in_channels, out_channels, norm_groups) -> None:
    """The arguments every network shares: positive channel counts and group count."""
    for name, value in (("norm_groups", norm_groups), ("in_channels", in_channels), ("out_channels", out_channels)):
        check_positive_int(name, value)


def check_scale(value) -> int:
    """The whole k of an ``input_scale`` of 1/k (1, 1/2, 1/4, ...); ValueError for any other value."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0
    factor = round(1.0 / value) if number else 0
    if not factor or abs(factor * value - 1.0) > 1e-9:
        raise ValueError(f"input_scale must be 1/k for a whole k >= 1 (1, 0.5, 0.25, ...), got {value!r}")
    return factor


def feature_window(window, factor: int, stride: int) -> tuple[int, int]:
    """The classifier's in-plane window on a feature grid ``stride`` times coarser than a working grid
    ``factor`` times coarser than the input, from ``window`` input voxels. ValueError unless whole."""
    check_positive_int("classifier_window", window)
    cells, remainder = divmod(window, factor * stride)
    if remainder or cells < 1:
        raise ValueError(f"classifier_window={window} input voxels is not a whole number of feature cells at "
                         f"input_scale 1/{factor} (features every {stride} working voxels)")
    return cells, cells


# ---------------------------------------------------------------------------------------------
# resolution handling


def check_input(x: torch.Tensor, in_channels: int) -> None:
    """Refuse an input the networks cannot take, with a message naming the shape."""
    if x.dim() != 5 or x.shape[1] != in_channels:
        raise ValueError(f"expected input (B, {in_channels}, D, H, W), got shape {tuple(x.shape)}")
    if any(size % SIZE_MULTIPLE for size in x.shape[2:]):
        raise ValueError(f"spatial sizes must be multiples of {SIZE_MULTIPLE}, got {tuple(x.shape[2:])}")


@dataclass(frozen=True)
class WorkingGrid:
    """Where a network with ``input_scale`` 1/k runs, for an input of spatial ``size`` (D, H, W).

    Decision: the input is zero-padded at the end of each axis to a multiple of 16 k and averaged over
    k^3 blocks (every input voxel counts once); the logits come back by k-fold trilinear up-sampling
    (voxel centres aligned with the blocks) and the padding is cut off. Why: the scale is then the
    same for a training crop and a whole volume (evidence: docs/design.md#exact-input-scales-only).
    """

    size: tuple[int, int, int]
    factor: int
    padded: tuple[int, int, int]
    working: tuple[int, int, int]

    @classmethod
    def of(cls, size: Sequence[int], scale: float) -> "WorkingGrid":
        size = tuple(int(n) for n in size)
        factor = check_scale(scale)
        multiple = SIZE_MULTIPLE * factor
        padded = tuple(-(-n // multiple) * multiple for n in size)
        return cls(size, factor, padded, tuple(n // factor for n in padded))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *size)`` zero-padded at the end of each axis to ``(B, C, *padded)``."""
        pad = [amount for n, p in zip(self.size[::-1], self.padded[::-1]) for amount in (0, p - n)]
        return F.pad(x, pad) if any(pad) else x

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *size)`` -> ``(B, C, *working)``."""
        if self.factor == 1:
            return x
        return F.avg_pool3d(self.pad(x), self.factor)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, *working)`` -> ``(B, C, *size)``."""
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=float(self.factor), mode="trilinear", align_corners=False)
        return x[..., : self.size[0], : self.size[1], : self.size[2]]

    def leave_slices(self, x: torch.Tensor) -> torch.Tensor:
        """Slice logits ``(B, C, working D)`` -> ``(B, C, D)``."""
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=float(self.factor), mode="linear", align_corners=False)
        return x[..., : self.size[0]]


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """2x trilinear up-sampling of ``(B, C, D, H, W)``."""
    return F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# blocks


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for CPU float32 inference without autocast, where oneDNN is always the faster kernel."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) with faster kernels in CPU float32 inference."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and _use_onednn(input, weight):
            if self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.groups == 1 \
                    and self.padding == (0, 0, 0):
                out = torch.matmul(weight.flatten(1), input.flatten(2))  # (Cout, Cin) @ (B, Cin, N) -> (B, Cout, N)
                if bias is not None:
                    out = out + bias[:, None]
                return out.view(input.shape[0], -1, *input.shape[2:])  # -> (B, Cout, D, H, W)
            return torch.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super()._conv_forward(input, weight, bias)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels)


class ConvNormAct(nn.Sequential):
    """conv3 (stride ``stride``), GN, optional dropout, ReLU: ``(B, Cin, ...) -> (B, Cout, ...)``."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, stride: int = 1,
                 dropout: float = 0.0, kernel_size: int = 3):
        layers: list[nn.Module] = [
            Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            group_norm(out_channels, norm_groups),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResidualDownBlock(nn.Module):
    """Table 1 encoder block: (conv3 s2, GN, dropout, ReLU, conv3 s1, GN, dropout, ReLU) + conv3 s2.

    ``(B, Cin, D, H, W) -> (B, Cout, D/2, H/2, W/2)``. The shortcut is a plain strided conv3 (with
    bias, no norm) added to the main path; no activation after the sum, as the table lists none.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float):
        super().__init__()
        self.main = nn.Sequential(
            ConvNormAct(in_channels, out_channels, norm_groups, stride=2, dropout=dropout),
            ConvNormAct(out_channels, out_channels, norm_groups, stride=1, dropout=dropout),
        )
        self.shortcut = Conv3d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class UpsampleBlock(nn.Module):
    """Panoptic-FPN up-sample block: conv3, GN, ReLU, then 2x trilinear (``upsample=False``: no 2x)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, upsample: bool = True):
        super().__init__()
        self.conv = ConvNormAct(in_channels, out_channels, norm_groups)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return upsample2(x) if self.upsample else x  # (B, C, d, h, w) -> (B, C, 2d, 2h, 2w)


class DoubleConv(nn.Sequential):
    """UNet++ node: two (conv3, GN, ReLU), as the VGG block of the repository the paper used."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__(
            ConvNormAct(in_channels, out_channels, norm_groups),
            ConvNormAct(out_channels, out_channels, norm_groups),
        )
