"""The paper's two networks (BiFPN and UNet++, each with a slice classifier) and their registry."""

from .bifpn import BiFPNSeg
from .registry import (ARCHITECTURES, PRESET_NAMES, PRESETS, build_model, count_parameters, load_model,
                       parameter_table, preset_config, save_model)
from .slice_classifier import SliceClassifier
from .unetpp import UNetPlusPlus

__all__ = [
    "ARCHITECTURES", "PRESETS", "PRESET_NAMES", "BiFPNSeg", "SliceClassifier", "UNetPlusPlus",
    "build_model", "count_parameters", "load_model", "parameter_table", "preset_config", "save_model",
]
