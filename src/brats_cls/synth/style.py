"""The look of a phantom case, drawn widely per case so that models trained on phantoms do not key on
one generator's look: tissue contrasts, noise, blur, bias field, intensity scale, geometry.

Every draw comes from the case's own generator. Ranges (decisions; the paper is silent on phantoms):

* **Contrast**: each tissue's mean intensity per modality (:data:`CONTRAST`, relative to T1 white matter)
  is multiplied by a log-normal factor (sigma 0.15, about +-15 %); with probability 0.3 grey and white
  matter are pulled towards their mean (down to no contrast between them at all, as in generators
  without anatomy). Then the radiological appearance that BraTS annotators rely on is enforced
  (:func:`_keep_semantics`): edema and non-enhancing core bright on FLAIR, edema and necrosis bright on
  T2, tumour dark on T1, enhancing tumour bright on T1ce and brighter there than the necrosis and the
  tissue around it. Its margins are drawn too, so some cases are subtle. The **non-enhancing core**
  (low-grade glioma) is then mixed between the case's edema and necrosis contrasts, in every modality,
  by a drawn likeness uniform in [0.1, 1] (0: like edema, 1: like necrosis): some cores barely stand
  out of their edema, others look necrotic.
* **Noise**: Rician (probability 0.7) or Gaussian, standard deviation 1-8 % of white matter.
* **Blur**: with probability 0.3, a Gaussian of 0.4-1.2 voxels (other resolutions and reconstructions).
* **Bias field**: a :class:`brats_cls.shading.BiasField` of :data:`SHADING` (shared by the four
  modalities and per modality, head- and lobe-sized features) of strength 0-0.35 in log units (up to
  42 % brighter or 30 % darker than the brain's mean), drawn from its own generator so that the same
  case can be rendered under another strength (:func:`brats_cls.synth.phantom.make_case`).
* **Texture**: smooth tissue texture of 0-8 %.
* **Scale**: white matter at 50-4000 (integer storage, as BraTS int16).
* **Geometry**: rotation up to 10 degrees about each axis, scale +-10 %, shift up to 6 mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cases import MODALITIES
from ..shading import ShadingDistribution

#: Mean intensity of each tissue per modality, white matter of T1 ~ 1 (rows in MODALITIES order).
CONTRAST = {
    #          csf   gm    wm    edema necro enh   non-enh core
    "flair": (0.12, 0.80, 0.60, 1.30, 0.70, 1.00, 1.20),
    "t1": (0.22, 0.62, 0.92, 0.55, 0.28, 0.62, 0.48),
    "t1ce": (0.22, 0.64, 0.90, 0.57, 0.25, 1.60, 0.50),
    "t2": (1.45, 0.62, 0.40, 1.10, 1.35, 0.85, 1.05),
}
CSF, GM, WM, EDEMA, NECROSIS, ENHANCING, NONENHANCING = range(7)
#: The phantoms' bias-field distribution (module docstring).
SHADING = ShadingDistribution(strength=(0.0, 0.35))


@dataclass(frozen=True)
class Style:
    """One case's look (module docstring): a contrast table ``(4, 7)`` in MODALITIES order and the rest."""

    contrast: np.ndarray
    noise: float  # standard deviation relative to white matter
    rician: bool
    blur: float  # Gaussian sigma in voxels (0: none)
    bias: float  # strength of the bias field (log units, shading.BiasField)
    texture: float
    scale: float  # white-matter intensity
    degrees: float
    scale_range: float
    shift_mm: float


def draw_style(rng: np.random.Generator) -> Style:
    contrast = np.array([CONTRAST[name] for name in MODALITIES], dtype=np.float64)
    contrast *= np.exp(rng.normal(0.0, 0.15, contrast.shape))
    if rng.random() < 0.3:  # weak or no grey/white contrast
        pull = rng.uniform(0.3, 1.0)
        middle = (contrast[:, GM] + contrast[:, WM]) / 2
        contrast[:, GM] += pull * (middle - contrast[:, GM])
        contrast[:, WM] += pull * (middle - contrast[:, WM])
    _keep_semantics(contrast, rng)
    return Style(
        contrast=contrast.astype(np.float32),
        noise=float(rng.uniform(0.01, 0.08)),
        rician=bool(rng.random() < 0.7),
        blur=float(rng.uniform(0.4, 1.2)) if rng.random() < 0.3 else 0.0,
        bias=float(rng.uniform(*SHADING.strength)),
        texture=float(rng.uniform(0.0, 0.08)),
        scale=float(np.exp(rng.uniform(np.log(50), np.log(4000)))),
        degrees=10.0, scale_range=0.10, shift_mm=6.0,
    )


def _keep_semantics(contrast: np.ndarray, rng: np.random.Generator) -> None:
    """Enforce the radiological appearance of the tumour classes, with drawn margins; in place."""
    flair, t1, t1ce, t2 = (MODALITIES.index(name) for name in ("flair", "t1", "t1ce", "t2"))
    brain = lambda row: max(contrast[row, GM], contrast[row, WM])  # noqa: E731
    margin = lambda: rng.uniform(1.25, 1.8)  # noqa: E731
    contrast[flair, EDEMA] = max(contrast[flair, EDEMA], margin() * brain(flair))
    contrast[t2, EDEMA] = max(contrast[t2, EDEMA], margin() * brain(t2))
    contrast[t2, NECROSIS] = max(contrast[t2, NECROSIS], margin() * brain(t2))
    for tissue in (EDEMA, NECROSIS):
        contrast[t1, tissue] = min(contrast[t1, tissue], contrast[t1, WM] / margin())
    contrast[t1ce, ENHANCING] = max(contrast[t1ce, ENHANCING], margin() * brain(t1ce),
                                    margin() * contrast[t1, ENHANCING])
    contrast[t1ce, NECROSIS] = min(contrast[t1ce, NECROSIS], contrast[t1ce, ENHANCING] / (1.5 * margin()))
    contrast[flair, CSF] = min(contrast[flair, CSF], 0.5 * brain(flair))
    likeness = rng.uniform(0.1, 1.0)
    contrast[:, NONENHANCING] = (1 - likeness) * contrast[:, EDEMA] + likeness * contrast[:, NECROSIS]
