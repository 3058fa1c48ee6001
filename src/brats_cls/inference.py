"""Ensemble inference, one case at a time, as the paper's section 3.3 describes.

Per case: read, preprocess once (crop + z-score + pad), then for every model and every flip
combination over the three spatial axes: flip, forward, un-flip. Segmentation logits and slice logits
are averaged over flips and models *before* the sigmoid; threshold 0.5 for both. For each region, the
slices whose averaged slice probability is below 0.5 are erased from that region's mask (the paper's
classifier suppression). Then nesting is enforced (ET in TC in WT), labels are assembled, un-cropped
to the input grid and written atomically.

Decisions where the paper is silent:

* TTA uses all 8 flip combinations of the (D, H, W) axes (identity included), each weighted equally;
  every model weighted equally.
* Nesting is enforced after suppression, by intersection (see :func:`regions.enforce_nesting`).
* ``et_min_voxels`` (off by default): when the whole case holds fewer enhancing voxels than this,
  they become necrosis. BraTS scores a case without ET as Dice 1 only for an empty ET prediction,
  so a tiny spurious ET costs a full Dice point; top solutions tune such a threshold on
  cross-validation (~200 voxels).
* Memory: a volume larger than ``max_whole_voxels`` or a CUDA out-of-memory error switches to
  MONAI's Gaussian-weighted sliding windows (overlap 0.5); slice logits are then the plain mean over
  the windows that cover each slice. A further out-of-memory error halves the window (down to 16).
  Inputs above ``max_case_voxels`` (:data:`MAX_CASE_VOXELS`, 512**3) are refused from their header.
* Interrupted runs: a run starts by deleting our own ``.<ID>.nii.gz.<random>.tmp`` files that a
  killed run left in the output folder (:func:`io.remove_stale_temporaries`); one run per output folder.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cases import Case, CaseError, find_cases
from .io import Geometry, read_case, read_image, remove_stale_temporaries, write_label
from .preprocess import preprocess, uncrop, uncrop_slices
from .regions import REGIONS, enforce_nesting, et_label_of, regions_to_labels

log = logging.getLogger(__name__)

THRESHOLD = 0.5  # the paper's decision threshold, for segmentation and classification alike
SPATIAL_DIMS = (2, 3, 4)  # (D, H, W) in a (B, C, D, H, W) tensor
DEFAULT_WINDOW = (128, 128, 128)
DEFAULT_MAX_WHOLE_VOXELS = 160 * 192 * 160  # a cropped adult BraTS brain is ~140 x 175 x 140
MAX_CASE_VOXELS = 512 * 512 * 512  # larger inputs are refused: no BraTS scan comes near this


def flip_combinations(tta: bool) -> list[tuple[int, ...]]:
    """Flip sets as tensor dims: identity first, then the 7 non-empty subsets of (D, H, W)."""
    if not tta:
        return [()]
    return [combo for r in range(4) for combo in itertools.combinations(SPATIAL_DIMS, r)]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _forward_flips(model, volume: torch.Tensor, flips: list[tuple[int, ...]], precision: str, flip_batch: int = 1):
    """Sum of un-flipped seg logits ``(1, 3, D, H, W)`` and slice logits ``(1, 3, D)`` over ``flips``.

    ``flip_batch`` flipped copies go through the model as one batch (more memory; whether it pays is
    measured by ``brats-cls bench``). ``volume`` must then have batch size 1.
    """
    seg_sum = None
    slice_sum = None
    with _autocast(volume.device, precision):
        for first in range(0, len(flips), flip_batch):
            group = flips[first : first + flip_batch]
            inputs = [torch.flip(volume, dims) if dims else volume for dims in group]
            out = model(inputs[0] if len(inputs) == 1 else torch.cat(inputs))  # (len(group), 4, D, H, W)
            for index, dims in enumerate(group):
                seg = out["seg"][index : index + 1]
                slices = out["slices"][index : index + 1]
                if dims:  # un-flip in the network's own precision, before any float32 copy
                    seg = torch.flip(seg, dims)
                    if 2 in dims:  # a flip along D reverses the slice order too
                        slices = torch.flip(slices, (2,))
                if seg_sum is None:  # float32 running sums, added in place
                    seg_sum = seg.to(torch.float32, copy=True)
                    slice_sum = slices.to(torch.float32, copy=True)
                else:
                    seg_sum.add_(seg)
                    slice_sum.add_(slices)
    return seg_sum, slice_sum


def _forward_windows(model, volume, flips, precision, window):
    """Gaussian sliding-window version of :func:`_forward_flips` (MONAI), for large volumes."""
    from monai.inferers import sliding_window_inference

    depth = volume.shape[2]
    roi = tuple(min(w, s) for w, s in zip(window, volume.shape[2:]))
    slice_sum = torch.zeros((1, 3, depth), device=volume.device)
    slice_count = torch.zeros((depth,), device=volume.device)

    def predictor(patch, coords):
        seg, slices = _forward_flips(model, patch, flips, precision)
        for index, window_coords in enumerate(coords):
            d_range = window_coords[0] if len(window_coords) == 3 else window_coords[2]
            slice_sum[:, :, d_range] += slices[index : index + 1]
            slice_count[d_range] += len(flips)
        return seg

    seg_sum = sliding_window_inference(
        volume, roi, 1, predictor, overlap=0.5, mode="gaussian", with_coord=True
    )
    # seg_sum is a weighted mean of window sums over flips; slices: mean over windows, scaled to a sum.
    slice_mean = slice_sum / slice_count.clamp(min=1)
    return seg_sum, slice_mean * len(flips)


def _forward_windows_shrinking(model, volume, flips, precision, window):
    """:func:`_forward_windows`, halving the window (down to 16 per axis) on each out-of-memory error.

    A window as large as the volume costs as much memory as the whole volume, so a GPU that ran out
    of memory on the whole volume needs smaller windows, not just windows.
    """
    window = tuple(min(w, s) for w, s in zip(window, volume.shape[2:]))
    while True:
        try:
            return _forward_windows(model, volume, flips, precision, window)
        except torch.OutOfMemoryError:
            smaller = tuple(max(16, w // 2 // 16 * 16) for w in window)
            if smaller == window:
                raise
            log.warning("out of GPU memory with %s windows: retrying with %s", window, smaller)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            window = smaller


@dataclass
class CaseLogits:
    """Averaged logits of a case on the padded, cropped grid, and per-model WT masks for agreement."""

    seg: np.ndarray  # (3, d, h, w) float32
    slices: np.ndarray  # (3, d) float32
    model_whole_tumour: list[np.ndarray]
    windowed: bool


def predict_case_logits(
    models,
    volume: np.ndarray,
    flips=((),),
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    max_whole_voxels: int = DEFAULT_MAX_WHOLE_VOXELS,
    window=DEFAULT_WINDOW,
    flip_batch: int = 1,
) -> CaseLogits:
    """Average seg and slice logits of ``models`` over ``flips`` for one preprocessed volume.

    ``volume``: ``(4, d, h, w)`` float32, each spatial size a multiple of 16. Returns logits, not
    probabilities: the paper averages before the sigmoid. ``flip_batch``: flips per forward (whole
    volumes only; sliding windows take one flip at a time).
    """
    device = torch.device(device)
    flips = list(flips)
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None].to(device)
    windowed = int(np.prod(volume.shape[1:])) > max_whole_voxels
    if windowed:
        log.info("volume %s exceeds %d voxels: sliding-window inference", volume.shape[1:], max_whole_voxels)
    seg_total = None
    slice_total = None
    model_wt = []
    with torch.inference_mode():
        for model in models:
            if not windowed:
                try:
                    seg, slices = _forward_flips(model, tensor, flips, precision, flip_batch)
                except torch.OutOfMemoryError:
                    log.warning("out of GPU memory on a whole volume %s: sliding windows", volume.shape[1:])
                    torch.cuda.empty_cache()
                    windowed = True
            if windowed:
                seg, slices = _forward_windows_shrinking(model, tensor, flips, precision, window)
            model_wt.append((seg[0, 0] > 0).cpu().numpy())  # WT of this model alone (mean over flips > 0)
            if seg_total is None:
                seg_total, slice_total = seg, slices
            else:
                seg_total.add_(seg)
                slice_total.add_(slices)
    count = len(models) * len(flips)
    return CaseLogits(
        (seg_total[0] / count).cpu().numpy(),
        (slice_total[0] / count).cpu().numpy(),
        model_wt,
        windowed,
    )


@dataclass
class RegionDecision:
    """Binary regions after thresholding and suppression, with what suppression removed."""

    regions: np.ndarray  # (3, d, h, w) bool, nested
    voxels_before: dict[str, int]
    voxels_after: dict[str, int]
    slices_suppressed: dict[str, int]


def decide_regions(seg_logits: np.ndarray, slice_logits: np.ndarray, suppression: bool = True) -> RegionDecision:
    """Threshold averaged logits at probability 0.5 and apply the classifier suppression.

    ``seg_logits`` ``(3, d, h, w)``, ``slice_logits`` ``(3, d)``. A slice is negative for a region when
    its averaged slice probability is below 0.5 (logit < 0); its voxels are erased from that region.
    """
    regions = seg_logits > 0.0  # sigmoid(x) >= 0.5 <=> x >= 0; ties at exactly 0 count as negative
    before = {name: int(regions[i].sum()) for i, name in enumerate(REGIONS)}
    suppressed = {name: 0 for name in REGIONS}
    if suppression:
        negative = slice_logits < 0.0  # (3, d)
        for index, name in enumerate(REGIONS):
            holds = regions[index].reshape(regions.shape[1], -1).any(axis=1)
            suppressed[name] = int((negative[index] & holds).sum())
            regions[index][negative[index]] = False
    regions = enforce_nesting(regions)
    after = {name: int(regions[i].sum()) for i, name in enumerate(REGIONS)}
    return RegionDecision(regions, before, after, suppressed)


def relabel_small_enhancing(regions: np.ndarray, et_min_voxels: int) -> bool:
    """Below ``et_min_voxels`` enhancing voxels in the case, make them necrosis (TC keeps them)."""
    if et_min_voxels <= 0:
        return False
    count = int(regions[2].sum())
    if 0 < count < et_min_voxels:
        regions[2] = False
        return True
    return False


# --- the run -------------------------------------------------------------------------------------


@dataclass
class InferenceOptions:
    tta: bool = True
    cls_suppression: bool = True
    label_scheme: str = "auto"  # auto (from the case's naming), 2021 or 2023
    et_min_voxels: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    max_whole_voxels: int = DEFAULT_MAX_WHOLE_VOXELS
    max_case_voxels: int = MAX_CASE_VOXELS  # larger inputs are refused from their header
    flip_batch: int = 1  # flips per forward; see brats-cls bench for whether batching pays
    skip_existing: bool = False
    report_dir: Path | None = None


@dataclass
class RunSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def _existing_output_ok(path: Path, case: Case) -> bool:
    """A finished output is a readable uint8 NIfTI on the input's grid (checked before skipping)."""
    try:
        output = read_image(path, case.case_id)
        reference = read_image(case.modalities["flair"], case.case_id)
    except CaseError:
        return False
    return Geometry.of(output) == Geometry.of(reference) and output.GetPixelIDTypeAsString() == "8-bit unsigned integer"


