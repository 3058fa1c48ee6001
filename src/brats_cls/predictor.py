"""Volume -> regions: the :class:`Predictor`, which owns the loaded networks and every setting that must
agree across the steps of the paper's section 3.3 (in the manner of nnU-Net v2's predictor).

Layers, each a method that returns the *mean* of what it averaged, logits before any sigmoid:

1. :meth:`Predictor.mirrored`: one network, every flip of the (D, H, W) axes, each output un-flipped
   (a flip of D also reverses the order of the slice logits), summed on the network's coarse logit
   grid where it has one (:mod:`brats_cls.logit_grid`) and up-sampled once;
2. :meth:`Predictor.model_logits`: one network on the whole volume, or, for a volume too large for
   memory, on Gaussian-weighted sliding windows (MONAI);
3. :meth:`Predictor.ensemble`: every network, weighted by ``weights`` (equal by default);
4. :meth:`Predictor.decide`: the one place where the threshold is applied, to voxels and slices alike,
   then the classifier suppression and the nesting of regions.

:meth:`Predictor.predict` runs a case through all of them: read, preprocess once (crop + z-score +
pad), the ensemble, decide, the optional small-ET rule, labels, un-crop; before preprocessing, a file
stored in another axis layout is brought to the BraTS one (:mod:`brats_cls.orientation`) and an
unmasked background is cleared (:func:`brats_cls.preprocess.clear_background`), and the labels go back
to the file's own layout.

Decisions where the paper is silent:

* **Threshold**: probability 0.5 (:data:`THRESHOLD`) for segmentation and classification alike. A
  probability of exactly 0.5 (logit 0) counts as positive, for a voxel and for a slice (:func:`positive`).
* **TTA** uses all 8 flip combinations of the (D, H, W) axes (identity included), each weighted equally.
* **Ensemble weights**: equal unless given (``weights``, one per network, normalised to sum 1).
* Nesting is enforced after suppression, by intersection (see :func:`regions.enforce_nesting`).
* ``et_min_voxels`` (off by default): when the whole case holds fewer enhancing voxels than this,
  they become necrosis. BraTS scores a case without ET as Dice 1 only for an empty ET prediction,
  so a tiny spurious ET costs a full Dice point; top solutions tune such a threshold on
  cross-validation (~200 voxels).
* **Memory**: a volume larger than ``max_whole_voxels`` or a CUDA out-of-memory error switches to
  MONAI's Gaussian-weighted sliding windows (overlap 0.5); slice logits are then the plain mean over
  the windows that cover each slice. A further out-of-memory error halves the window (down to 16).
  Inputs above ``max_case_voxels`` (:data:`MAX_CASE_VOXELS`, 512**3) are refused from their header.
  The default cap (:data:`DEFAULT_MAX_WHOLE_VOXELS`, 176 x 224 x 176) holds every cropped BraTS-size
  brain whole, since windows just above a cap cost about four times the whole volume (evidence:
  docs/design.md#whole-volume-cap).
* **Spacing**: a case is segmented on its own voxel grid, never resampled: BraTS (and the phantoms the
  shipped models learned from) are 1 mm isotropic, and the networks see voxels. A case whose spacing
  differs from 1 mm by more than :data:`SPACING_WARNING` on some axis is segmented all the same, with
  a warning naming the case and its spacing.
* **Speed**: the flipped copies of the input are made once per case and shared by every network;
  outputs are un-flipped in the network's own precision and summed into float32 in place. A network
  whose segmentation logits end in one trilinear up-sampling (``logit_factor``: both shipped
  networks) is run without it (``forward_coarse``): its flips, and the networks of one factor, are
  summed on the coarse grid and up-sampled once per case (:mod:`brats_cls.logit_grid`: the same
  logits up to float rounding, a full-resolution up-sampling, copy and sum fewer per flip).
* **Engine** (:mod:`brats_cls.engines`): what runs each network's forward. ``eager`` (PyTorch, the
  network itself) by default; ``eager-cl``, ``compile``, ``onnxruntime`` or ``openvino`` by name, or
  ``auto`` (:func:`brats_cls.engines.choose_engine`, the default of ``brats-cls infer``). Every
  layer above sees the same ``(seg, slices)`` logits whichever engine made them; a precision the
  engine lacks falls back to float32 under ``auto`` and is refused when named.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .cases import Case
from .device import inference_context
from .engines import DEFAULT_ENGINE, Engine, Runner, choose_engine, get_engine
from .io import CaseImages, Geometry, read_case
from .logit_grid import add_flip, halo_shape, upsample
from .orientation import CANONICAL, Orientation, orientation_of
from .preprocess import CropBox, clear_background, preprocess, uncrop
from .regions import REGIONS, enforce_nesting, regions_to_labels

log = logging.getLogger(__name__)

#: The paper's decision threshold, for segmentation and classification alike (a probability).
THRESHOLD = 0.5
#: The same threshold as a logit: sigmoid(x) >= THRESHOLD <=> x >= LOGIT_THRESHOLD (0.0).
LOGIT_THRESHOLD = math.log(THRESHOLD / (1.0 - THRESHOLD))
SPATIAL_DIMS = (2, 3, 4)  # (D, H, W) in a (B, C, D, H, W) tensor
DEFAULT_WINDOW = (128, 128, 128)
# a 240 x 240 x 155 case cropped to its brain and padded to multiples of 16 (phantoms of other
# geometries reach 160 x 208 x 176); above this, sliding windows (see the Memory bullet above)
DEFAULT_MAX_WHOLE_VOXELS = 176 * 224 * 176
MAX_CASE_VOXELS = 512 * 512 * 512  # larger inputs are refused: no BraTS scan comes near this
SPACING_WARNING = 0.25  # relative difference from 1 mm that earns a warning (module docstring)


def positive(logits: np.ndarray) -> np.ndarray:
    """Where averaged logits say "present": probability >= :data:`THRESHOLD`, ties included."""
    return logits >= LOGIT_THRESHOLD


def flip_combinations(tta: bool) -> list[tuple[int, ...]]:
    """Flip sets as tensor dims: identity first, then the 7 non-empty subsets of (D, H, W)."""
    if not tta:
        return [()]
    return [combo for r in range(4) for combo in itertools.combinations(SPATIAL_DIMS, r)]


@dataclass
class Logits:
    """Mean logits of a network, float32: ``slices (1, 3, D)``, and ``seg`` on the input grid
    ``(1, 3, D, H, W)`` (``factor`` None) or on the halo grid of a coarse logit grid ``factor`` times
    coarser (:mod:`brats_cls.logit_grid`; :meth:`full` brings it to the input grid of ``size``)."""

    seg: torch.Tensor
    slices: torch.Tensor
    windowed: bool = False
    factor: int | None = None
    size: tuple[int, int, int] | None = None

    def full(self, channels: int | None = None) -> torch.Tensor:
        """``seg`` (its first ``channels``, None: all) on the input grid ``(1, C, D, H, W)``."""
        seg = self.seg if channels is None else self.seg[:, :channels]
        return seg if self.factor is None else upsample(seg, self.factor, self.size)


@dataclass
class EnsembleLogits:
    """The ensemble's mean logits of one case on the padded, cropped grid, as numpy arrays."""

    seg: np.ndarray  # (3, d, h, w) float32
    slices: np.ndarray  # (3, d) float32
    model_whole_tumour: list[np.ndarray]  # per network: its own WT mask (its mean over flips >= threshold)
    windowed: bool


