"""A montage PNG of a case: the four modalities and the labels on the axial slice with the most tumour."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..regions import EDEMA, NECROSIS
from .phantom import PhantomCase
from .tumour import ENHANCING

_LABEL_COLOURS = {NECROSIS: (1.0, 0.15, 0.1), EDEMA: (0.1, 0.9, 0.2), 3: (1.0, 0.9, 0.0), ENHANCING: (1.0, 0.9, 0.0)}


def _load_for_preview(source) -> tuple[np.ndarray, np.ndarray, str]:
    if isinstance(source, PhantomCase):
        return source.image, source.labels, f"phantom seed {source.seed} case {source.index}"
    if isinstance(source, (tuple, list)):
        image, labels = source
        return np.asarray(image), np.asarray(labels), ""
    from ..cases import find_cases
    from ..io import read_case, read_label

    found = find_cases(source)
    if not found.cases:
        problems = "; ".join(str(e) for e in found.errors) or "no BraTS case found"
        raise FileNotFoundError(f"cannot preview {source}: {problems}")
    case = found.cases[0]
    images = read_case(case)
    labels = read_label(case.seg, case.case_id, images.geometry) if case.seg else np.zeros(images.geometry.shape, np.uint8)
    return images.image, labels, case.case_id


def write_preview(source, png_path: Path | str) -> Path:
    """A montage PNG: the four modalities and the labels on the axial slice with most tumour.

    ``source``: a case folder (the first case found in it), a :class:`PhantomCase`, or a pair
    ``(image (4, D, H, W), labels (D, H, W))``. The middle slice is shown when there is no tumour.
    Slices are shown in radiological convention (anterior up, patient's left on the right).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, labels, title = _load_for_preview(source)
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    z = int(per_slice.argmax()) if per_slice.any() else labels.shape[0] // 2

    def view(array):  # SimpleITK (y, x) rows run posterior -> anterior and left -> right
        return array[::-1, ::-1]

    figure, axes = plt.subplots(1, 5, figsize=(15, 3.4), dpi=72)
    for axis, name, channel in zip(axes, ("FLAIR", "T1", "T1ce", "T2"), image):
        brain = channel[z][channel[z] > 0]
        top = np.percentile(brain, 99.5) if brain.size else 1.0
        axis.imshow(view(channel[z]), cmap="gray", vmin=0, vmax=top, interpolation="nearest")
        axis.set_title(name)
    overlay = np.zeros((*labels.shape[1:], 4))
    for value, colour in _LABEL_COLOURS.items():
        overlay[labels[z] == value] = (*colour, 0.55)
    flair = image[0][z]
    axes[4].imshow(view(flair), cmap="gray", vmin=0, vmax=max(1.0, np.percentile(flair[flair > 0], 99.5)) if flair.any() else 1)
    axes[4].imshow(view(overlay), interpolation="nearest")
    axes[4].set_title("labels: necrosis red, edema green, ET yellow", fontsize=8)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(f"{title} axial slice {z}".strip(), fontsize=10)
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
