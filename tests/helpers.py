"""Assertions shared by the inference and container tests (plain functions, imported by both)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def labels_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_masks_match_inputs(out: Path, cases, allowed_labels: set[int]) -> None:
    """``out`` holds exactly one mask per case, each uint8 on its FLAIR's grid (size, origin,
    spacing, direction) with labels only from ``allowed_labels``."""
    assert sorted(p.name for p in out.iterdir()) == sorted(c.output_name for c in cases)
    for case in cases:
        written = sitk.ReadImage(str(out / case.output_name))
        reference = sitk.ReadImage(str(case.modalities["flair"]))
        assert written.GetSize() == reference.GetSize()
        assert written.GetOrigin() == reference.GetOrigin() and written.GetSpacing() == reference.GetSpacing()
        assert written.GetDirection() == reference.GetDirection()
        assert written.GetPixelIDTypeAsString() == "8-bit unsigned integer"
        assert set(np.unique(sitk.GetArrayFromImage(written)).tolist()) <= allowed_labels
