"""One phantom case through the ensemble, stage by stage: the shipped path (the Predictor that
``brats-cls infer`` runs) against a naive one. Figures are returned as JSON-able dicts, never asserted.

* a phantom case (``synth.make_case``) is written as NIfTI files, so reading is timed on real files;
* ``shipped`` is :class:`~brats_cls.predictor.Predictor` plus ``write_label``, as ``brats-cls infer``
  runs them; its stages are timed through the Predictor's stage hook, and each model is wrapped so
  that every forward call (one per flip batch) is timed on its own: ``aggregation`` is the ``logits``
  stage less the model calls (flips, sums, copies back to the host);
* ``naive`` is the straightforward version: one flip per forward, float32, autograd enabled,
  preprocessing repeated per model; it may run on the first K models only, and is then
  extrapolated to N models (fixed stages once, per-model stages times N), and labelled so.

Variants of the shipped path (``precision``, ``flip_batch``, ``channels_last``, ``cudnn_benchmark``,
``coarse_logits``: off runs every network's full-resolution forward per flip) run one after another
on the same case and models; the first is the reference for the ratio.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cases import find_cases
from ..device import PRECISIONS, synchronize
from ..timing import StageTimer
from ..io import read_case, write_label
from ..models.registry import build_model
from ..predictor import Predictor, flip_combinations
from ..preprocess import preprocess, uncrop
from ..regions import regions_to_labels
from ..synth import BRATS_SHAPE, make_case, write_case
from .machine import PeakMemory

ARCHS = ("bifpn", "unetpp")
#: The stage keys of a case run, in pipeline order (``forward``: model calls only).
STAGES = ("read", "preprocess", "forward", "aggregation", "decide", "uncrop", "write")


class TimedModel(nn.Module):
    """Wraps a network; records the wall time of every forward call (synchronised on CUDA)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[float] = []

    @property
    def logit_factor(self) -> int | None:
        return getattr(self.model, "logit_factor", None)

    def _timed(self, forward, x):
        synchronize(x.device)
        start = time.perf_counter()
        out = forward(x)
        synchronize(x.device)
        self.calls.append(time.perf_counter() - start)
        return out

    def forward(self, x):
        return self._timed(self.model, x)

    def forward_coarse(self, x):
        return self._timed(self.model.forward_coarse, x)


