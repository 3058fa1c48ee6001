"""One OpenVINO float32 forward of each shipped architecture at each of several cropped-brain shapes, each
in a process of its own, so that a native crash (a signal) is reported as a result instead of ending
the sweep. Prints one line per architecture and shape: ``ok`` with the kernels OpenVINO chose for the
convolutions, or how the process ended.

    python bench/openvino_shapes.py                          # this machine as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/openvino_shapes.py   # capped to AVX2
    python bench/openvino_shapes.py --via "qemu-x86_64 -cpu EPYC-Rome"   # a CPU without AVX-512

``--via`` runs each child through a command prefix. With QEMU's user-mode emulator (Debian's
``qemu-user``) and a CPU model without AVX-512, every library in the child reads that CPU's CPUID and
dispatches the kernels it would run there: an AVX2-only CPU as the software sees it (not its speed:
emulated vector code is slow). The graphs are exported natively first (an ONNX graph does not depend
on the CPU), so the emulated child only compiles and runs.

Shapes are (D, H, W) after cropping and padding to the working grid (multiples of 16); the defaults
span what BraTS brains crop to. ``--shapes 144,176,144 160,192,144`` to choose; ``--weights`` for the
models (the first of each architecture in the manifest is used); ``--cache`` keeps the exported
graphs. Exit status 1 when any forward failed.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_SHAPES = ["128,160,128", "128,176,144", "144,176,144", "144,176,160", "144,192,144",
                  "144,192,176", "160,192,144", "160,208,160"]


def load(weights: str, arch: str):
    """The first ``arch`` model of the manifest under ``weights``."""
    from brats_cls.weights import load_ensemble, read_manifest

    entry = next(e for e in read_manifest(Path(weights)) if e["arch"] == arch)
    [model], _ = load_ensemble(Path(weights), entry["name"])
    return model


def parse_shape(shape: str) -> tuple[int, ...]:
    return (1, 4, *map(int, shape.split(",")))


def forward(weights: str, arch: str, shape: str, cache: str) -> None:
    """The child: one OpenVINO forward of the first ``arch`` model at ``shape`` (as the engine compiles
    it); prints the primitive types of the convolutions."""
    import numpy as np

    from brats_cls.engines import get_engine

    model = load(weights, arch)
    engine = get_engine("openvino", "cpu", cache)
    compiled = engine.compile(engine.onnx_for(model, parse_shape(shape)), "fp32")
    results = compiled(np.zeros(parse_shape(shape), dtype=np.float32))
    assert all(np.isfinite(results[name]).all() for name in ("seg", "slices")), "non-finite logits"
    kernels = sorted({node.get_rt_info()["primitiveType"].astype(str)
                      for node in compiled.get_runtime_model().get_ops()
                      if node.get_rt_info()["layerType"].astype(str) == "Convolution"})
    print("conv kernels: " + ", ".join(kernels))


def warm(weights: str, archs: list[str], shapes: list[str], cache: str) -> None:
    """Export every graph natively into ``cache`` (the children then read it); a shape that cannot be
    exported is left to its child to report."""
    from brats_cls.engines import EngineError, get_engine

    engine = get_engine("openvino", "cpu", cache)
    for arch in archs:
        model = load(weights, arch)
        for shape in shapes:
            try:
                engine.onnx_for(model, parse_shape(shape))
            except (EngineError, ValueError):
                pass


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
    parser.add_argument("--via", default="", help="a command prefix for each child, e.g. 'qemu-x86_64 -cpu EPYC-Rome'")
    parser.add_argument("--cache", help="folder of the exported graphs (default: a temporary one)")
    parser.add_argument("--child", nargs=3, metavar=("ARCH", "SHAPE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        forward(args.weights, *args.child)
        return 0
    failed = 0
    archs = args.archs.split(",")
    with tempfile.TemporaryDirectory(prefix="brats-cls-ov-shapes-") as temporary:
        cache = args.cache or temporary
        if args.via:
            warm(args.weights, archs, args.shapes, cache)
        for arch in archs:
            for shape in args.shapes:
                command = [*shlex.split(args.via), sys.executable, __file__, "--weights", args.weights,
                           "--child", arch, shape, cache]
                child = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                # a signal that ends the child under an emulator ends the emulator the same way
                result = ended(child.returncode)
                failed += result != "ok"
                if child.returncode == 0:
                    detail = child.stdout.strip().splitlines()[-1:]
                else:
                    errors = [line for line in child.stderr.strip().splitlines() if "warning: TCG" not in line]
                    detail = errors[-1:] if child.returncode > 0 else []
                print(f"{arch:7} {shape:12} {result}" + (f": {detail[0]}" if detail else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
