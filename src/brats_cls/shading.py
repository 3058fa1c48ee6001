"""Smooth multiplicative intensity inhomogeneity (bias field): one home for the field that the phantoms
are rendered with (:mod:`brats_cls.synth.render`) and that training augments with
(:mod:`brats_cls.training.augment`).

A receive-coil field multiplies every sequence of a session by nearly the same smooth map, on scales
from the whole head down to a lobe; each sequence adds some shading of its own. A lobe brighter in all
four contrasts is therefore shading, not tumour (edema is bright on FLAIR and T2 but dark on T1), and
a model must have seen such fields to tell the two apart.

The distribution (decisions; the paper does not augment intensity inhomogeneity):

* Channel ``c``'s field is ``b_c(x) = exp(L_c(x))`` with
  ``L_c = s * (w * g_c * F_0 + (1 - w) * F_c)``: ``F_0`` is shared by the channels, ``F_c`` is the
  channel's own, both **unit fields** (zero mean over the brain, largest magnitude 1 there). So
  ``|L_c| <= s`` everywhere in the brain: ``s`` is the **strength**, the largest log-deviation from
  the brain's (geometric) mean, e.g. ``s = 0.3`` allows a region 35 % brighter or 26 % darker.
* ``s`` uniform in :attr:`ShadingDistribution.strength`; the shared weight ``w`` uniform in
  :attr:`~ShadingDistribution.shared` (mostly shared, as a coil field is); the per-channel gain of
  the shared part ``g_c`` uniform in :attr:`~ShadingDistribution.gain` (the same coil shades a
  sequence more or less after its own scaling).
* Each unit field mixes two scales: a **head** part (Gaussian bumps on a lattice of spacing drawn
  log-uniformly in :attr:`~ShadingDistribution.head_mm`, i.e. gradients across the whole brain) and a
  **lobe** part (spacing in :attr:`~ShadingDistribution.lobe_mm`, bumps a few cm across), with a drawn
  share of variance ``m`` uniform in [0, 1] for the lobe part.
* A lattice field is a sum of Gaussians of width 0.6 x the lattice spacing centred on a regular
  lattice that overhangs the volume by one spacing, with standard normal coefficients: smooth
  (infinitely differentiable), close to stationary, and separable, so it is evaluated on any box of
  the volume, or on a subsampled grid, at the cost of a few small matrix products.
* Not MONAI's ``RandBiasField``: one independent polynomial per channel has neither a shared part
  nor lobe-sized features.

Why this field and not MONAI's, and what it was built against: docs/design.md#shading.

Everything comes from the generator passed in, so a field is reproducible from its seed. The field is
only ever applied to the brain (nonzero voxels); outside it, intensities stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Gaussian width relative to the lattice spacing (module docstring).
_WIDTH = 0.6
#: The grid step, in voxels per axis, of the brain sample that fields are normalised on.
SAMPLE_STEP = 4


def sample_box(shape, step: int = SAMPLE_STEP) -> tuple[slice, ...]:
    """The slices that sample a volume of ``shape`` every ``step`` voxels per axis."""
    return tuple(slice(0, int(size), step) for size in shape)


@dataclass(frozen=True)
class ShadingDistribution:
    """Ranges of one field's draw (module docstring); lengths in mm, strength in log units."""

    strength: tuple[float, float] = (0.0, 0.3)
    shared: tuple[float, float] = (0.5, 1.0)
    gain: tuple[float, float] = (0.5, 1.0)
    head_mm: tuple[float, float] = (80.0, 160.0)
    lobe_mm: tuple[float, float] = (25.0, 60.0)

    def __post_init__(self):
        for name in ("strength", "shared", "gain", "head_mm", "lobe_mm"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"shading {name} range {low, high} must satisfy 0 <= low <= high")
        if self.shared[1] > 1 or self.gain[1] > 1:
            raise ValueError("shading shared weight and gain must lie in [0, 1]")
        if min(self.head_mm[0], self.lobe_mm[0]) <= 0:
            raise ValueError("shading scales must be positive lengths in mm")


class _LatticeField:
    """One scale of one unit field: Gaussian bumps on a regular lattice over a volume."""

    def __init__(self, rng: np.random.Generator, shape, spacing_mm, lattice_mm: float):
        self.spacing = np.asarray(spacing_mm, float)
        self.centres = []
        for size, step in zip(shape, self.spacing):
            extent = size * step
            count = int(np.ceil(extent / lattice_mm)) + 3  # overhangs each side by at least one spacing
            self.centres.append(extent / 2 + lattice_mm * (np.arange(count) - (count - 1) / 2))
        self.sigma = _WIDTH * lattice_mm
        self.coefficients = rng.standard_normal([len(c) for c in self.centres])

    def evaluate(self, box: tuple[slice, ...]) -> np.ndarray:
        """The field on ``box`` (three slices of the volume, steps allowed), float32."""
        depth, height, width = (
            np.exp(-0.5 * ((np.arange(part.start, part.stop, part.step or 1)[:, None] * step - centres[None, :])
                           / self.sigma) ** 2).astype(np.float32)  # (n, lattice)
            for part, centres, step in zip(box, self.centres, self.spacing))
        values = self.coefficients.astype(np.float32) @ width.T  # (a, b, W)
        values = np.matmul(height, values)  # (a, H, W)
        return (depth @ values.reshape(values.shape[0], -1)).reshape(len(depth), len(height), len(width))