def random_ensemble(size: str, count: int, device: torch.device) -> tuple[list[nn.Module], list[dict]]:
    """``count`` random-initialised models of preset ``size``, archs alternating (bifpn first), as
    the shipped ensemble alternates folds: names ``<arch>_fold<k>``."""
    models, entries = [], []
    for index in range(count):
        arch = ARCHS[index % 2]
        torch.manual_seed(index)
        models.append(build_model(arch, size).to(device).eval())
        name = f"{arch}_fold{index // 2}"
        entries.append({"name": name, "file": f"{name}.pt", "arch": arch, "fold": index // 2, "size": size})
    return models, entries


@dataclass
class Variant:
    """One configuration of the shipped path."""

    precision: str = "auto"
    flip_batch: int = 1
    channels_last: bool = False
    cudnn_benchmark: bool = False
    coarse_logits: bool = True

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """``"precision=bf16,flip_batch=4,channels_last=1,cudnn_benchmark=1,coarse_logits=0"`` (any subset)."""
        variant = cls()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or not value:
                raise ValueError(f"bad variant item {item!r}; keys: {', '.join(cls.__dataclass_fields__)}")
            if key == "precision":
                if value not in PRECISIONS:
                    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
                variant.precision = value
            elif key == "flip_batch":
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"flip_batch must be a positive integer, got {value!r}")
                variant.flip_batch = int(value)
            else:
                setattr(variant, key, value.lower() in ("1", "true", "yes", "on"))
        return variant

    @property
    def label(self) -> str:
        parts = [self.precision, f"flips/fwd {self.flip_batch}"]
        parts += ["channels_last_3d"] * self.channels_last + ["cudnn.benchmark"] * self.cudnn_benchmark
        parts += ["full-resolution logits per flip"] * (not self.coarse_logits)
        return ", ".join(parts)


@dataclass
class BenchConfig:
    size: str = "demo"
    device: str = "auto"
    models: int = 10
    weights_dir: Path | None = None
    tta: bool = True
    shape: tuple[int, int, int] = BRATS_SHAPE
    variants: list[Variant] = field(default_factory=lambda: [Variant()])
    naive_models: int | None = None  # None: all; 0: no naive run
    warmup: bool = True
    peak_seconds: float = 0.5
    training: bool = False
    training_steps: int = 4
    training_workers: tuple[int, ...] = (0,)
    training_variants: list[Variant] = field(default_factory=lambda: [Variant()])
    cache_dir: Path | None = None
    seed: int = 0
    engines: list = field(default_factory=list)  # EngineSpec rows of the engines phase (none: no phase)
    engine_cache: Path | None = None  # None: an empty cache folder per engine


def phantom_case(folder: Path, shape, seed: int):
    write_case(make_case(seed, 0, healthy=False, shape=shape), folder, naming="2023")
    return find_cases(folder).cases[0]


def _apply_layout(models, channels_last: bool) -> None:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    for model in models:
        model.to(memory_format=fmt)


def _warm_up(predictor: Predictor, case, entries) -> None:
    """One forward per architecture: kernel selection, allocator, cudnn autotuning."""
    volume, _ = preprocess(read_case(case).image)
    tensor = torch.from_numpy(volume)[None].to(predictor.device)
    mirrors = predictor.mirrors(tensor)[: predictor.flip_batch]
    seen = set()
    for model, entry in zip(predictor.models, entries):
        if entry["arch"] not in seen:
            seen.add(entry["arch"])
            predictor.mirrored(model, mirrors)
    for model in predictor.models:
        model.calls.clear()


def timed_case(predictor: Predictor, case, out_dir: Path):
    """One case through ``predictor`` and ``write_label`` (the work ``infer`` does per case), timed from
    the first read to the written mask with the device synchronised at both ends; returns
    ``(prediction, stage timer, seconds, peak memory)``."""
    timer = StageTimer()
    with PeakMemory(predictor.device) as memory:
        synchronize(predictor.device)
        start = time.perf_counter()
        prediction = predictor.predict(case, stage=timer)
        with timer("write"):
            write_label(prediction.labels, prediction.geometry, out_dir / case.output_name)
        synchronize(predictor.device)
        seconds = time.perf_counter() - start
    return prediction, timer, seconds, memory


def run_shipped(case, models, entries, variant: Variant, tta: bool, out_dir: Path, warmup: bool) -> dict:
    """One case through :class:`Predictor` + ``write_label``, with per-call forward times and peaks."""
    device = next(models[0].parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    _apply_layout(models, variant.channels_last)
    timed = [TimedModel(model) for model in models]
    predictor = Predictor(timed, tta=tta, precision=variant.precision, flip_batch=variant.flip_batch,
                          coarse_logits=variant.coarse_logits)
    if warmup:
        _warm_up(predictor, case, entries)
    prediction, timer, total, memory = timed_case(predictor, case, out_dir)
    model_calls = sum(sum(model.calls) for model in timed)
    stages = {name: timer.seconds[name] for name in ("read", "preprocess", "decide", "uncrop", "write")}
    stages.update(forward=model_calls, aggregation=timer.seconds["logits"] - model_calls)
    return {
        "variant": asdict(variant), "label": variant.label, "precision": predictor.precision,
        "seconds_total": total, "stages": {name: stages[name] for name in STAGES},
        "non_forward_fraction": (total - model_calls) / total,
        "forward_calls": [{"name": entry["name"], "arch": entry["arch"], "seconds": list(model.calls)}
                          for entry, model in zip(entries, timed)],
        "sliding_window": prediction.logits.windowed, "labels": prediction.labels, **memory.to_dict(),
    }


def _naive_logits(models, images, flips, device, stages, per_model):
    """Per model: preprocess again; per flip: one float32 forward with autograd on, un-flipped and summed."""
    seg_total = slice_total = box = None
    for model in models:
        mark = time.perf_counter()
        volume, box = preprocess(images.image)
        tensor = torch.from_numpy(volume)[None].to(device)
        stages["preprocess"] += time.perf_counter() - mark
        calls = []
        for dims in flips:
            mark = time.perf_counter()
            out = model(torch.flip(tensor, dims) if dims else tensor)
            synchronize(device)
            calls.append(time.perf_counter() - mark)
            mark = time.perf_counter()
            seg, slices = out["seg"].detach(), out["slices"].detach()
            if dims:
                seg = torch.flip(seg, dims)
                slices = torch.flip(slices, (2,)) if 2 in dims else slices
            seg_total = seg if seg_total is None else seg_total + seg
            slice_total = slices if slice_total is None else slice_total + slices
            del out
            synchronize(device)
            stages["aggregation"] += time.perf_counter() - mark
        per_model.append(calls)
        stages["forward"] += sum(calls)
    count = len(models) * len(flips)
    return (seg_total[0] / count).cpu().numpy(), (slice_total[0] / count).cpu().numpy(), box


def run_naive(case, models, entries, tta: bool, out_dir: Path) -> dict:
    """The straightforward path, then the same decision, un-crop and write as the shipped path."""
    device = next(models[0].parameters()).device
    torch.backends.cudnn.benchmark = False
    _apply_layout(models, False)
    stages = dict.fromkeys(STAGES, 0.0)
    per_model: list[list[float]] = []
    decider = Predictor(models, precision="fp32")
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        images = read_case(case)
        stages["read"] = time.perf_counter() - start
        seg, slices, box = _naive_logits(models, images, flip_combinations(tta), device, stages, per_model)
        mark = time.perf_counter()
        decision = decider.decide(seg, slices)
        stages["decide"] = time.perf_counter() - mark
        mark = time.perf_counter()
        labels = uncrop(regions_to_labels(decision.regions, case.scheme), box)
        stages["uncrop"] = time.perf_counter() - mark
        mark = time.perf_counter()
        write_label(labels, images.geometry, out_dir / f"naive_{case.output_name}")
        stages["write"] = time.perf_counter() - mark
    total = sum(stages.values())
    return {
        "seconds_total": total, "stages": stages, "non_forward_fraction": (total - stages["forward"]) / total,
        "forward_calls": [{"name": entry["name"], "arch": entry["arch"], "seconds": calls}
                          for entry, calls in zip(entries, per_model)],
        "labels": labels, **memory.to_dict(),
    }


def extrapolate_naive(naive: dict, shipped: dict, measured_models: int) -> float:
    """Naive case seconds for all the shipped run's models, from a naive run on its first
    ``measured_models``: read, decide, un-crop and write count once; preprocess and aggregation
    scale with the number of models; forward scales as the shipped path's forward time of all models
    over that of the measured ones (so a slower architecture left out is weighted as it should be)."""
    stages = naive["stages"]
    calls = [sum(call["seconds"]) for call in shipped["forward_calls"]]
    total_models = len(calls)
    per_model = (stages["preprocess"] + stages["aggregation"]) * total_models / measured_models
    forward = stages["forward"] * sum(calls) / sum(calls[:measured_models])
    fixed = naive["seconds_total"] - stages["preprocess"] - stages["aggregation"] - stages["forward"]
    return fixed + per_model + forward


def agreement(labels: np.ndarray, reference: np.ndarray) -> float:
    """Share of voxels labelled alike."""
    return float((labels == reference).mean())
