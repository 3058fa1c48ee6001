"""Command line: a thin click group. Each command parses, calls one function, maps errors to exit codes.

Exit codes: 0 success; 1 some work failed (e.g. a case), the rest done; 2 usage error before any work.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from . import __version__
from .bench.cli import bench_command
from .cases import find_cases, parse_shard
from .cliutil import tta_option, weights_option
from .device import DEVICES, PRECISIONS
from .engines import ENGINE_CHOICES, INFER_ENGINE
from .evaluate.cli import evaluate_command
from .inference import RunOptions
from .models.cli import models_command
from .parallel import EnsembleRun, EnsembleSpec, MemoryShortage, choose_devices, memory_limit
from .synth.cli import synth_command
from .training.cli import preprocess_command, train_command
from .weights import WeightsError, default_weights_dir


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="brats-cls")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """BraTS tumour segmentation with an additional slice classification network."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _shard(_context, _parameter, value: str | None):
    """``--shard K/N`` (:mod:`brats_cls.parallel`), None when not given."""
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _writable_folder(path: Path, what: str) -> None:
    """Exit 2 (usage error) unless ``path`` is an existing folder this process can write into."""
    if not path.is_dir():
        raise click.UsageError(f"{what} folder {path} does not exist")
    try:
        tempfile.TemporaryFile(dir=path).close()  # unnamed where the file system allows: nothing to leave behind
    except OSError as error:
        raise click.UsageError(f"{what} folder {path} is not writable: {error.strerror}") from None


@main.command("infer")
@click.option("--input", "input_dir", type=click.Path(path_type=Path), default=lambda: os.environ.get("INPUT_DIR", "/input"),
              show_default="$INPUT_DIR or /input", help="Case folders, or one case's four files lying flat.")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), default=lambda: os.environ.get("OUTPUT_DIR", "/output"),
              show_default="$OUTPUT_DIR or /output", help="Receives exactly one <ID>.nii.gz per case, nothing else.")
@weights_option("Weights folder with manifest.json [default: $BRATS_CLS_WEIGHTS or the shipped weights/].")
@tta_option("Average over the 8 flips of (D, H, W).")
@click.option("--cls-suppression/--no-cls-suppression", default=True, show_default=True,
              help="Erase slices that the slice classifier calls negative, per region (the paper's method).")
@click.option("--label-scheme", type=click.Choice(["auto", "2021", "2023"]), default="auto", show_default=True,
              help="Labels written: 2021 (ET=4) or 2023 (ET=3); auto follows the case's file naming.")
@click.option("--et-min-voxels", type=click.IntRange(min=0), default=0, show_default=True,
              help="Below this many enhancing voxels in a case, relabel them as necrosis (0: off).")
@click.option("--models", "model_selection", default=None, help="Comma list of models: names, archs or arch:fold.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 where the device computes it natively, else fp16 on CUDA, else fp32.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Folder (never the output folder) for a JSON report and a QC picture per case.")
@click.option("--failures", "failures_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSON file (outside the output folder) listing written, skipped and failed cases.")
@click.option("--skip-existing", is_flag=True, help="Skip cases whose output exists and is a valid mask on the right grid.")
@click.option("--shard", type=str, default=None, callback=_shard, metavar="K/N",
              help="Only shard K of N (numbered from 1): case i of the sorted IDs goes to shard (i mod N) + 1.")
@click.option("--devices", "devices_spec", default="auto", show_default=True,
              help="Workers: auto (one per CUDA device when several are visible), a count, or a list "
                   "such as cuda:0,cuda:1 or cpu,cpu; one device: one process.")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default=INFER_ENGINE, show_default=True,
              help="What runs the networks: auto (openvino on the CPU in float32 or native bfloat16, else eager), eager PyTorch, "
                   "eager-cl (channels_last_3d), compile (torch.compile), onnxruntime or openvino (CPU only; "
                   "exported per input shape, cached under --engine-cache).")
@click.option("--engine-cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder of exported graphs [default: $BRATS_CLS_ENGINE_CACHE, else <tmp>/brats-cls-engine-cache].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def infer_command(input_dir, output_dir, weights_dir, tta, cls_suppression, label_scheme, et_min_voxels,
                  model_selection, device, precision, report_dir, failures_path, skip_existing, shard, devices_spec,
                  engine, engine_cache, quiet):
    """Segment every case under INPUT into OUTPUT/<ID>.nii.gz with the model ensemble."""
    if not input_dir.is_dir():
        raise click.UsageError(f"input folder {input_dir} does not exist")
    _writable_folder(output_dir, "output")
    for extra, what in ((report_dir, "--report"), (failures_path and failures_path.parent, "--failures")):
        if extra is not None and extra.resolve() == output_dir.resolve():
            raise click.UsageError(f"{what} must not be in the output folder: the platforms reject extra files there")
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
    discovery = find_cases(input_dir)
    if not discovery.cases and not discovery.errors:
        raise click.UsageError(f"no BraTS case found in {input_dir}")
    if shard is not None:
        discovery = shard.select(discovery)
    try:
        devices, warning = choose_devices(devices_spec, device, memory_limit())
        spec = EnsembleSpec(weights_dir or default_weights_dir(), model_selection, tta, precision, cls_suppression,
                            label_scheme, et_min_voxels, engine, engine_cache)
        ensemble = EnsembleRun.prepare(spec, devices)
    except (WeightsError, MemoryShortage, ValueError) as error:  # ValueError: a bad checkpoint, device or precision
        raise click.UsageError(str(error)) from None
    if warning:
        click.echo(warning, err=True)
    options = RunOptions(skip_existing=skip_existing, report_dir=report_dir, failures_path=failures_path,
                         progress=not quiet, shared_output=shard is not None)
    summary = ensemble.run(discovery, output_dir, options)
    done = len(summary.written)
    per_case = summary.seconds / max(done, 1)
    failed = ", ".join(sorted(summary.failed)) or "none"
    part = f"shard {shard}: " if shard is not None else ""
    click.echo(f"{part}{done} case(s) written, {len(summary.skipped)} skipped, {len(summary.failed)} failed ({failed}); "
               f"{ensemble.describe()}; {per_case:.1f} s per case")
    sys.exit(summary.exit_code)


main.add_command(synth_command, "synth")
main.add_command(evaluate_command, "evaluate")
main.add_command(models_command, "models")
main.add_command(preprocess_command, "preprocess")
main.add_command(train_command, "train")
main.add_command(bench_command, "bench")
