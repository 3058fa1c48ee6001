"""Time :func:`brats_cls.qc.write_qc_figure` on one 240x240x155 phantom case, with a tumour and without.

    python scripts/time_qc_figure.py [--repeats 5] [--out /tmp/qc-timing]

Prints the one-off matplotlib import and the seconds per figure (median of the repeats). The slice
probabilities are made up from the phantom's own slice targets: this times the drawing, not a model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from brats_cls.qc import write_qc_figure
from brats_cls.regions import labels_to_regions, slice_targets
from brats_cls.synth import BRATS_SHAPE, make_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="qc-timing-")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    case = make_case(7, 1, healthy=False, shape=BRATS_SHAPE, kind="ring")
    regions = labels_to_regions(case.labels, "2021")
    rng = np.random.default_rng(0)
    probability = np.clip(0.8 * slice_targets(regions) + rng.uniform(0, 0.3, (3, BRATS_SHAPE[0])), 0, 1)
    suppressed = np.zeros_like(probability, dtype=bool)
    suppressed[2, 40:50] = True
    started = time.perf_counter()
    import matplotlib.figure  # noqa: F401  (the one-off import, timed apart)

    print(f"matplotlib import: {time.perf_counter() - started:.3f} s (once per process)")
    for name, case_regions in (("tumour", regions), ("tumour-free", np.zeros_like(regions))):
        seconds = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            write_qc_figure(args.out / f"{name}.png", f"phantom-{name}", case.image[0], case.image[2], case_regions,
                            probability, suppressed, {"WT": 1234, "TC": 0, "ET": 56}, case.geometry)
            seconds.append(time.perf_counter() - started)
        print(f"{name}: {statistics.median(seconds):.3f} s per figure (median of {args.repeats}; "
              f"min {min(seconds):.3f}, max {max(seconds):.3f}) -> {args.out / f'{name}.png'}")


if __name__ == "__main__":
    main()
