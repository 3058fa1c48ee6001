"""Benchmarks: one phantom case through the ensemble, stage by stage, against a naive path; training
throughput; the model presets' forward time. Figures are printed and written as JSON, never asserted.

A case run (:func:`bench_case`):

* a phantom case (``synth.make_case``) is written as NIfTI files, so reading is timed on real files;
* ``shipped`` is :class:`inference.Predictor` (preprocessing once, ``torch.inference_mode``, all
  models and flips, bf16 autocast on CUDA) plus ``write_label``, as ``brats-cls infer`` runs it;
  each model is wrapped so that every forward call (one per flip batch) is timed on its own;
* ``naive`` is the straightforward version: one flip per forward, float32, autograd enabled,
  preprocessing repeated per model; it may run on the first K models only, and is then
  extrapolated to N models (fixed stages once, per-model stages times N), and labelled so;
* FLOPs per forward are counted with ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device
  copy of each model at the case's padded shape (no compute; 2 FLOPs per multiply-add);
* the peak is measured on the same device: the best of a large matmul and a large conv3d, in
  float32 and bfloat16, so achieved GFLOP/s can be read as a fraction of it;
* peak resident memory per phase: Linux's ``VmHWM`` reset through ``/proc/self/clear_refs``, else
  ``getrusage`` (a lifetime peak); peak GPU memory: ``torch.cuda.max_memory_allocated``.

Variants of the shipped path (``precision``, ``flip_batch``, ``channels_last``, ``cudnn_benchmark``)
run one after another on the same case and models; the first is the reference for the ratio.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from .cases import find_cases
from .inference import (
    InferenceOptions,
    Predictor,
    decide_regions,
    flip_combinations,
    resolve_device,
)
from .io import read_case, write_label
from .models.registry import build_model
from .preprocess import preprocess, uncrop
from .regions import regions_to_labels
from .synth import BRATS_SHAPE, make_case, write_case
from .weights import WeightsError

ARCHS = ("bifpn", "unetpp")
#: The stage keys of a case run, in pipeline order (``forward``: model calls only).
STAGES = ("read", "preprocess", "forward", "aggregation", "suppression", "uncrop", "write")
QUICK_SHAPE = (48, 64, 64)


# --- machine and memory --------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, load average, torch version and threads, GPU name: what a figure needs beside it."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it; ``unknown`` outside git."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


class PeakMemory:
    """Peak resident memory (bytes) and peak GPU memory of the code run inside ``with``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_bytes = 0
        self.rss_method = ""
        self.gpu_allocated_bytes = None
        self.gpu_reserved_bytes = None

    def __enter__(self):
        self._reset = _reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_allocated_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.gpu_reserved_bytes = int(torch.cuda.max_memory_reserved(self.device))
        hwm = _vm_hwm_bytes()
        if self._reset and hwm:
            self.rss_bytes, self.rss_method = hwm, "VmHWM (reset per phase)"
        else:  # ru_maxrss: kilobytes on Linux, bytes on macOS; a lifetime peak
            scale = 1 if sys.platform == "darwin" else 1024
            self.rss_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
            self.rss_method = "getrusage ru_maxrss (process lifetime)"
        return False

    def to_dict(self) -> dict:
        return {"peak_rss_bytes": self.rss_bytes, "peak_rss_method": self.rss_method,
                "peak_gpu_allocated_bytes": self.gpu_allocated_bytes,
                "peak_gpu_reserved_bytes": self.gpu_reserved_bytes}


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- FLOPs and peak ------------------------------------------------------------------------------


def forward_flops(model: nn.Module, shape: tuple[int, int, int], batch: int = 1) -> int:
    """FLOPs of one forward of ``model`` on ``(batch, 4, *shape)``, counted on a meta-device copy."""
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(model.config)
    meta = build_model(config.pop("arch"), config, device="meta").eval()
    x = torch.empty((batch, 4, *shape), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x)
    return int(counter.get_total_flops())