class _UnitField:
    """A head-scale and a lobe-scale lattice field mixed, normalised on the brain (module docstring)."""

    def __init__(self, rng, shape, spacing_mm, distribution: ShadingDistribution, brain_sample, sample_box):
        head = float(np.exp(rng.uniform(*np.log(distribution.head_mm))))
        lobe = float(np.exp(rng.uniform(*np.log(distribution.lobe_mm))))
        lobe_share = float(rng.uniform(0.0, 1.0))
        self.parts = [_LatticeField(rng, shape, spacing_mm, head), _LatticeField(rng, shape, spacing_mm, lobe)]
        raw = [part.evaluate(sample_box)[brain_sample] for part in self.parts]
        stds = [max(float(values.std()), 1e-12) for values in raw]
        self.weights = [float(np.sqrt(1 - lobe_share)) / stds[0], float(np.sqrt(lobe_share)) / stds[1]]
        mixed = sum(w * values for w, values in zip(self.weights, raw))
        self.offset = float(mixed.mean())
        self.scale = 1.0 / max(float(np.abs(mixed - self.offset).max()), 1e-12)

    def evaluate(self, box) -> np.ndarray:
        mixed = sum(w * part.evaluate(box) for w, part in zip(self.weights, self.parts))
        return (mixed - self.offset) * self.scale


@dataclass(frozen=True)
class _Amplitudes:
    strength: float
    shared: float
    gains: np.ndarray


class BiasField:
    """One drawn field for ``channels`` channels of a volume of ``shape`` (D, H, W).

    ``brain_sample``: the brain mask sampled every ``sample_step`` voxels per axis
    (``mask[::step, ::step, ::step]``, see :func:`sample_box`); the unit fields are normalised on it.
    ``strength`` fixes ``s`` instead of drawing it (the stress test's levels); the rest of the field
    is drawn exactly as without it, so one seed gives one field shape at every strength.
    """

    def __init__(self, rng: np.random.Generator, shape, channels: int, brain_sample: np.ndarray,
                 distribution: ShadingDistribution = ShadingDistribution(), spacing_mm=(1.0, 1.0, 1.0),
                 strength: float | None = None, sample_step: int = SAMPLE_STEP):
        self.shape = tuple(int(s) for s in shape)
        box = sample_box(self.shape, sample_step)
        expected = tuple(len(range(*part.indices(size))) for part, size in zip(box, self.shape))
        if tuple(brain_sample.shape) != expected:
            raise ValueError(f"brain sample shape {brain_sample.shape} is not {expected}, the volume {self.shape} "
                             f"sampled every {sample_step} voxels")
        spacing = np.broadcast_to(np.asarray(spacing_mm, float), (3,))
        brain_sample = np.asarray(brain_sample) != 0
        if not brain_sample.any():
            brain_sample = np.ones(brain_sample.shape, bool)
        drawn = float(rng.uniform(*distribution.strength))
        shared = float(rng.uniform(*distribution.shared))
        gains = rng.uniform(*distribution.gain, channels)
        self.units = [_UnitField(rng, self.shape, spacing, distribution, brain_sample, box)
                      for _ in range(channels + 1)]
        self.amplitudes = _Amplitudes(drawn if strength is None else float(strength), shared, gains)

    @property
    def strength(self) -> float:
        return self.amplitudes.strength

    def log(self, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """``L_c`` on ``box`` (default: the whole volume): ``(channels, *box shape)`` float32."""
        box = box or tuple(slice(0, size) for size in self.shape)
        a = self.amplitudes
        if a.strength == 0:
            shape = [len(range(*part.indices(size))) for part, size in zip(box, self.shape)]
            return np.zeros((len(a.gains), *shape), np.float32)
        shared = self.units[0].evaluate(box)
        out = np.empty((len(a.gains), *shared.shape), np.float32)
        for channel, (gain, unit) in enumerate(zip(a.gains.tolist(), self.units[1:])):
            out[channel] = a.strength * (a.shared * gain * shared + (1 - a.shared) * unit.evaluate(box))
        return out

    def multiply(self, image: np.ndarray, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """``image`` ``(channels, *box shape)`` times the field on its nonzero voxels (zeros stay zero)."""
        field = np.exp(self.log(box))
        return np.where(image != 0, image * field, image).astype(image.dtype, copy=False)
