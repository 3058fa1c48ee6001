"""Benchmarks: one phantom case through the ensemble stage by stage (shipped against naive), training
throughput, machine facts. Figures are printed and written as JSON, never asserted.

Modules: :mod:`.machine` (probes, FLOPs, peak), :mod:`.case` (the shipped and naive case runs),
:mod:`.training` (training throughput), :mod:`.run` (the whole benchmark), :mod:`.report` (the text
table) and :mod:`.cli` (the command, registered by :mod:`brats_cls.cli`).
"""

from .case import STAGES, BenchConfig, Variant, extrapolate_naive
from .machine import forward_flops
from .run import bench_case
from .training import training_throughput

__all__ = ["STAGES", "BenchConfig", "Variant", "bench_case", "extrapolate_naive", "forward_flops", "training_throughput"]
