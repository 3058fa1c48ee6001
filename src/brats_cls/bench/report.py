"""The human-readable table of a ``brats-cls bench`` result (presentation only)."""

from __future__ import annotations

from .case import STAGES


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def format_report(result: dict) -> str:
    """The human-readable table of a :func:`bench_case` result."""
    machine = result["machine"]
    config = result["config"]
    lines = [
        f"brats-cls bench  {result['date']}  commit {result['commit']}",
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads){', ' + machine['gpu'] if 'gpu' in machine else ''}; "
        f"load average {' '.join(f'{v:.2f}' for v in machine['load_average'])} at start, "
        f"{' '.join(f'{v:.2f}' for v in machine.get('load_average_end', machine['load_average']))} at end",
        f"case {tuple(config['shape'])} -> cropped+padded {tuple(result['case']['crop_padded_shape'])}; "
        f"{config['models']} model(s) [{config['size']}, {config['weights']}] x {config['flips']} flip(s) "
        f"on {result['device']}",
        f"FLOPs per case {result['flops']['per_case'] / 1e9:.1f} GFLOP; measured peak "
        f"{result['peak']['peak_gflops']:.1f} GFLOP/s (matmul fp32 {result['peak']['matmul_fp32_gflops']:.1f}, "
        f"bf16 {result['peak']['matmul_bf16_gflops']:.1f}; conv3d fp32 {result['peak']['conv3d_fp32_gflops']:.1f}, "
        f"bf16 {result['peak']['conv3d_bf16_gflops']:.1f})",
        "",
    ]
    runs = [("shipped " + run["label"], run) for run in result.get("variants", [])]
    if "naive" in result and "error" not in result["naive"]:
        naive = result["naive"]
        runs.append((f"naive ({naive['models']} model(s))", naive))
    if not runs:
        return "\n".join(lines + format_engines(result.get("engines", [])))
    header = f"{'stage (s)':14s}" + "".join(f"{name[:28]:>30s}" for name, _ in runs)
    lines.append(header)
    for stage in STAGES:
        lines.append(f"{stage:14s}" + "".join(f"{run['stages'][stage]:30.3f}" for _, run in runs))
    lines.append(f"{'total':14s}" + "".join(f"{run['seconds_total']:30.3f}" for _, run in runs))
    lines.append(f"{'non-forward %':14s}" + "".join(f"{100 * run['non_forward_fraction']:30.1f}" for _, run in runs))
    lines.append(f"{'GFLOP/s':14s}" + "".join(f"{run['achieved_gflops']:30.2f}" for _, run in runs))
    lines.append(f"{'% of peak':14s}" + "".join(f"{100 * run['fraction_of_peak']:30.1f}" for _, run in runs))
    lines.append(f"{'peak RSS':14s}" + "".join(f"{_gib(run['peak_rss_bytes']):>30s}" for _, run in runs))
    lines.append(f"{'peak GPU':14s}" + "".join(f"{_gib(run['peak_gpu_allocated_bytes']):>30s}" for _, run in runs))
    lines.append("")
    for run in result["variants"]:
        per_model = ", ".join(f"{call['name']} {sum(call['seconds']):.2f}" for call in run["forward_calls"])
        lines.append(f"forward per model ({run['label']}): {per_model}")
    if "naive" in result:
        naive = result["naive"]
        if "error" in naive:
            lines.append(f"naive path: {naive['error']}")
        else:
            how = (f"extrapolated from {naive['models']} to {config['models']} models"
                   if naive["extrapolated"] else "measured")
            lines.append(f"naive case {naive['seconds_case_estimate']:.2f} s ({how}); "
                         f"naive / shipped = {result['naive_over_shipped']:.2f}")
            if "labels_agreement_with_shipped" in naive:
                lines.append(f"voxels labelled alike by naive and shipped: {100 * naive['labels_agreement_with_shipped']:.4f} %")
    for run in result["variants"][1:]:
        lines.append(f"{run['label']}: {run['seconds_total']:.2f} s = {run['over_reference']:.2f} x the first variant; "
                     f"voxels labelled alike: {100 * run['labels_agreement_with_first']:.4f} %")
    for row in result.get("training", []):
        if "error" in row:
            lines.append(f"training {row['arch']:6s} workers {row['workers']}: {row['error']}")
            continue
        lines.append(f"training {row['arch']:6s} {row['size']} crop {tuple(row['crop'])} batch {row['batch_size']} "
                     f"workers {row['workers']} {row['precision']}{' channels_last_3d' * bool(row.get('channels_last'))}: data {row['data_samples_per_s']:.2f} samples/s, "
                     f"step {row['step_samples_per_s']:.2f} samples/s")
    if result.get("engines"):
        lines += [""] + format_engines(result["engines"])
    return "\n".join(lines)


def _dice(values: dict) -> str:
    return "/".join(f"{value:.4f}" for value in values.values())


def format_engines(rows: list[dict]) -> list[str]:
    """The engines side by side (:func:`~.engines.bench_engines`), one line each, then their notes."""
    header = (f"{'engine':22s}{'first case s':>13s}{'steady s':>10s}{'one-off s':>10s}{'warm-cache s':>13s}"
              f"{'peak RSS':>11s}{'eager/this':>11s}{'identical %':>13s}  Dice vs eager WT/TC/ET")
    lines = ["engines (the first case pays the one-off costs; steady: the same case again)", header]
    notes = []
    for row in rows:
        if "error" in row:
            lines.append(f"{row['label']:22s}  {row['error']}")
            continue
        warm = row.get("seconds_first_case_warm_cache")
        peak = max(row["peak_rss_bytes_first_case"], row["peak_rss_bytes_steady"])
        lines.append(f"{row['engine'] + ' ' + row['precision']:22s}{row['seconds_first_case']:13.2f}"
                     f"{row['seconds_steady']:10.2f}{row['one_off_seconds']:10.2f}"
                     f"{'-' if warm is None else f'{warm:.2f}':>13s}{_gib(peak):>11s}"
                     f"{row.get('reference_over_this', float('nan')):11.2f}"
                     f"{100 * row.get('identical_voxels', float('nan')):13.4f}  {_dice(row.get('dice_vs_reference', {}))}")
        one_off = row["one_off"]
        notes.append(f"{row['label']}: one-off export {one_off['export_seconds']:.2f} s, load {one_off['load_seconds']:.2f} s, "
                     f"first calls {one_off['first_call_seconds']:.2f} s ({one_off['exported']} exported, "
                     f"{one_off['from_cache']} from cache, {one_off['rejected']} not shareable)"
                     + (f"; Dice vs truth WT/TC/ET {_dice(row['dice_vs_truth'])}" if "dice_vs_truth" in row else "")
                     + (f", minus eager fp32 {_dice(row['dice_vs_truth_minus_reference'])}"
                        if "dice_vs_truth_minus_reference" in row else ""))
    return lines + notes
