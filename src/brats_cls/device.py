"""Devices and numeric precision: the one place that says what ``--device auto`` and ``--precision auto`` mean.

Precision names (every command that runs a network takes one of :data:`PRECISIONS`):

* ``fp32``: no autocast;
* ``bf16``: bfloat16 autocast (the exponent range of float32, so training needs no loss scaling);
* ``fp16``: float16 autocast (CUDA only; training adds a GradScaler, as the AMP of PyTorch 1.6 the
  paper used);
* ``auto``: bfloat16 where the device computes it natively, else float16 on CUDA, else float32.
  "Natively": a CUDA device for which ``torch.cuda.is_bf16_supported()`` holds (Ampere and newer; not
  V100 or T4, which get float16), or a CPU with AVX-512 BF16 or AMX instructions (elsewhere oneDNN
  emulates bfloat16, slower than float32).
  **Training on the CPU is the exception: ``auto`` is float32 there** (``resolve_precision(...,
  training=True)``): bf16 autocast trained slower than float32 on the CPU and led UNet++ to non-finite
  steps (evidence: docs/design.md#cpu-training-precision). ``--precision bf16`` still opts in (with the
  non-finite-step guard of ``training.step``).

Weights always stay float32, and losses and averaged logits are computed in float32.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide, or an unknown name."""


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the CUDA device ``local_rank`` when there is one, else the CPU."""
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """True where ``device`` computes bfloat16 in hardware (see the module docstring)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(name: str, device: torch.device, training: bool = False) -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``fp16``) that ``name`` means on ``device``;
    ``training``: for optimiser steps, where ``auto`` on the CPU is float32 (see the module docstring)."""
    if name not in PRECISIONS:
        raise DeviceError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if training and device.type == "cpu":
            return "fp32"
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a concrete precision; None for float32."""
    return _DTYPES[precision]


def autocast(device: torch.device, precision: str):
    """The autocast context of a concrete precision on ``device`` (float32: autocast explicitly off)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock reading means something; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def inference_context(device: torch.device, precision: str):
    """``torch.inference_mode`` and the autocast of ``precision``: how every forward at inference runs."""
    with torch.inference_mode(), autocast(device, precision):
        yield
