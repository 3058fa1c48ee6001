"""The ``preprocess`` and ``train`` commands: parse, call one function, map errors to exit codes.

Exit codes: 0 done; 1 some cases could not be cached; 2 unusable input found before any work (no
labelled case, a case without its label, a malformed case, an output folder that is not writable,
a bad option).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..cases import CaseError
from ..models.registry import build_model
from .data import CacheBuildError, TrainingDataError, labelled_cases, preprocess_dataset
from .loop import TrainOptions, check_writable, train


def _default_folder(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or fallback)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _size(value: str) -> str | dict:
    """A preset name, or a JSON file of hyper-parameters."""
    if value in ("paper", "demo", "tiny"):
        return value
    path = Path(value)
    try:
        size = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise click.BadParameter(f"not a preset (paper, demo, tiny) nor a readable JSON file: {error}") from None
    if not isinstance(size, dict):
        raise click.BadParameter(f"{path} must hold a JSON object of hyper-parameters")
    return size


@click.command("preprocess")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of labelled cases (default: $BRATS_DATA, else /data).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), required=True,
              help="Cache folder to fill; cases already cached and intact are skipped.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def preprocess_command(data_dir: Path | None, cache_dir: Path, quiet: bool) -> None:
    """Crop, normalise and cache every labelled case for training."""
    data_dir = data_dir or _default_folder("BRATS_DATA", "/data")
    try:
        labelled_cases(data_dir)
        check_writable(cache_dir)
        entries = preprocess_dataset(data_dir, cache_dir, progress=not quiet)
    except TrainingDataError as error:
        _fail(str(error), 2)
    except (CacheBuildError, CaseError) as error:
        _fail(str(error), 1)
    click.echo(f"{len(entries)} case(s) cached in {cache_dir}")


@click.command("train")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of labelled cases, cached into OUT/cache first (default: $BRATS_DATA, else /data).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="A cache from `brats-cls preprocess` (instead of --data).")
@click.option("--fold", type=click.IntRange(0, 4), default=0, show_default=True, help="Validation fold.")
@click.option("--arch", type=click.Choice(["bifpn", "unetpp"]), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: $BRATS_OUTPUT, else /output); the run goes to OUT/<arch>-fold<N>.")
@click.option("--size", default="paper", show_default=True, help="paper, demo, tiny, or a JSON file of hyper-parameters.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: the recipe's (200).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 4 (BiFPN), 2 (UNet++).")
@click.option("--resume", is_flag=True, help="Continue from OUT/<arch>-fold<N>/last.pt.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data-loader processes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights, sampling and augmentation seed.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the 5-fold split.")
@click.option("--val-every", type=click.IntRange(min=1), default=1, show_default=True, help="Validate every K epochs.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None,
              help="Fixed steps per epoch (default: one pass over the training cases).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: float16 AMP on CUDA, float32 on CPU; bf16: bfloat16 autocast on either.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def train_command(data_dir, cache_dir, fold, arch, out_dir, size, epochs, batch_size, resume, device, workers,
                  seed, split_seed, val_every, steps_per_epoch, precision, quiet) -> None:
    """Train one cross-validation fold of one network with the paper's recipe."""
    out_dir = out_dir or _default_folder("BRATS_OUTPUT", "/output")
    if cache_dir is None:
        data_dir = data_dir or _default_folder("BRATS_DATA", "/data")
    elif data_dir is not None:
        _fail("give --data or --cache, not both", 2)
    try:
        if data_dir is not None:
            labelled_cases(data_dir)
        check_writable(out_dir)
        options = TrainOptions(arch=arch, size=_size(size), fold=fold, epochs=epochs, batch_size=batch_size,
                               seed=seed, split_seed=split_seed, workers=workers, val_every=val_every,
                               steps_per_epoch=steps_per_epoch, device=device, progress=not quiet,
                               precision=precision)
        options.recipe()
        build_model(arch, options.size, device="meta")  # bad hyper-parameters fail here, before any work
    except (TrainingDataError, ValueError) as error:
        _fail(str(error), 2)
    try:
        result = train(options, out_dir, cache_dir=cache_dir, data_dir=data_dir, resume=resume)
    except TrainingDataError as error:
        _fail(str(error), 2)
    except (CacheBuildError, CaseError) as error:
        _fail(str(error), 1)
    if result.history:
        click.echo(f"{result.run_dir}: {len(result.history)} epoch(s), best mean validation Dice {result.best_score:.4f}")
