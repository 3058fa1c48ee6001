"""Build, save and load the networks from plain hyper-parameter dicts.

A checkpoint is one ``torch.save`` file holding only plain values and tensors, so it loads with
``torch.load(..., weights_only=True)``:

    {"format": CHECKPOINT_FORMAT, "arch": "bifpn" | "unetpp", "config": {hyper-parameters},
     "state_dict": {name: tensor}, "metadata": {JSON-able values: fold, training summary, ...}}

Constructor defaults are the paper's sizes (Tables 1-3, and classifier windows of 128, the in-plane
size of the paper's crops), so the ``paper`` preset is empty; a preset lists only what it sets.
Presets:

* ``paper``: the constructors' defaults;
* ``demo``: small widths, sized for ten models x eight flips within about a minute per case on a
  2-core CPU; used for the shipped demo weights. Both networks put their logits on a 2 mm grid,
  up-sampled trilinearly to 1 mm: BiFPN at ``input_scale`` 1 (its head reads half the input grid, as
  in the paper), UNet++ at 1/2 (its dense top row at full resolution is the cost that dominates),
  entered through a learned 2x2x2 patch embedding to 8 channels (``stem_channels``) instead of the
  block average, with a top row 6 wide. Why 2 mm: a 4 mm grid loses the thin enhancing rims
  (evidence: docs/design.md#demo-logit-grid). Classifier windows of 64 voxels, the demo recipe's crops;
* ``tiny``: the smallest sensible widths, for tests (32-voxel windows, the tiny recipe's crops).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..io import replaced_atomically
from .bifpn import BiFPNSeg
from .unetpp import UNetPlusPlus

CHECKPOINT_FORMAT = "brats-cls-model/1"

ARCHITECTURES: dict[str, type[nn.Module]] = {"bifpn": BiFPNSeg, "unetpp": UNetPlusPlus}

PRESETS: dict[str, dict[str, dict]] = {
    "bifpn": {
        "paper": {},
        "demo": {"encoder_channels": [8, 16, 24, 32], "bifpn_channels": 16, "bifpn_layers": 3,
                 "decoder_channels": 8, "classifier_channels": 8, "lstm_hidden": 16, "lstm_layers": 2,
                 "norm_groups": 4, "input_scale": 1.0, "classifier_window": 64},
        "tiny": {"encoder_channels": [4, 4, 8, 8], "bifpn_channels": 8, "bifpn_layers": 2,
                 "decoder_channels": 4, "classifier_channels": 8, "lstm_hidden": 4, "lstm_layers": 2,
                 "norm_groups": 2, "classifier_window": 32},
    },
    "unetpp": {
        "paper": {},
        "demo": {"filters": [6, 8, 16, 32, 64], "classifier_channels": 8, "lstm_hidden": 16,
                 "lstm_layers": 3, "norm_groups": 2, "input_scale": 0.5, "classifier_window": 64,
                 "stem_channels": 8},
        "tiny": {"filters": [4, 4, 8, 8, 16], "classifier_channels": 8, "lstm_hidden": 4, "lstm_layers": 2,
                 "norm_groups": 2, "classifier_window": 32},
    },
}

PRESET_NAMES = ("paper", "demo", "tiny")


def preset_config(arch: str, size: str) -> dict:
    """The full hyper-parameter dict of a preset (constructor defaults filled in)."""
    return build_model(arch, size, device="meta").config


def build_model(arch: str, size: str | dict = "paper", device: str | torch.device | None = None) -> nn.Module:
    """A network ``arch`` ("bifpn" or "unetpp") of preset ``size`` or of a plain hyper-parameter dict.

    A dict may carry an ``"arch"`` key (as ``model.config`` does); it must then agree with ``arch``.
    ``device="meta"`` builds a shape-only model (no memory), e.g. to count parameters.
    Raises ValueError on an unknown architecture, preset or hyper-parameter, or a bad value.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if isinstance(size, str):
        if size not in PRESETS[arch]:
            raise ValueError(f"unknown preset {size!r} for {arch}; choose one of {sorted(PRESETS[arch])}")
        params = dict(PRESETS[arch][size])
    elif isinstance(size, dict):
        params = dict(size)
        declared = params.pop("arch", arch)
        if declared != arch:
            raise ValueError(f"hyper-parameters are for architecture {declared!r}, not {arch!r}")
    else:
        raise ValueError(f"size must be a preset name or a dict of hyper-parameters, got {size!r}")
    cls = ARCHITECTURES[arch]
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(**params)
    except TypeError as error:  # an unknown keyword
        raise ValueError(f"bad hyper-parameters for {arch}: {error}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (works on meta-device models too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(model: nn.Module, path: Path | str, metadata: dict | None = None) -> None:
    """Write ``model`` (arch, hyper-parameters, weights) and JSON-able ``metadata`` atomically to ``path``."""
    path = Path(path)
    metadata = dict(metadata or {})
    try:
        metadata = json.loads(json.dumps(metadata))  # plain values only, so weights_only loading works
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint metadata for {path} must be JSON-able: {error}") from None
    config = dict(model.config)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": config.pop("arch"),
        "config": config,
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "metadata": metadata,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as target:
        torch.save(checkpoint, target)


def load_model(path: Path | str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network saved at ``path``; returns ``(model in eval mode, metadata)``.

    Raises ValueError naming the file when it is not a brats-cls checkpoint, when its hyper-parameters
    are ones this version does not build or leave one unrecorded (a default filled in would silently
    give another network), or when the weights do not match.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - torch raises many kinds on a corrupt file
        raise ValueError(f"cannot read model checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a brats-cls model checkpoint (format {CHECKPOINT_FORMAT})")
    try:
        model = build_model(checkpoint["arch"], checkpoint["config"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    unrecorded = sorted(set(model.config) - {"arch"} - set(checkpoint["config"]))
    if unrecorded:
        raise ValueError(f"{path} does not record {', '.join(unrecorded)}: it was saved by an older brats-cls "
                         f"whose networks this version no longer builds; retrain it")
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"weights in {path} do not match its architecture: {error}") from None
    model.to(map_location)
    model.eval()
    return model, checkpoint["metadata"]


def parameter_table() -> list[tuple[str, str, int, float]]:
    """``(arch, preset, parameters, input_scale)`` for every architecture and preset (built on meta)."""
    rows = []
    for arch in sorted(ARCHITECTURES):
        for preset in PRESET_NAMES:
            model = build_model(arch, preset, device="meta")
            rows.append((arch, preset, count_parameters(model), model.config["input_scale"]))
    return rows

