"""Forward time of the networks on one cropped case-sized input, and parameter counts of every preset.

    python scripts/bench_models.py [--preset demo] [--threads 2] [--repeats 5] [--shape 144 176 144]

Times one forward under ``torch.inference_mode`` in eval mode, float32 and with bfloat16 autocast;
prints the median and the minimum of ``--repeats`` runs after one warm-up run (the minimum is the
figure least disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from brats_cls.bench import time_forward
from brats_cls.models import ARCHITECTURES, PRESET_NAMES, build_model, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(144, 176, 144), metavar=("D", "H", "W"))
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), nargs="*", default=sorted(ARCHITECTURES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print("parameters:")
    for arch in sorted(ARCHITECTURES):
        for preset in PRESET_NAMES:
            print(f"  {arch:7s} {preset:6s} {count_parameters(build_model(arch, preset, device='meta')):>12,d}")

    x = torch.randn(1, 4, *args.shape)
    print(f"forward of preset {args.preset!r} on {tuple(x.shape)}, {args.threads} threads, "
          f"{args.repeats} runs (torch {torch.__version__}):")
    for arch in args.arch:
        model = build_model(arch, args.preset).eval()
        for bf16 in (False, True):
            times = time_forward(model, x, args.repeats, bf16)
            print(f"  {arch:7s} {'bf16 autocast' if bf16 else 'fp32':13s} "
                  f"median {statistics.median(times):.3f} s  min {min(times):.3f} s")


if __name__ == "__main__":
    main()