def measure_peak(device: torch.device, seconds: float = 0.5) -> dict:
    """Achieved GFLOP/s of a large matmul and a large conv3d, float32 and bfloat16, on ``device``.

    Sizes are big enough to reach the kernels' best throughput yet run in ``seconds`` each; the
    best of them is this device's measured peak (a floor for the hardware's true peak).
    """
    big = device.type == "cuda"
    n = 8192 if big else 1024
    conv_shape = (1, 64, 64, 128, 128) if big else (1, 32, 32, 64, 64)
    results = {}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        results[f"matmul_{label}_gflops"] = _throughput(lambda: a @ b, 2 * n**3, device, seconds)
        x = torch.randn(conv_shape, device=device, dtype=dtype)
        conv = nn.Conv3d(conv_shape[1], conv_shape[1], 3, padding=1, bias=False).to(device, dtype)
        flops = 2 * conv_shape[1] ** 2 * 27 * int(np.prod(conv_shape[2:]))
        with torch.inference_mode():
            results[f"conv3d_{label}_gflops"] = _throughput(lambda: conv(x), flops, device, seconds)
        del a, b, x, conv
    results["peak_gflops"] = max(results.values())
    results["matmul_size"] = n
    results["conv3d_input"] = list(conv_shape)
    return results


def _throughput(fn, flops: int, device: torch.device, seconds: float) -> float:
    fn()  # warm-up: kernel choice and allocation
    _sync(device)
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return round(flops * count / elapsed / 1e9, 2)


# --- the case ------------------------------------------------------------------------------------


