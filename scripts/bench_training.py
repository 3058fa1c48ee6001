"""Throughput of the training data pipeline alone and of a whole training step; prints samples/s.

    python scripts/bench_training.py --cache CACHE [--size demo] [--arch bifpn unetpp] [--steps 6]
                                     [--workers 0 2] [--device cpu]

The data figure iterates the DataLoader (read memory-mapped crop, augment, collate) with no model;
the step figure is data + forward + the paper's loss + backward + Adam step, after one warm-up step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from brats_cls.models.registry import build_model
from brats_cls.training.data import CropDataset, EpochSampler, open_cache
from brats_cls.training.losses import PaperLoss
from brats_cls.training.recipe import recipe_for


def _loader(entries, recipe, workers: int, samples: int) -> DataLoader:
    dataset = CropDataset(entries, recipe.crop, seed=0)
    sampler = EpochSampler(len(dataset), seed=0, samples_per_rank=samples)
    return DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=workers)


def bench_data(entries, recipe, workers: int, steps: int) -> float:
    loader = _loader(entries, recipe, workers, steps * recipe.batch_size)
    started = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in loader)
    return count / (time.perf_counter() - started)


def bench_step(entries, arch, size, recipe, workers: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(arch, size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    criterion = PaperLoss()
    loader = _loader(entries, recipe, workers, (steps + 1) * recipe.batch_size)
    count = 0
    started = None
    for step, batch in enumerate(loader):
        if step == 1:  # the first step pays for allocation and thread start-up
            started = time.perf_counter()
        outputs = model(batch["image"].to(device))
        loss, _ = criterion(outputs, batch["regions"].to(device), batch["slices"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 1:
            count += batch["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a cache from `brats-cls preprocess`")
    parser.add_argument("--size", default="demo")
    parser.add_argument("--arch", nargs="+", default=["bifpn", "unetpp"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    entries = open_cache(args.cache)
    device = torch.device(args.device)
    print(f"{len(entries)} cached cases, size {args.size}, device {device}, torch threads {torch.get_num_threads()}")
    for arch in args.arch:
        recipe = recipe_for(arch, args.size)
        for workers in args.workers:
            data = bench_data(entries, recipe, workers, args.steps)
            step = bench_step(entries, arch, args.size, recipe, workers, args.steps, device)
            print(f"{arch:6s} crop {recipe.crop} batch {recipe.batch_size} workers {workers}: "
                  f"data pipeline {data:6.2f} samples/s, training step {step:6.2f} samples/s")


if __name__ == "__main__":
    main()