class Predictor:
    """Owns the loaded ensemble; turns one case into a label map on the case's own grid."""

    def __init__(self, models, entries: list[dict], options: InferenceOptions):
        self.models = models
        self.entries = entries
        self.options = options
        self.device = next(models[0].parameters()).device
        precision = options.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.flips = flip_combinations(options.tta)

    def predict(self, case: Case) -> tuple[np.ndarray, Geometry, dict]:
        timings = {}
        start = time.perf_counter()
        images = read_case(case, self.options.max_case_voxels)
        timings["read"] = time.perf_counter() - start
        start = time.perf_counter()
        volume, box = preprocess(images.image)
        timings["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        logits = predict_case_logits(
            self.models, volume, self.flips, self.device, self.precision, self.options.max_whole_voxels,
            flip_batch=self.options.flip_batch,
        )
        timings["forward"] = time.perf_counter() - start
        start = time.perf_counter()
        decision = decide_regions(logits.seg, logits.slices, self.options.cls_suppression)
        relabelled = relabel_small_enhancing(decision.regions, self.options.et_min_voxels)
        timings["suppression"] = time.perf_counter() - start  # postprocess = suppression + un-crop
        scheme = case.scheme if self.options.label_scheme == "auto" else self.options.label_scheme
        labels = uncrop(regions_to_labels(decision.regions, scheme), box)
        timings["postprocess"] = time.perf_counter() - start
        ensemble_wt = decision.regions[0]
        agreement = {}
        for entry, wt in zip(self.entries, logits.model_whole_tumour):
            total = int(wt.sum()) + int(ensemble_wt.sum())
            agreement[entry.get("name", entry["file"])] = 1.0 if total == 0 else 2 * int((wt & ensemble_wt).sum()) / total
        report = {
            "case": case.case_id,
            "scheme": scheme,
            "et_label": et_label_of(scheme),
            "voxels_before_suppression": decision.voxels_before,
            "voxels_after_suppression": decision.voxels_after,
            "slices_suppressed": decision.slices_suppressed,
            "slice_probabilities": (1 / (1 + np.exp(-uncrop_slices(logits.slices, box, fill=-np.inf)))).round(4).tolist(),
            "et_relabelled_as_necrosis": relabelled,
            "model_wt_dice_vs_ensemble": agreement,
            "sliding_window": logits.windowed,
            "seconds": timings,
            "device": str(self.device),
            "precision": self.precision,
            "flips": len(self.flips),
            "models": len(self.models),
        }
        return labels, images.geometry, report


