"""Training throughput: samples/s of the data pipeline alone and of the whole training step (the
:class:`~brats_cls.training.step.TrainStep` that ``brats-cls train`` runs), per architecture, worker
count, precision and memory layout."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..device import resolve_precision, synchronize
from ..models.registry import build_model
from ..synth import make_case, write_case
from .case import ARCHS


def bench_training(config, device: torch.device, work_dir: Path, progress=print) -> list[dict]:
    """Every architecture x worker count x training variant, from ``config.cache_dir`` or from a
    cache of two phantom cases built here."""
    from ..training.data import open_cache, preprocess_dataset

    if config.cache_dir is not None:
        entries = open_cache(config.cache_dir)
    else:
        data_dir = work_dir / "train_data"
        for index in range(2):
            write_case(make_case(config.seed, index, healthy=False, shape=config.shape), data_dir)
        entries = preprocess_dataset(data_dir, work_dir / "cache", progress=False)
    rows = []
    for arch in ARCHS:
        for workers in config.training_workers:
            for variant in config.training_variants:
                try:
                    row = training_throughput(entries, arch, config.size, workers, config.training_steps, device,
                                              variant.precision, variant.channels_last)
                except torch.OutOfMemoryError as error:
                    torch.cuda.empty_cache()
                    row = {"arch": arch, "workers": workers, "error": f"out of memory: {error}".splitlines()[0]}
                    progress(f"  {arch} workers {workers}: out of memory")
                else:
                    progress(f"  {arch} workers {workers} {row['precision']}{' channels_last' * variant.channels_last}: "
                             f"data {row['data_samples_per_s']:.2f}/s, step {row['step_samples_per_s']:.2f}/s")
                rows.append(row)
    return rows


def _loader(entries, recipe, workers: int, samples: int):
    from torch.utils.data import DataLoader

    from ..training.data import CropDataset, EpochSampler

    # the crops and augmentation that `train` uses
    dataset = CropDataset(entries, recipe.crop, seed=0, augmentation=recipe.augmentation())
    sampler = EpochSampler(len(dataset), seed=0, samples_per_rank=samples)
    return DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=workers)


def training_throughput(entries, arch: str, size: str, workers: int, steps: int, device: torch.device,
                        precision: str = "auto", channels_last: bool = False) -> dict:
    """Data pipeline alone (read memory-mapped crop, augment, collate; no model) and the full step
    (data + :class:`TrainStep`), after one warm-up step; samples/s."""
    from ..training.recipe import recipe_for
    from ..training.step import TrainStep

    recipe = recipe_for(arch, size)
    precision = resolve_precision(precision, device, training=True)
    start = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in _loader(entries, recipe, workers, steps * recipe.batch_size))
    data_rate = count / (time.perf_counter() - start)

    torch.manual_seed(0)
    model = build_model(arch, size).to(device).train()
    stepper = TrainStep(model, model, recipe, device, precision, steps + 1, 0, channels_last)
    count, started = 0, None
    for index, batch in enumerate(_loader(entries, recipe, workers, (steps + 1) * recipe.batch_size)):
        if index == 1:  # the first step pays for allocation and thread start-up
            synchronize(device)
            started = time.perf_counter()
        stepper.step(batch)
        if index >= 1:
            count += batch["image"].shape[0]
    synchronize(device)
    step_rate = count / (time.perf_counter() - started)
    return {"arch": arch, "size": size, "crop": list(recipe.crop), "batch_size": recipe.batch_size,
            "workers": workers, "steps": steps, "precision": precision, "channels_last": channels_last,
            "data_samples_per_s": data_rate, "step_samples_per_s": step_rate}
