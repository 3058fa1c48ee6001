"""Averaging a network's flipped segmentation logits on its own coarse grid, and up-sampling once.

Both networks compute their segmentation logits on a grid ``k`` times coarser than the input (the
``demo`` networks: 2 mm, k = 2), then up-sample them trilinearly (half-pixel centres, PyTorch's
``align_corners=False``) and crop the padding (``forward``). The predictor averages logits over 8 flips
and several networks, and trilinear up-sampling is linear, so the average can be taken on the coarse
grid and up-sampled once per case: the same logits up to float rounding, without a full-resolution
up-sampling, copy and sum per flip (``BENCHMARKS.md``, issue #24).

What makes that exact is where a flip and the crop meet. A network pads its input at the end of each
axis to ``P`` (a multiple of 16 k), so an input of ``S`` voxels along a flipped axis ends up, un-flipped,
``P - S`` voxels further along the coarse grid than an unflipped one. Each flip is therefore placed on a
common **halo grid**: ``S / k + 2`` coarse cells per axis, the cells that the up-sampling of the
un-flipped, cropped output reads, with one cell before and after, taken from the coarse logits (or
repeated from its edge, as PyTorch clamps). Up-sampling a halo grid by ``k`` and keeping output voxels
``k .. k + S`` reads only whole cells and never clamps, so it is linear in the halo grid: the sum of
the flips' halo grids, up-sampled once (:func:`upsample`), equals the sum of their up-sampled outputs.

Requirements (checked): ``S`` a multiple of ``k`` and ``P - S`` too (true for inputs in multiples of 16).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.nn import functional as F

SPATIAL = (2, 3, 4)  # (D, H, W) in a (B, C, D, H, W) tensor


def halo_shape(size, factor: int) -> tuple[int, int, int]:
    """The halo grid of an input of spatial ``size`` at ``factor``: ``S / k + 2`` cells per axis."""
    for n in size:
        if n % factor:
            raise ValueError(f"input size {tuple(size)} is not a multiple of the logit factor {factor}")
    return tuple(n // factor + 2 for n in size)


def _runs(indices: np.ndarray) -> list[tuple[slice, slice]]:
    """``indices`` (non-decreasing) as (halo slice, source slice) pairs of consecutive runs."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(indices)]))
    return [(slice(int(a), int(b)), slice(int(indices[a]), int(indices[a]) + int(b - a))) for a, b in zip(starts, stops)]


def placements(coarse_shape, size, factor: int, dims) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Where one flip's un-flipped coarse logits go on the halo grid: (halo slices, source slices) per
    block, the source being the coarse logits flipped back along ``dims`` (module docstring)."""
    per_axis = []
    for axis, (n, s) in enumerate(zip(coarse_shape, size)):
        padded = n * factor
        if padded < s or (padded - s) % factor:
            raise ValueError(f"coarse logits {tuple(coarse_shape)} x {factor} do not cover input {tuple(size)}")
        start = (padded - s) // factor if SPATIAL[axis] in dims else 0
        indices = np.clip(np.arange(start - 1, start + s // factor + 1), 0, n - 1)
        per_axis.append(_runs(indices))
    return [tuple(zip(*blocks)) for blocks in itertools.product(*per_axis)]


def add_flip(total: torch.Tensor, coarse: torch.Tensor, dims: tuple[int, ...], factor: int, size) -> None:
    """``total`` (float32, ``(1, C, *halo_shape)``) += one flip's coarse logits ``coarse`` ``(1, C, *n)``,
    un-flipped along ``dims`` and placed on the halo grid of an input of ``size``.

    On the CPU numpy adds through reversed views (no flipped copy); other devices use
    :func:`add_flip_torch`.
    """
    if total.device.type != "cpu":
        add_flip_torch(total, coarse, dims, factor, size)
        return
    source = coarse.to(torch.float32).numpy()
    source = np.flip(source, dims) if dims else source
    target = total.numpy()
    for halo, src in placements(coarse.shape[2:], size, factor, dims):
        view = target[(Ellipsis, *halo)]
        np.add(view, source[(Ellipsis, *src)], out=view)


def add_flip_torch(total: torch.Tensor, coarse: torch.Tensor, dims: tuple[int, ...], factor: int, size) -> None:
    """:func:`add_flip` in torch, on any device (``torch.flip`` copies: torch has no negative strides)."""
    source = torch.flip(coarse, dims) if dims else coarse
    for halo, src in placements(coarse.shape[2:], size, factor, dims):
        total[(Ellipsis, *halo)] += source[(Ellipsis, *src)].to(torch.float32)


def upsample(halo: torch.Tensor, factor: int, size) -> torch.Tensor:
    """Halo-grid logits ``(1, C, *halo_shape)`` -> ``(1, C, *size)`` on the input grid: the trilinear
    up-sampling and crop of ``forward`` (module docstring)."""
    d, h, w = size
    if factor == 1:
        return halo[..., 1 : 1 + d, 1 : 1 + h, 1 : 1 + w]
    up = F.interpolate(halo, scale_factor=float(factor), mode="trilinear", align_corners=False)
    return up[..., factor : factor + d, factor : factor + h, factor : factor + w]