@dataclass
class Decision:
    """Binary regions after thresholding and suppression, with what suppression removed."""

    regions: np.ndarray  # (3, d, h, w) bool, nested
    voxels_before: dict[str, int]
    voxels_after: dict[str, int]
    slices_suppressed: dict[str, int]
    suppressed: np.ndarray  # (3, d) bool: slices whose voxels suppression erased


@dataclass
class Prediction:
    """What :meth:`Predictor.predict` makes of a case: the label map on the case's grid and every
    intermediate a report or a picture needs."""

    case: Case
    images: CaseImages
    scheme: str
    box: CropBox
    logits: EnsembleLogits
    decision: Decision
    et_relabelled: bool
    labels: np.ndarray  # (D, H, W) uint8 on the case's grid
    orientation: Orientation  # the file's layout -> the BraTS layout the networks saw
    background_cleared: bool

    @property
    def geometry(self) -> Geometry:
        return self.images.geometry


def add_unflipped(total: torch.Tensor, logits: torch.Tensor, dims: tuple[int, ...]) -> None:
    """``total += flip(logits, dims)`` into the float32 ``total``, without an un-flipped copy.

    torch has no negative strides, so ``torch.flip`` writes a whole new tensor before the sum reads
    it again; on the CPU numpy adds through a reversed view in one pass instead, which makes the
    un-flipping of every network's every flip a small part of a case (``BENCHMARKS.md``, issue #24).
    Other devices keep ``torch.flip``.
    """
    if total.device.type != "cpu":
        total.add_(torch.flip(logits, dims) if dims else logits)
        return
    source = logits.to(torch.float32).numpy()
    target = total.numpy()
    np.add(target, np.flip(source, dims) if dims else source, out=target)