def run_inference(input_dir: Path, output_dir: Path, predictor: Predictor, progress: bool = True) -> RunSummary:
    """Write one ``<ID>.nii.gz`` per case; a failing case is reported and the run goes on."""
    from tqdm import tqdm

    started = time.perf_counter()
    remove_stale_temporaries(output_dir)  # what a killed run left: the folder must hold masks only
    discovery = find_cases(input_dir)
    summary = RunSummary()
    for error in discovery.errors:
        summary.failed[error.case_id] = str(error)
        log.error("%s", error)
    options = predictor.options
    bar = tqdm(discovery.cases, desc="cases", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        target = output_dir / case.output_name
        if options.skip_existing and target.exists() and _existing_output_ok(target, case):
            summary.skipped.append(case.case_id)
            continue
        try:
            labels, geometry, report = predictor.predict(case)
            start = time.perf_counter()
            try:
                write_label(labels, geometry, target)
            except OSError as error:  # disk full, read-only or vanished folder: nothing partial is left
                raise CaseError(case.case_id, f"cannot write the mask: {error.strerror or error}", target) from None
            report["seconds"]["write"] = time.perf_counter() - start
        except Exception as error:  # one bad case never stops the others
            message = str(error) if isinstance(error, CaseError) else f"case {case.case_id}: {type(error).__name__}: {error}"
            summary.failed[case.case_id] = message
            log.error("%s", message)
            tqdm.write(f"FAILED {message}")
            continue
        summary.written.append(case.case_id)
        if options.report_dir is not None:
            report_path = options.report_dir / f"{case.case_id}.json"
            tmp = report_path.with_suffix(".json.tmp")
            try:
                tmp.write_text(json.dumps(report, indent=1))
                os.replace(tmp, report_path)
            except OSError as error:  # the mask is written; a report is no reason to fail the case
                log.warning("case %s: report %s not written: %s", case.case_id, report_path, error)
                with contextlib.suppress(OSError):
                    tmp.unlink()
    summary.seconds = time.perf_counter() - started
    return summary
