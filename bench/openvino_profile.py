"""Where an OpenVINO float32 forward of each shipped architecture spends its time: OpenVINO's own
per-layer profile (``PERF_COUNT``), summed by layer type, over a few forwards at one cropped shape.

    python bench/openvino_profile.py                      # 160 x 192 x 144, the bench case's shape
    python bench/openvino_profile.py --shape 144,176,144 --runs 5 --top 12
    python bench/openvino_profile.py --coarse             # the graphs of forward_coarse, as infer runs them

Prints per architecture: wall seconds per forward, then per layer type (OpenVINO's names: Convolution,
MVN for GroupNorm, Reorder for layout changes, Interpolate, ...) the milliseconds per forward, their
share of the profiled total and the kernels used; then the ``--top`` slowest layers. Pause other work
first: two cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openvino_shapes import load, parse_shape  # noqa: E402 - the sibling script's loaders


def profile(weights: str, arch: str, shape: str, runs: int, top: int, cache: str, coarse: bool) -> None:
    from brats_cls.engines import get_engine

    model = load(weights, arch)
    engine = get_engine("openvino", "cpu", cache)
    compiled = engine.compile(engine.onnx_for(model, parse_shape(shape), coarse), "fp32", {"PERF_COUNT": True})
    request = compiled.create_infer_request()
    volume = np.random.default_rng(0).standard_normal(parse_shape(shape)).astype(np.float32)
    request.infer({"volume": volume})  # the first call pays for itself
    by_type: dict[str, float] = defaultdict(float)
    kernels: dict[str, set] = defaultdict(set)
    by_layer: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    for _ in range(runs):
        request.infer({"volume": volume})
        for item in request.profiling_info:
            ms = item.real_time.total_seconds() * 1e3
            by_type[item.node_type] += ms
            kernels[item.node_type].add(item.exec_type)
            by_layer[f"{item.node_type} {item.node_name}"] += ms
    wall = (time.perf_counter() - start) / runs
    total = sum(by_type.values()) / runs
    print(f"{arch}{' (forward_coarse)' * coarse} at {shape}: {wall * 1e3:.0f} ms per forward (profiled layers {total:.0f} ms)")
    for name, ms in sorted(by_type.items(), key=lambda item: -item[1]):
        if ms / runs >= 0.5:
            print(f"  {name:18} {ms / runs:8.1f} ms {100 * ms / runs / total:5.1f} %  {', '.join(sorted(kernels[name]))}")
    print(f"  slowest {top} layers:")
    for name, ms in sorted(by_layer.items(), key=lambda item: -item[1])[:top]:
        print(f"    {ms / runs:8.1f} ms  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="weights")
    parser.add_argument("--archs", default="bifpn,unetpp")
    parser.add_argument("--shape", default="160,192,144")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--coarse", action="store_true", help="profile forward_coarse's graph")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="brats-cls-ov-profile-") as cache:
        for arch in args.archs.split(","):
            profile(args.weights, arch, args.shape, args.runs, args.top, cache, args.coarse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
