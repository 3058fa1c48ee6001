"""One OpenVINO float32 forward of each shipped architecture at each of several cropped-brain shapes, each
in a process of its own, so that a native crash (a signal) is reported as a result instead of ending
the sweep. Prints one line per architecture and shape: ``ok``, or how the process ended.

    python bench/openvino_shapes.py                          # this machine as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/openvino_shapes.py   # capped to AVX2

Shapes are (D, H, W) after cropping and padding to the working grid (multiples of 16); the defaults
span what BraTS brains crop to. ``--shapes 144,176,144 160,192,144`` to choose; ``--weights`` for the
models (the first of each architecture in the manifest is used). Exit status 1 when any forward failed.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_SHAPES = ["128,160,128", "128,176,144", "144,176,144", "144,176,160", "144,192,144",
                  "144,192,176", "160,192,144", "160,208,160"]


def forward(weights: str, arch: str, shape: str, cache: str) -> None:
    """The child: load the first ``arch`` model of ``weights`` and run one OpenVINO forward at ``shape``."""
    import torch

    from brats_cls.engines import get_engine
    from brats_cls.weights import load_ensemble, read_manifest

    entry = next(e for e in read_manifest(Path(weights)) if e["arch"] == arch)
    [model], _ = load_ensemble(Path(weights), entry["name"])
    runner = get_engine("openvino", "cpu", cache).prepare(model, "fp32")
    seg, cls = runner(torch.zeros((1, 4, *map(int, shape.split(",")))))
    assert torch.isfinite(seg).all() and torch.isfinite(cls).all(), "non-finite logits"


def ended(returncode: int) -> str:
    if returncode == 0:
        return "ok"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="weights")
    parser.add_argument("--archs", default="bifpn,unetpp")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    parser.add_argument("--child", nargs=3, metavar=("ARCH", "SHAPE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        forward(args.weights, *args.child)
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="brats-cls-ov-shapes-") as cache:
        for arch in args.archs.split(","):
            for shape in args.shapes:
                child = subprocess.run([sys.executable, __file__, "--weights", args.weights, "--child", arch, shape, cache],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                result = ended(child.returncode)
                failed += result != "ok"
                last = child.stderr.strip().splitlines()[-1:] if child.returncode > 0 else []
                print(f"{arch:7} {shape:12} {result}" + (f": {last[0]}" if last else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
