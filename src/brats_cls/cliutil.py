"""Small command-line helpers shared by the commands (one home for each)."""

from __future__ import annotations

from pathlib import Path

import click

#: The smallest spatial size any command accepts for a grid (four halvings of 16 need at least 16).
MIN_SIZE = 16


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"155,240,240"`` or ``"155x240x240"`` -> ``(155, 240, 240)`` (D, H, W); ValueError otherwise."""
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"expected three sizes D,H,W such as 155,240,240, got {text!r}")
    shape = tuple(int(part) for part in parts)
    if min(shape) < MIN_SIZE:
        raise ValueError(f"every size must be at least {MIN_SIZE} voxels, got {text!r}")
    return shape


def weights_option(help_text: str):
    """``--weights DIR``: a weights folder (manifest.json), for every command that loads models."""
    return click.option("--weights", "weights_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                        help=help_text)


def tta_option(help_text: str):
    """``--tta/--no-tta``: the 8 flips of (D, H, W), or the identity only."""
    return click.option("--tta/--no-tta", default=True, show_default=True, help=help_text)


def shape_callback(_context, _parameter, value: str | None) -> tuple[int, int, int] | None:
    """A click callback around :func:`parse_shape` (None stays None)."""
    if value is None:
        return None
    try:
        return parse_shape(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
