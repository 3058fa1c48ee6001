"""``brats-cls bench``: parses, runs :func:`~.run.bench_case`, prints :func:`~.report.format_report`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ..cliutil import shape_callback, tta_option, weights_option
from ..device import DEVICES
from ..io import write_json_atomically
from ..synth import BRATS_SHAPE
from ..weights import WeightsError
from .case import BenchConfig, Variant
from .engines import parse_engines
from .report import format_report
from .run import bench_case

QUICK_SHAPE = (48, 64, 64)


@click.command("bench")
@click.option("--size", type=click.Choice(["paper", "demo", "tiny"]), default="demo", show_default=True,
              help="Preset of the random-initialised models.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--models", "model_count", type=click.IntRange(min=1), default=None,
              help="Number of models, archs alternating [default: 10; with --weights: all].")
@weights_option("A real weights folder (manifest.json) instead of random weights.")
@click.option("--shape", default=None, callback=shape_callback,
              help="Phantom case shape D,H,W [default: 155,240,240; --quick: 48,64,64].")
@tta_option("8 flips, or the identity only.")
@click.option("--variant", "variant_specs", multiple=True,
              help="Shipped-path variant, repeatable: precision=auto|fp32|bf16|fp16,flip_batch=N,channels_last=0|1,"
                   "cudnn_benchmark=0|1. The first is the reference. [default: one, all defaults]")
@click.option("--naive-models", type=click.IntRange(min=0), default=None,
              help="Models in the naive comparison (0: none; fewer than --models: extrapolated) [default: all].")
@click.option("--no-warmup", is_flag=True, help="Time the first forward too (kernel choice, allocation).")
@click.option("--training", is_flag=True, help="Also measure training throughput (data pipeline, full step).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Cache from `brats-cls preprocess` for --training [default: two phantom cases].")
@click.option("--training-steps", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--workers", "training_workers", type=click.IntRange(min=0), multiple=True,
              help="DataLoader workers for --training, repeatable [default: 0].")
@click.option("--training-variant", "training_specs", multiple=True,
              help="--training variant, repeatable: precision=auto|fp32|bf16|fp16,channels_last=0|1 [default: auto].")
@click.option("--quick", is_flag=True,
              help="Smoke test: tiny models, a 48x64x64 case, 2 models, naive on 1 model (extrapolated).")
@click.option("--engine", "engine_specs", multiple=True,
              help="Engines side by side, repeatable or a comma list of NAME[:PRECISION] (eager, eager-cl, compile, "
                   "onnxruntime, openvino; precision fp32 unless named, e.g. openvino:bf16); eager fp32 runs first as "
                   "the reference. Each: first case (one-off costs), steady case, peak RSS, masks against eager fp32. "
                   "Without --variant, only this phase runs.")
@click.option("--engine-cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Engine cache folder shared by the engines [default: an empty one per engine, so the first case "
                   "pays the export].")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the results as JSON.")
def bench_command(size, device, model_count, weights_dir, tta, shape, variant_specs, naive_models, no_warmup,
                  training, cache_dir, training_steps, training_workers, training_specs, quick, engine_specs,
                  engine_cache, json_path):
    """Time one phantom case through the ensemble, stage by stage, shipped path against a naive one, or
    engine against engine (--engine)."""
    try:
        engines = parse_engines(engine_specs)
        variants = [Variant.parse(spec) for spec in variant_specs] or ([] if engines else [Variant()])
        training_variants = [Variant.parse(spec) for spec in training_specs] or [Variant()]
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if quick:
        size = "tiny"
        model_count = model_count or 2
        naive_models = 1 if naive_models is None else naive_models
        training_steps = min(training_steps, 2)
    config = BenchConfig(
        size=size, device=device, models=model_count or (0 if weights_dir else 10), weights_dir=weights_dir,
        tta=tta, shape=shape or (QUICK_SHAPE if quick else BRATS_SHAPE), variants=variants,
        naive_models=naive_models, warmup=not no_warmup,
        peak_seconds=0.2 if quick else 0.5, training=training, training_steps=training_steps,
        training_workers=tuple(training_workers) or (0,), training_variants=training_variants, cache_dir=cache_dir,
        engines=engines, engine_cache=engine_cache,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="brats-cls-bench-") as work:
            result = bench_case(config, Path(work), progress=lambda text: click.echo(text, err=True),
                                save=lambda partial: _save(partial, json_path))
    except (ValueError, WeightsError) as error:  # e.g. --device cuda without CUDA, a bad weights folder
        raise click.UsageError(str(error)) from None
    _save(result, json_path)
    click.echo(format_report(result))
    if json_path is not None:
        click.echo(f"results written to {json_path}")


def _save(result: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, result)
