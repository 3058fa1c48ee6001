"""Throughput of the training data pipeline alone and of a whole training step; prints samples/s.

    python scripts/bench_training.py --cache CACHE [--size demo] [--arch bifpn unetpp] [--steps 6]
                                     [--workers 0 2] [--device cpu]

The data figure iterates the DataLoader (read memory-mapped crop, augment, collate) with no model;
the step figure is data + forward + the paper's loss + backward + Adam step, after one warm-up step.
The measuring code is ``brats_cls.bench.training_throughput`` (also run by ``brats-cls bench --training``).
"""

from __future__ import annotations

import argparse

import torch

from brats_cls.bench import training_throughput
from brats_cls.training.data import open_cache


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
        for workers in args.workers:
            row = training_throughput(entries, arch, args.size, workers, args.steps, device)
            print(f"{arch:6s} crop {tuple(row['crop'])} batch {row['batch_size']} workers {workers}: "
                  f"data pipeline {row['data_samples_per_s']:6.2f} samples/s, "
                  f"training step {row['step_samples_per_s']:6.2f} samples/s")


if __name__ == "__main__":
    main()
