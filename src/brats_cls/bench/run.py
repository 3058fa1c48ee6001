"""``bench_case``: the whole benchmark of one configuration, phase by phase, with partial results saved
after each phase (a run cut short by a timeout keeps what it measured)."""

from __future__ import annotations

import datetime
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from ..device import resolve_device
from ..io import read_case
from ..predictor import flip_combinations
from ..preprocess import preprocess
from .case import BenchConfig, agreement, extrapolate_naive, phantom_case, random_ensemble, run_naive, run_shipped
from .engines import bench_engines
from .machine import forward_flops, git_commit, machine_info, measure_peak
from .training import bench_training


def _models(config: BenchConfig, device: torch.device):
    """The shipped weights of ``config.weights_dir`` (the first ``config.models``), else random ones."""
    if config.weights_dir is not None:
        from ..weights import load_ensemble

        models, entries = load_ensemble(config.weights_dir, None, device)
        keep = config.models or len(models)  # 0: all of the folder
        models, entries = models[:keep], entries[:keep]
        return models, entries, ",".join(sorted({str(entry.get("size", "?")) for entry in entries}))
    models, entries = random_ensemble(config.size, config.models, device)
    return models, entries, config.size


def _variants(result: dict, config: BenchConfig, case, models, entries, out_dir: Path, progress, save) -> np.ndarray:
    """Each shipped-path variant in turn; returns the first variant's labels (the reference)."""
    result["variants"] = []
    reference = None
    for variant in config.variants:
        progress(f"shipped path: {variant.label}")
        run = run_shipped(case, models, entries, variant, config.tta, out_dir, config.warmup)
        labels = run.pop("labels")
        reference = labels if reference is None else reference
        run["labels_agreement_with_first"] = agreement(labels, reference)
        run["achieved_gflops"] = result["flops"]["per_case"] / run["stages"]["forward"] / 1e9
        run["fraction_of_peak"] = run["achieved_gflops"] / result["peak"]["peak_gflops"]
        run["load_average"] = list(os.getloadavg())
        first = result["variants"][0]["seconds_total"] if result["variants"] else run["seconds_total"]
        run["over_reference"] = run["seconds_total"] / first
        result["variants"].append(run)
        result["shipped"] = result["variants"][0]
        save(result)
    return reference


def _naive(result: dict, config: BenchConfig, case, models, entries, out_dir: Path, reference, progress) -> None:
    count = len(models) if config.naive_models is None else min(config.naive_models, len(models))
    if count == 0:
        return
    progress(f"naive path on {count} model(s)")
    try:
        naive = run_naive(case, models[:count], entries[:count], config.tta, out_dir)
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        result["naive"] = {"error": f"out of memory: {error}".splitlines()[0], "models": count}
        return
    labels = naive.pop("labels")
    flops = result["flops"]["per_forward"]
    naive_flops = sum(flops[e["name"]] for e in entries[:count]) * result["config"]["flips"]
    naive["achieved_gflops"] = naive_flops / naive["stages"]["forward"] / 1e9
    naive["fraction_of_peak"] = naive["achieved_gflops"] / result["peak"]["peak_gflops"]
    naive.update(models=count, extrapolated=count != len(models), load_average=list(os.getloadavg()))
    naive["seconds_case_estimate"] = extrapolate_naive(naive, result["shipped"], count)
    if not naive["extrapolated"]:
        naive["labels_agreement_with_shipped"] = agreement(labels, reference)
    result["naive"] = naive
    result["naive_over_shipped"] = naive["seconds_case_estimate"] / result["shipped"]["seconds_total"]


def bench_case(config: BenchConfig, work_dir: Path, progress=print, save=lambda result: None) -> dict:
    """Run the benchmark of ``config`` in ``work_dir``; returns the JSON-able results.

    ``save(result)`` is called after every phase with the results so far.
    """
    device = resolve_device(config.device)
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
              "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine_info(device),
              "device": str(device)}
    models, entries, size = _models(config, device)
    flips = flip_combinations(config.tta)
    result["config"] = {"size": size, "weights": str(config.weights_dir) if config.weights_dir else "random",
                        "models": len(models), "archs": [e["arch"] for e in entries], "flips": len(flips),
                        "shape": list(config.shape), "naive_models": config.naive_models, "warmup": config.warmup}
    progress(f"phantom case {config.shape}, {len(models)} model(s) of size {size} x {len(flips)} flip(s) on {device}")
    case = phantom_case(work_dir / "case", config.shape, config.seed)
    out_dir = work_dir / "out"
    out_dir.mkdir(exist_ok=True)
    padded = tuple(preprocess(read_case(case).image)[0].shape[1:])
    result["case"] = {"shape": list(config.shape), "crop_padded_shape": list(padded),
                      "voxels": int(np.prod(config.shape))}
    flops = {entry["name"]: forward_flops(model, padded) for model, entry in zip(models, entries)}
    result["flops"] = {"per_forward": flops, "per_case": sum(flops.values()) * len(flips),
                       "counter": "torch FlopCounterMode (meta)"}
    progress("peak throughput microbenchmark")
    result["peak"] = measure_peak(device, config.peak_seconds)
    save(result)
    if config.variants:  # with --engine alone, only the engines phase runs
        reference = _variants(result, config, case, models, entries, out_dir, progress, save)
        _naive(result, config, case, models, entries, out_dir, reference, progress)
        save(result)
    if config.engines:
        result["config"]["engines"] = [spec.label for spec in config.engines]

        def save_rows(rows):
            result["engines"] = rows
            save(result)

        save_rows(bench_engines(case, models, config.engines, config.tta, out_dir, config.engine_cache, progress,
                                save_rows))
    if config.training:
        progress("training throughput")
        result["training"] = bench_training(config, device, work_dir, progress)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result
