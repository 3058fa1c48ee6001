"""Coarse logit sums against full-resolution logits per flip (:mod:`brats_cls.logit_grid`), alternated on
the same case, networks and engine, so that a shared machine's drift falls on both alike.

    python bench/coarse_ab.py                        # openvino, all ten shipped networks x 8 flips, 3 rounds
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/coarse_ab.py --engine openvino

One 240 x 240 x 155 phantom case (``brats-cls bench``'s), preprocessed once; each round times
``Predictor.ensemble`` once per setting (after one untimed warm-up each: exports, compilation) and
prints the seconds, then the median per setting and the largest logit difference between them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="weights")
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from brats_cls.bench.case import BRATS_SHAPE, phantom_case
    from brats_cls.io import read_case
    from brats_cls.predictor import Predictor
    from brats_cls.preprocess import preprocess
    from brats_cls.weights import load_ensemble

    models, _ = load_ensemble(Path(args.weights))
    with tempfile.TemporaryDirectory(prefix="brats-cls-coarse-ab-") as folder:
        volume, _ = preprocess(read_case(phantom_case(Path(folder), BRATS_SHAPE, 0)).image)
        predictors = {label: Predictor(models, precision="fp32", engine=args.engine, coarse_logits=coarse,
                                       engine_cache=Path(folder) / "cache")
                      for label, coarse in (("coarse", True), ("full", False))}
        logits = {label: predictor.ensemble(volume).seg for label, predictor in predictors.items()}  # warm-up
        seconds = {label: [] for label in predictors}
        for number in range(args.rounds):
            for label, predictor in predictors.items():
                start = time.perf_counter()
                predictor.ensemble(volume)
                seconds[label].append(time.perf_counter() - start)
            print(f"round {number + 1}: " + ", ".join(f"{label} {s[-1]:.2f} s" for label, s in seconds.items()), flush=True)
    print(f"{len(models)} networks x 8 flips, {args.engine} fp32, volume {volume.shape[1:]}: median "
          + ", ".join(f"{label} {statistics.median(s):.2f} s" for label, s in seconds.items())
          + f"; largest logit difference {float(np.abs(logits['coarse'] - logits['full']).max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
