"""Machine facts a benchmark figure needs beside it: CPU/GPU, load, commit, peak memory, FLOPs and the
measured peak throughput of the device."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..device import synchronize
from ..models.registry import build_model


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, load average, torch version and threads, GPU name: what a figure needs beside it."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it; ``unknown`` outside git."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


class PeakMemory:
    """Peak resident memory (bytes) and peak GPU memory of the code run inside ``with``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_bytes = 0
        self.rss_method = ""
        self.gpu_allocated_bytes = None
        self.gpu_reserved_bytes = None

    def __enter__(self):
        self._reset = _reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_allocated_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.gpu_reserved_bytes = int(torch.cuda.max_memory_reserved(self.device))
        hwm = _vm_hwm_bytes()
        if self._reset and hwm:
            self.rss_bytes, self.rss_method = hwm, "VmHWM (reset per phase)"
        else:  # ru_maxrss: kilobytes on Linux, bytes on macOS; a lifetime peak
            scale = 1 if sys.platform == "darwin" else 1024
            self.rss_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
            self.rss_method = "getrusage ru_maxrss (process lifetime)"
        return False

    def to_dict(self) -> dict:
        return {"peak_rss_bytes": self.rss_bytes, "peak_rss_method": self.rss_method,
                "peak_gpu_allocated_bytes": self.gpu_allocated_bytes,
                "peak_gpu_reserved_bytes": self.gpu_reserved_bytes}


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --- FLOPs and peak ------------------------------------------------------------------------------


def forward_flops(model: nn.Module, shape: tuple[int, int, int], batch: int = 1) -> int:
    """FLOPs of one forward of ``model`` on ``(batch, 4, *shape)``, counted on a meta-device copy."""
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(model.config)
    meta = build_model(config.pop("arch"), config, device="meta").eval()
    x = torch.empty((batch, 4, *shape), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x)
    return int(counter.get_total_flops())


def measure_peak(device: torch.device, seconds: float = 0.5) -> dict:
    """Achieved GFLOP/s of a large matmul and a large conv3d, float32 and bfloat16, on ``device``.

    Sizes are big enough to reach the kernels' best throughput yet run in ``seconds`` each; the
    best of them is this device's measured peak (a floor for the hardware's true peak).
    """
    big = device.type == "cuda"
    n = 8192 if big else 1024
    conv_shape = (1, 64, 64, 128, 128) if big else (1, 32, 32, 64, 64)
    results = {}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        results[f"matmul_{label}_gflops"] = _throughput(lambda: a @ b, 2 * n**3, device, seconds)
        x = torch.randn(conv_shape, device=device, dtype=dtype)
        conv = nn.Conv3d(conv_shape[1], conv_shape[1], 3, padding=1, bias=False).to(device, dtype)
        flops = 2 * conv_shape[1] ** 2 * 27 * int(np.prod(conv_shape[2:]))
        with torch.inference_mode():
            results[f"conv3d_{label}_gflops"] = _throughput(lambda: conv(x), flops, device, seconds)

    results["peak_gflops"] = max(results.values())
    results["matmul_size"] = n
    results["conv3d_input"] = list(conv_shape)
    return results


def _throughput(fn, flops: int, device: torch.device, seconds: float) -> float:
    fn()  # warm-up: kernel choice and allocation
    synchronize(device)
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return round(flops * count / elapsed / 1e9, 2)