class TimedModel(nn.Module):
    """Wraps a network; records the wall time of every forward call (synchronised on CUDA)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[float] = []

    def forward(self, x):
        device = x.device
        _sync(device)
        start = time.perf_counter()
        out = self.model(x)
        _sync(device)
        self.calls.append(time.perf_counter() - start)
        return out


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

    precision: str = "auto"  # auto | fp32 | bf16
    flip_batch: int = 1
    channels_last: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """``"precision=bf16,flip_batch=4,channels_last=1,cudnn_benchmark=1"`` (any subset)."""
        variant = cls()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or not value:
                raise ValueError(f"bad variant item {item!r}; keys: {', '.join(cls.__dataclass_fields__)}")
            if key == "precision":
                if value not in ("auto", "fp32", "bf16"):
                    raise ValueError(f"precision must be auto, fp32 or bf16, got {value!r}")
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
    cache_dir: Path | None = None
    seed: int = 0


def _phantom_case(folder: Path, shape, seed: int):
    phantom = make_case(seed, 0, healthy=False, shape=shape)
    write_case(phantom, folder, naming="2023")
    discovery = find_cases(folder)
    return discovery.cases[0]


def _apply_layout(models, variant: Variant):
    fmt = torch.channels_last_3d if variant.channels_last else torch.contiguous_format
    for model in models:
        model.to(memory_format=fmt)


def run_shipped(case, models, entries, variant: Variant, tta: bool, out_dir: Path, warmup: bool) -> dict:
    """One case through :class:`Predictor` + ``write_label``, with per-call forward times and peaks."""
    device = next(models[0].parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    _apply_layout(models, variant)
    timed = [TimedModel(model) for model in models]
    options = InferenceOptions(tta=tta, precision=variant.precision, flip_batch=variant.flip_batch)
    predictor = Predictor(timed, entries, options)
    if warmup:  # kernel selection, allocator, cudnn autotuning: once per architecture
        from .inference import predict_case_logits

        volume, _ = preprocess(read_case(case).image)
        seen = set()
        for model, entry in zip(timed, entries):
            if entry["arch"] not in seen:
                seen.add(entry["arch"])
                predict_case_logits([model], volume, predictor.flips[: variant.flip_batch], device,
                                    predictor.precision, flip_batch=variant.flip_batch)
        for model in timed:
            model.calls.clear()
    with PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        labels, geometry, report = predictor.predict(case)
        write_start = time.perf_counter()
        write_label(labels, geometry, out_dir / case.output_name)
        end = time.perf_counter()
    seconds = report["seconds"]
    model_calls = sum(sum(model.calls) for model in timed)
    stages = {
        "read": seconds["read"],
        "preprocess": seconds["preprocess"],
        "forward": model_calls,
        "aggregation": seconds["forward"] - model_calls,  # flips, sums, copies back to the host
        "suppression": seconds["suppression"],
        "uncrop": seconds["postprocess"] - seconds["suppression"],
        "write": end - write_start,
    }
    total = end - start
    return {
        "variant": asdict(variant),
        "label": variant.label,
        "precision": predictor.precision,
        "seconds_total": total,
        "stages": stages,
        "non_forward_fraction": (total - model_calls) / total,
        "forward_calls": [{"name": entry["name"], "arch": entry["arch"], "seconds": list(model.calls)}
                          for entry, model in zip(entries, timed)],
        "sliding_window": report["sliding_window"],
        "labels": labels,
        **memory.to_dict(),
    }


def run_naive(case, models, entries, tta: bool, out_dir: Path) -> dict:
    """The straightforward path: per model, preprocess again; per flip, one float32 forward with
    autograd on; then the same decision, un-crop and write as the shipped path."""
    device = next(models[0].parameters()).device
    torch.backends.cudnn.benchmark = False
    _apply_layout(models, Variant())
    flips = flip_combinations(tta)
    stages = dict.fromkeys(STAGES, 0.0)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        images = read_case(case)
        stages["read"] = time.perf_counter() - start
        seg_total = slice_total = None
        per_model = []
        for model in models:
            mark = time.perf_counter()
            volume, box = preprocess(images.image)
            tensor = torch.from_numpy(volume)[None].to(device)
            stages["preprocess"] += time.perf_counter() - mark
            calls = []
            for dims in flips:
                mark = time.perf_counter()
                out = model(torch.flip(tensor, dims) if dims else tensor)
                _sync(device)
                calls.append(time.perf_counter() - mark)
                mark = time.perf_counter()
                seg, slices = out["seg"].detach(), out["slices"].detach()
                if dims:
                    seg = torch.flip(seg, dims)
                    slices = torch.flip(slices, (2,)) if 2 in dims else slices
                seg_total = seg if seg_total is None else seg_total + seg
                slice_total = slices if slice_total is None else slice_total + slices
                del out
                _sync(device)
                stages["aggregation"] += time.perf_counter() - mark
            per_model.append(calls)
            stages["forward"] += sum(calls)
        mark = time.perf_counter()
        count = len(models) * len(flips)
        seg_logits = (seg_total[0] / count).cpu().numpy()
        slice_logits = (slice_total[0] / count).cpu().numpy()
        stages["aggregation"] += time.perf_counter() - mark
        mark = time.perf_counter()
        decision = decide_regions(seg_logits, slice_logits, True)
        stages["suppression"] = time.perf_counter() - mark
        mark = time.perf_counter()
        labels = uncrop(regions_to_labels(decision.regions, case.scheme), box)
        stages["uncrop"] = time.perf_counter() - mark
        mark = time.perf_counter()
        write_label(labels, images.geometry, out_dir / f"naive_{case.output_name}")
        stages["write"] = time.perf_counter() - mark
    total = sum(stages.values())
    return {
        "seconds_total": total,
        "stages": stages,
        "non_forward_fraction": (total - stages["forward"]) / total,
        "forward_calls": [{"name": entry["name"], "arch": entry["arch"], "seconds": calls}
                          for entry, calls in zip(entries, per_model)],
        "labels": labels,
        **memory.to_dict(),
    }


def extrapolate_naive(naive: dict, shipped: dict, measured_models: int) -> float:
    """Naive case seconds for all the shipped run's models, from a naive run on its first
    ``measured_models``: read, suppression, un-crop and write count once; preprocess and aggregation
    scale with the number of models; forward scales as the shipped path's forward time of all models
    over that of the measured ones (so a slower architecture left out is weighted as it should be)."""
    stages = naive["stages"]
    calls = [sum(call["seconds"]) for call in shipped["forward_calls"]]
    total_models = len(calls)
    per_model = (stages["preprocess"] + stages["aggregation"]) * total_models / measured_models
    forward = stages["forward"] * sum(calls) / sum(calls[:measured_models])
    fixed = naive["seconds_total"] - stages["preprocess"] - stages["aggregation"] - stages["forward"]
    return fixed + per_model + forward


def bench_case(config: BenchConfig, work_dir: Path, progress=print, save=lambda result: None) -> dict:
    """Run the case benchmark of ``config`` in ``work_dir``; returns the JSON-able results.

    ``save(result)`` is called after every phase with the results so far (a run cut short by a
    timeout keeps what it measured).
    """
    device = resolve_device(config.device)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(device),
        "device": str(device),
    }
    if config.weights_dir is not None:
        from .weights import load_ensemble

        models, entries = load_ensemble(config.weights_dir, None, device)
        keep = config.models or len(models)  # 0: all of the folder
        models, entries = models[:keep], entries[:keep]
        size = ",".join(sorted({str(entry.get("size", "?")) for entry in entries}))
    else:
        models, entries = random_ensemble(config.size, config.models, device)
        size = config.size
    flips = flip_combinations(config.tta)
    result["config"] = {"size": size, "weights": str(config.weights_dir) if config.weights_dir else "random",
                        "models": len(models), "archs": [e["arch"] for e in entries], "flips": len(flips),
                        "shape": list(config.shape), "naive_models": config.naive_models,
                        "warmup": config.warmup}
    progress(f"phantom case {config.shape}, {len(models)} model(s) of size {size} x {len(flips)} flip(s) on {device}")
    case_dir = work_dir / "case"
    case = _phantom_case(case_dir, config.shape, config.seed)
    out_dir = work_dir / "out"
    out_dir.mkdir(exist_ok=True)

    volume, box = preprocess(read_case(case).image)
    padded = tuple(volume.shape[1:])
    result["case"] = {"shape": list(config.shape), "crop_padded_shape": list(padded),
                      "voxels": int(np.prod(config.shape))}
    flops = {entry["name"]: forward_flops(model, padded) for model, entry in zip(models, entries)}
    case_flops = sum(flops.values()) * len(flips)
    result["flops"] = {"per_forward": flops, "per_case": case_flops, "counter": "torch FlopCounterMode (meta)"}

    progress("peak throughput microbenchmark")
    result["peak"] = measure_peak(device, config.peak_seconds)
    peak = result["peak"]["peak_gflops"]

    save(result)

    result["variants"] = []
    for variant in config.variants:
        progress(f"shipped path: {variant.label}")
        run = run_shipped(case, models, entries, variant, config.tta, out_dir, config.warmup)
        labels = run.pop("labels")
        if not result["variants"]:
            reference_labels = labels
        run["labels_agreement_with_first"] = float((labels == reference_labels).mean())
        run["achieved_gflops"] = case_flops / run["stages"]["forward"] / 1e9
        run["fraction_of_peak"] = run["achieved_gflops"] / peak
        run["load_average"] = list(os.getloadavg())
        run["over_reference"] = run["seconds_total"] / result["variants"][0]["seconds_total"] if result["variants"] else 1.0
        result["variants"].append(run)
        result["shipped"] = result["variants"][0]
        save(result)
    shipped = result["shipped"]

    naive_models = len(models) if config.naive_models is None else min(config.naive_models, len(models))
    if naive_models > 0:
        progress(f"naive path on {naive_models} model(s)")
        try:
            naive = run_naive(case, models[:naive_models], entries[:naive_models], config.tta, out_dir)
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            result["naive"] = {"error": f"out of memory: {error}".splitlines()[0], "models": naive_models}
        else:
            labels = naive.pop("labels")
            naive_flops = sum(flops[e["name"]] for e in entries[:naive_models]) * len(flips)
            naive["achieved_gflops"] = naive_flops / naive["stages"]["forward"] / 1e9
            naive["fraction_of_peak"] = naive["achieved_gflops"] / peak
            naive["models"] = naive_models
            naive["extrapolated"] = naive_models != len(models)
            naive["seconds_case_estimate"] = extrapolate_naive(naive, shipped, naive_models)
            naive["load_average"] = list(os.getloadavg())
            if not naive["extrapolated"]:
                naive["labels_agreement_with_shipped"] = float((labels == reference_labels).mean())
            result["naive"] = naive
            result["naive_over_shipped"] = naive["seconds_case_estimate"] / shipped["seconds_total"]
        save(result)

    if config.training:
        progress("training throughput")
        result["training"] = bench_training(config, device, work_dir, progress)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


# --- training ------------------------------------------------------------------------------------


def bench_training(config: BenchConfig, device: torch.device, work_dir: Path, progress=print) -> list[dict]:
    """Samples/s of the data pipeline alone and of the whole training step, per architecture and
    worker count, from ``config.cache_dir`` or from a cache of two phantom cases built here."""
    from .training.data import open_cache, preprocess_dataset

    if config.cache_dir is not None:
        entries = open_cache(config.cache_dir)
    else:
        data_dir = work_dir / "train_data"
        for index in range(2):
            write_case(make_case(config.seed, index, healthy=False, shape=config.shape), data_dir)
        entries = preprocess_dataset(data_dir, work_dir / "cache", progress=False)
    rows = []
    size = config.size
    for arch in ARCHS:
        for workers in config.training_workers:
            try:
                row = training_throughput(entries, arch, size, workers, config.training_steps, device)
            except torch.OutOfMemoryError as error:
                torch.cuda.empty_cache()
                rows.append({"arch": arch, "workers": workers, "error": f"out of memory: {error}".splitlines()[0]})
                progress(f"  {arch} workers {workers}: out of memory")
                continue
            row["load_average"] = list(os.getloadavg())
            progress(f"  {arch} workers {workers}: data {row['data_samples_per_s']:.2f}/s, "
                     f"step {row['step_samples_per_s']:.2f}/s")
            rows.append(row)
    return rows


def _loader(entries, recipe, workers: int, samples: int):
    from torch.utils.data import DataLoader

    from .training.data import CropDataset, EpochSampler

    # the crops and augmentation that `train` uses
    dataset = CropDataset(entries, recipe.crop, seed=0, augmentation=recipe.augmentation())
    sampler = EpochSampler(len(dataset), seed=0, samples_per_rank=samples)
    return DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=workers)


def training_throughput(entries, arch: str, size: str, workers: int, steps: int, device: torch.device) -> dict:
    """Data pipeline alone (read memory-mapped crop, augment, collate; no model) and the full step
    (data + forward + the paper's loss + backward + Adam), after one warm-up step; samples/s. The step
    runs in ``brats-cls train``'s default precision: float16 autocast with a GradScaler on CUDA, float32
    on CPU."""
    from .training.loop import TrainOptions
    from .training.losses import PaperLoss
    from .training.recipe import recipe_for

    recipe = recipe_for(arch, size)
    autocast_dtype = TrainOptions(arch=arch, size=size).autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    loader = _loader(entries, recipe, workers, steps * recipe.batch_size)
    start = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in loader)
    data_rate = count / (time.perf_counter() - start)

    torch.manual_seed(0)
    model = build_model(arch, size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    criterion = PaperLoss()
    count, started = 0, None
    for step, batch in enumerate(_loader(entries, recipe, workers, (steps + 1) * recipe.batch_size)):
        if step == 1:  # the first step pays for allocation and thread start-up
            _sync(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            outputs = model(batch["image"].to(device))
        loss, _ = criterion(outputs, batch["regions"].to(device), batch["slices"].to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step >= 1:
            count += batch["image"].shape[0]
    _sync(device)
    step_rate = count / (time.perf_counter() - started)
    return {"arch": arch, "size": size, "crop": list(recipe.crop), "batch_size": recipe.batch_size,
            "workers": workers, "steps": steps, "precision": str(autocast_dtype or torch.float32).removeprefix("torch."),
            "data_samples_per_s": data_rate, "step_samples_per_s": step_rate}


# --- model forward (the former scripts/bench_models.py) --------------------------------------------


def time_forward(model: nn.Module, x: torch.Tensor, repeats: int, bf16: bool) -> list[float]:
    """Seconds of ``repeats`` forwards under inference_mode, after one warm-up forward."""
    times = []
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        model(x)
        for _ in range(repeats):
            _sync(x.device)
            start = time.perf_counter()
            model(x)
            _sync(x.device)
            times.append(time.perf_counter() - start)
    return times


# --- report --------------------------------------------------------------------------------------


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def format_report(result: dict) -> str:
    """The human-readable table of a :func:`bench_case` result."""
    machine = result["machine"]
    config = result["config"]
    lines = [
        f"brats-cls bench  {result['date']}  commit {result['commit']}",
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads){', ' + machine['gpu'] if 'gpu' in machine else ''}; "
        f"load average {' '.join(f'{v:.2f}' for v in machine['load_average'])} at start, "
        f"{' '.join(f'{v:.2f}' for v in machine.get('load_average_end', machine['load_average']))} at end",
        f"case {tuple(config['shape'])} -> cropped+padded {tuple(result['case']['crop_padded_shape'])}; "
        f"{config['models']} model(s) [{config['size']}, {config['weights']}] x {config['flips']} flip(s) "
        f"on {result['device']}",
        f"FLOPs per case {result['flops']['per_case'] / 1e9:.1f} GFLOP; measured peak "
        f"{result['peak']['peak_gflops']:.1f} GFLOP/s (matmul fp32 {result['peak']['matmul_fp32_gflops']:.1f}, "
        f"bf16 {result['peak']['matmul_bf16_gflops']:.1f}; conv3d fp32 {result['peak']['conv3d_fp32_gflops']:.1f}, "
        f"bf16 {result['peak']['conv3d_bf16_gflops']:.1f})",
        "",
    ]
    runs = [("shipped " + run["label"], run) for run in result["variants"]]
    if "naive" in result and "error" not in result["naive"]:
        naive = result["naive"]
        runs.append((f"naive ({naive['models']} model(s))", naive))
    header = f"{'stage (s)':14s}" + "".join(f"{name[:28]:>30s}" for name, _ in runs)
    lines.append(header)
    for stage in STAGES:
        lines.append(f"{stage:14s}" + "".join(f"{run['stages'][stage]:30.3f}" for _, run in runs))
    lines.append(f"{'total':14s}" + "".join(f"{run['seconds_total']:30.3f}" for _, run in runs))
    lines.append(f"{'non-forward %':14s}" + "".join(f"{100 * run['non_forward_fraction']:30.1f}" for _, run in runs))
    lines.append(f"{'GFLOP/s':14s}" + "".join(f"{run['achieved_gflops']:30.2f}" for _, run in runs))
    lines.append(f"{'% of peak':14s}" + "".join(f"{100 * run['fraction_of_peak']:30.1f}" for _, run in runs))
    lines.append(f"{'peak RSS':14s}" + "".join(f"{_gib(run['peak_rss_bytes']):>30s}" for _, run in runs))
    lines.append(f"{'peak GPU':14s}" + "".join(f"{_gib(run['peak_gpu_allocated_bytes']):>30s}" for _, run in runs))
    lines.append("")
    for run in result["variants"]:
        per_model = ", ".join(f"{call['name']} {sum(call['seconds']):.2f}" for call in run["forward_calls"])
        lines.append(f"forward per model ({run['label']}): {per_model}")
    if "naive" in result:
        naive = result["naive"]
        if "error" in naive:
            lines.append(f"naive path: {naive['error']}")
        else:
            how = (f"extrapolated from {naive['models']} to {config['models']} models"
                   if naive["extrapolated"] else "measured")
            lines.append(f"naive case {naive['seconds_case_estimate']:.2f} s ({how}); "
                         f"naive / shipped = {result['naive_over_shipped']:.2f}")
            if "labels_agreement_with_shipped" in naive:
                lines.append(f"voxels labelled alike by naive and shipped: {100 * naive['labels_agreement_with_shipped']:.4f} %")
    for run in result["variants"][1:]:
        lines.append(f"{run['label']}: {run['seconds_total']:.2f} s = {run['over_reference']:.2f} x the first variant; "
                     f"voxels labelled alike: {100 * run['labels_agreement_with_first']:.4f} %")
    for row in result.get("training", []):
        if "error" in row:
            lines.append(f"training {row['arch']:6s} workers {row['workers']}: {row['error']}")
            continue
        lines.append(f"training {row['arch']:6s} {row['size']} crop {tuple(row['crop'])} batch {row['batch_size']} "
                     f"workers {row['workers']} {row['precision']}: data {row['data_samples_per_s']:.2f} samples/s, "
                     f"step {row['step_samples_per_s']:.2f} samples/s")
    return "\n".join(lines)


# --- command -------------------------------------------------------------------------------------


@click.command("bench")
@click.option("--size", type=click.Choice(["paper", "demo", "tiny"]), default="demo", show_default=True,
              help="Preset of the random-initialised models.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--models", "model_count", type=click.IntRange(min=1), default=None,
              help="Number of models, archs alternating [default: 10; with --weights: all].")
@click.option("--weights", "weights_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="A real weights folder (manifest.json) instead of random weights.")
@click.option("--tta/--no-tta", default=True, show_default=True, help="8 flips, or the identity only.")
@click.option("--shape", default=None, help="Phantom case shape D,H,W [default: 155,240,240; --quick: 48,64,64].")
@click.option("--variant", "variant_specs", multiple=True,
              help="Shipped-path variant, repeatable: precision=auto|fp32|bf16,flip_batch=N,channels_last=0|1,"
                   "cudnn_benchmark=0|1. The first is the reference. [default: one, all defaults]")
@click.option("--naive-models", type=click.IntRange(min=0), default=None,
              help="Models in the naive comparison (0: none; fewer than --models: extrapolated) [default: all].")
@click.option("--no-warmup", is_flag=True, help="Time the first forward too (kernel choice, allocation).")
@click.option("--training", is_flag=True, help="Also measure training throughput (data pipeline, full step).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Cache from `brats-cls preprocess` for --training [default: two phantom cases].")
@click.option("--training-steps", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--workers", "training_workers", type=click.IntRange(min=0), multiple=True,
              help="DataLoader workers for --training, repeatable [default: 0].")
@click.option("--quick", is_flag=True,
              help="Smoke test: tiny models, a 48x64x64 case, 2 models, naive on 1 model (extrapolated).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the results as JSON.")
def bench_command(size, device, model_count, weights_dir, tta, shape, variant_specs, naive_models, no_warmup,
                  training, cache_dir, training_steps, training_workers, quick, json_path):
    """Time one phantom case through the ensemble, stage by stage, shipped path against a naive one."""
    try:
        variants = [Variant.parse(spec) for spec in variant_specs] or [Variant()]
        case_shape = _parse_shape(shape) if shape else (QUICK_SHAPE if quick else BRATS_SHAPE)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if quick:
        size = "tiny"
        model_count = model_count or 2
        naive_models = 1 if naive_models is None else naive_models
        training_steps = min(training_steps, 2)
    config = BenchConfig(
        size=size, device=device, models=model_count or (0 if weights_dir else 10), weights_dir=weights_dir,
        tta=tta, shape=case_shape, variants=variants, naive_models=naive_models, warmup=not no_warmup,
        peak_seconds=0.2 if quick else 0.5, training=training, training_steps=training_steps,
        training_workers=tuple(training_workers) or (0,), cache_dir=cache_dir,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="brats-cls-bench-") as work:
            result = bench_case(config, Path(work), progress=lambda text: click.echo(text, err=True),
                                save=lambda partial: _write_json(partial, json_path))
    except (ValueError, WeightsError) as error:  # e.g. --device cuda without CUDA, a bad weights folder
        raise click.UsageError(str(error)) from None
    _write_json(result, json_path)
    click.echo(format_report(result))
    if json_path is not None:
        click.echo(f"results written to {json_path}")


def _write_json(result: dict, path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"--shape must be three sizes D,H,W, got {text!r}")
    return tuple(int(part) for part in parts)