def relabel_small_enhancing(regions: np.ndarray, et_min_voxels: int) -> bool:
    """Below ``et_min_voxels`` enhancing voxels in the case, make them necrosis (TC keeps them)."""
    if et_min_voxels <= 0:
        return False
    count = int(regions[2].sum())
    if 0 < count < et_min_voxels:
        regions[2] = False
        return True
    return False


class Predictor:
    """Owns the loaded ensemble and the settings every layer shares (module docstring).

    Args:
        models: networks in eval mode, all on one device.
        tta: the 8 flips (True) or the identity only.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (:mod:`brats_cls.device`).
        suppression: erase the slices that the classifier calls negative (the paper's method).
        label_scheme: ``auto`` (the case's naming), ``2021`` or ``2023``.
        et_min_voxels: the small-ET rule, 0 for off.
        weights: one non-negative weight per network (None: equal).
        window, max_whole_voxels, max_case_voxels, flip_batch: memory and speed settings.
        engine: an engine name (:data:`brats_cls.engines.ENGINE_CHOICES`, ``auto`` included) or an
            :class:`~brats_cls.engines.Engine`.
        engine_cache: the folder of exported graphs (None: :func:`brats_cls.engines.default_cache_dir`).
        coarse_logits: sum flips on each network's coarse logit grid where it has one (module
            docstring: Speed); False runs every network's full ``forward`` per flip (the reference
            the coarse sums are checked against).
    """

    def __init__(self, models, *, tta: bool = True, precision: str = "auto", suppression: bool = True,
                 label_scheme: str = "auto", et_min_voxels: int = 0, weights=None,
                 window=DEFAULT_WINDOW, max_whole_voxels: int = DEFAULT_MAX_WHOLE_VOXELS,
                 max_case_voxels: int = MAX_CASE_VOXELS, flip_batch: int = 1,
                 engine: str | Engine = DEFAULT_ENGINE, engine_cache=None, coarse_logits: bool = True):
        if not models:
            raise ValueError("a Predictor needs at least one network")
        self.models = list(models)
        self.device = next(self.models[0].parameters()).device
        if not isinstance(engine, Engine):
            engine = get_engine(choose_engine(engine, self.device, precision), self.device, engine_cache)
        self.engine = engine
        self.precision = self.engine.resolve_precision(precision)
        self._runners: dict[int, tuple[object, Runner]] = {}
        self.flips = flip_combinations(tta)
        self.weights = _normalised(weights, len(self.models))
        self.suppression, self.label_scheme, self.et_min_voxels = suppression, label_scheme, et_min_voxels
        self.window, self.flip_batch = tuple(window), flip_batch
        self.max_whole_voxels, self.max_case_voxels = max_whole_voxels, max_case_voxels
        self.coarse_logits = coarse_logits

    # --- layer 1: one network, every flip ------------------------------------------------------

    def runner(self, model, coarse: bool = False) -> Runner:
        """The engine's runner of ``model`` (of its ``forward_coarse`` when ``coarse``), made on first
        use, then kept with the model."""
        entry = self._runners.get((id(model), coarse))
        if entry is None or entry[0] is not model:
            entry = self._runners[id(model), coarse] = (model, self.engine.prepare(model, self.precision, coarse))
        return entry[1]

    def mirrors(self, volume: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """``(flip dims, flipped volume)`` for every flip; made once and shared by the networks."""
        return [(dims, torch.flip(volume, dims) if dims else volume) for dims in self.flips]

    def mirrored(self, model, mirrors) -> Logits:
        """Mean over ``mirrors`` of one network's un-flipped logits, in float32; on its coarse logit
        grid's halo grid where it has one (module docstring: Speed)."""
        factor = getattr(model, "logit_factor", None) if self.coarse_logits else None
        size = tuple(mirrors[0][1].shape[2:])
        seg_sum = slice_sum = None
        run = self.runner(model, coarse=factor is not None)
        with inference_context(self.device, self.precision):
            for first in range(0, len(mirrors), self.flip_batch):
                group = mirrors[first : first + self.flip_batch]
                batch = group[0][1] if len(group) == 1 else torch.cat([volume for _, volume in group])
                seg_batch, slice_batch = run(batch)  # (len(group), 3, *grid) and (len(group), 3, D)
                for index, (dims, _) in enumerate(group):
                    if seg_sum is None:  # float32 running sums, added in place
                        grid = seg_batch.shape[2:] if factor is None else halo_shape(size, factor)
                        seg_sum = seg_batch.new_zeros((1, seg_batch.shape[1], *grid), dtype=torch.float32)
                        slice_sum = slice_batch.new_zeros((1, *slice_batch.shape[1:]), dtype=torch.float32)
                    if factor is None:
                        add_unflipped(seg_sum, seg_batch[index : index + 1], dims)
                    else:
                        add_flip(seg_sum, seg_batch[index : index + 1], dims, factor, size)
                    # a flip along D reverses the slice order too
                    add_unflipped(slice_sum, slice_batch[index : index + 1], (2,) if 2 in dims else ())
            run.release()  # an engine's buffers between networks (brats_cls.engines: Memory)
            return Logits(seg_sum.div_(len(mirrors)), slice_sum.div_(len(mirrors)), factor=factor, size=size)

    # --- layer 2: one network, whole volume or sliding windows ----------------------------------

    def model_logits(self, model, volume: torch.Tensor, mirrors=None) -> Logits:
        """One network's mean logits on ``volume`` ``(1, 4, D, H, W)``: whole, or windowed when the
        volume exceeds ``max_whole_voxels`` or the device runs out of memory."""
        if int(np.prod(volume.shape[2:])) <= self.max_whole_voxels:
            try:
                return self.mirrored(model, mirrors if mirrors is not None else self.mirrors(volume))
            except torch.OutOfMemoryError:
                log.warning("out of GPU memory on a whole volume %s: sliding windows", tuple(volume.shape[2:]))
                torch.cuda.empty_cache()
        return self._windowed_shrinking(model, volume)

    def _windowed(self, model, volume: torch.Tensor, window) -> Logits:
        """Gaussian-weighted sliding windows (MONAI, overlap 0.5); slice logits: mean over the
        windows covering each slice."""
        from monai.inferers import sliding_window_inference

        depth = volume.shape[2]
        slice_sum = torch.zeros((1, 3, depth), device=volume.device)
        slice_count = torch.zeros((depth,), device=volume.device)

        def predict_patch(patch, coords):
            logits = self.mirrored(model, self.mirrors(patch))
            for index, window_coords in enumerate(coords):
                d_range = window_coords[0] if len(window_coords) == 3 else window_coords[2]
                slice_sum[:, :, d_range] += logits.slices[index : index + 1]
                slice_count[d_range] += 1
            return logits.full()

        seg = sliding_window_inference(volume, window, 1, predict_patch, overlap=0.5, mode="gaussian",
                                       with_coord=True)
        return Logits(seg, slice_sum / slice_count.clamp(min=1), windowed=True)

    def _windowed_shrinking(self, model, volume: torch.Tensor) -> Logits:
        """:meth:`_windowed`, halving the window (down to 16 per axis) on each out-of-memory error.

        A window as large as the volume costs as much memory as the whole volume, so a GPU that ran
        out of memory on the whole volume needs smaller windows, not just windows.
        """
        log.info("volume %s: sliding-window inference", tuple(volume.shape[2:]))
        window = tuple(min(w, s) for w, s in zip(self.window, volume.shape[2:]))
        while True:
            try:
                return self._windowed(model, volume, window)
            except torch.OutOfMemoryError:
                smaller = tuple(max(16, w // 2 // 16 * 16) for w in window)
                if smaller == window:
                    raise
                log.warning("out of GPU memory with %s windows: retrying with %s", window, smaller)
                torch.cuda.empty_cache()
                window = smaller

    # --- layer 3: the ensemble -----------------------------------------------------------------

    def ensemble(self, volume: np.ndarray) -> EnsembleLogits:
        """Weighted mean of every network's logits for one preprocessed ``(4, d, h, w)`` volume
        (each spatial size a multiple of 16). Logits, not probabilities: the paper averages before
        the sigmoid."""
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None].to(self.device)
            mirrors = self.mirrors(tensor) if int(np.prod(volume.shape[1:])) <= self.max_whole_voxels else None
            # weighted sums, of the segmentation logits per grid (networks of one logit factor share
            # a halo grid; windowed or factor-less ones are on the input grid)
            seg_totals: dict[int | None, Logits] = {}
            slice_total = None
            model_wt = []
            windowed = False
            # Equal weights: a sum divided once by the count (so one network's logits pass unchanged).
            weights = self.weights or [1.0] * len(self.models)
            for model, weight in zip(self.models, weights):
                logits = self.model_logits(model, tensor, mirrors)
                windowed |= logits.windowed
                model_wt.append(positive(logits.full(channels=1)[0, 0]).cpu().numpy())
                total = seg_totals.get(logits.factor)
                if total is None:  # the first network of a grid holds that grid's sum
                    logits.seg.mul_(weight)
                    seg_totals[logits.factor] = logits
                else:
                    total.seg.add_(logits.seg, alpha=weight)
                if slice_total is None:
                    slice_total = logits.slices.mul_(weight)
                else:
                    slice_total.add_(logits.slices, alpha=weight)
            seg_total = None
            for total in seg_totals.values():
                full = total.full()
                seg_total = full if seg_total is None else seg_total.add_(full)
            if self.weights is None:
                seg_total.div_(len(self.models))
                slice_total.div_(len(self.models))
        return EnsembleLogits(seg_total[0].cpu().numpy(), slice_total[0].cpu().numpy(), model_wt, windowed)

    # --- layer 4: the decision -----------------------------------------------------------------

    def decide(self, seg_logits: np.ndarray, slice_logits: np.ndarray) -> Decision:
        """Threshold averaged logits (:func:`positive`) and apply the classifier suppression.

        ``seg_logits`` ``(3, d, h, w)``, ``slice_logits`` ``(3, d)``. With suppression, a slice the
        classifier calls negative for a region loses that region's voxels. Then nesting.
        """
        regions = positive(seg_logits)
        before = {name: int(regions[i].sum()) for i, name in enumerate(REGIONS)}
        holds = regions.reshape(regions.shape[0], regions.shape[1], -1).any(axis=2)  # (3, d)
        negative = ~positive(slice_logits) if self.suppression else np.zeros_like(holds)
        suppressed = negative & holds
        for index in range(len(REGIONS)):
            regions[index][negative[index]] = False
        regions = enforce_nesting(regions)
        after = {name: int(regions[i].sum()) for i, name in enumerate(REGIONS)}
        counts = {name: int(suppressed[i].sum()) for i, name in enumerate(REGIONS)}
        return Decision(regions, before, after, counts, suppressed)

    # --- a case --------------------------------------------------------------------------------

    def predict(self, case: Case, stage=None) -> Prediction:
        """One case through every layer. ``stage(name)``, when given, is a context manager wrapped
        around each step (``read``, ``preprocess``, ``logits``, ``decide``, ``uncrop``): how
        ``brats-cls bench`` and the report time them."""
        stage = stage or (lambda name: contextlib.nullcontext())
        with stage("read"):
            images = read_case(case, self.max_case_voxels)
        with stage("preprocess"):
            orientation = orientation_of(images.geometry)
            image, cleared = clear_background(orientation.to_canonical(images.image))
            if cleared:
                log.warning("case %s: the background is not zero: voxels outside an estimated foreground set to 0",
                            case.case_id)
            if any(abs(spacing - 1.0) > SPACING_WARNING for spacing in images.geometry.spacing):
                log.warning("case %s: voxel spacing %s mm; the networks learned from 1 mm voxels",
                            case.case_id, tuple(round(s, 3) for s in images.geometry.spacing))
            if not orientation.is_canonical:
                log.info("case %s: axes stored as %s, segmented in the BraTS layout %s", case.case_id,
                         orientation.code, CANONICAL)
            volume, box = preprocess(image)
        with stage("logits"):
            logits = self.ensemble(volume)
        with stage("decide"):
            decision = self.decide(logits.seg, logits.slices)
            relabelled = relabel_small_enhancing(decision.regions, self.et_min_voxels)
        with stage("uncrop"):
            scheme = case.scheme if self.label_scheme == "auto" else self.label_scheme
            labels = orientation.from_canonical(uncrop(regions_to_labels(decision.regions, scheme), box))
        return Prediction(case, images, scheme, box, logits, decision, relabelled, labels, orientation, cleared)


def _normalised(weights, count: int) -> list[float] | None:
    """``count`` ensemble weights summing to 1; None (equal weights) when ``weights`` is None."""
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != count or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"ensemble weights {weights} must be {count} non-negative numbers with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]
