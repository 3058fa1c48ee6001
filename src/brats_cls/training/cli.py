"""The ``preprocess`` and ``train`` commands: parse, call one function, map errors to exit codes.

Exit codes: 0 done; 1 some cases could not be cached; 2 unusable input found before any work (no
labelled case, a case without its label, a malformed case, an output folder that is not writable,
a bad option).

Decisions:

* **``train`` without ``--arch``** trains both networks of the fold, BiFPN then UNet++, one after the
  other into ``OUT/bifpn-fold<N>`` and ``OUT/unetpp-fold<N>`` (the ensemble's two models of that fold).
  ``--resume`` applies to each separately: a finished run is left as it is, an interrupted one
  continues from its ``last.pt``, a missing one starts. Every option is checked for both networks
  before any work; the first network that fails stops the command with its exit status.
* **Shared memory** (:func:`loader_workers`): DataLoader workers hand every batch to the training
  process through ``/dev/shm``, and Docker gives a container 64 MiB of it unless ``--shm-size`` says
  otherwise. Up to ``prefetch_factor`` (2) batches per worker are in flight, plus the one being
  trained on, so the command asks for ``(2 x workers + 1) x batch bytes`` free in ``/dev/shm`` (times
  the processes ``torchrun`` starts on this node), a batch being ``batch x (4 image + 3 region
  channels) x crop voxels x 4 bytes`` plus the slice labels: 168 MiB for the paper BiFPN (4 x 96 x
  128 x 128), 112 MiB for the paper UNet++ (2 x 128^3), 1.75 MiB for ``tiny``; so the default two
  workers need 840 MiB and 560 MiB with the paper recipes (``--shm-size 2g`` is ample), 8.8 MiB with
  ``tiny``. With less free, the command trains with 0 workers (the training process prepares the data
  itself: slower, never a crash) and says so on stderr, naming ``--shm-size``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from ..cases import CaseError
from ..device import PRECISIONS
from ..models.registry import build_model
from .data import CacheBuildError, TrainingDataError, labelled_cases, preprocess_dataset
from .loop import TrainingDiverged, TrainOptions, check_writable, train
from .recipe import Recipe

#: The order in which ``train`` without ``--arch`` trains a fold's networks.
ARCHS = ("bifpn", "unetpp")
#: Batches a DataLoader worker keeps ready (torch's default ``prefetch_factor``).
PREFETCH_FACTOR = 2


def _default_folder(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or fallback)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def batch_bytes(recipe: Recipe) -> int:
    """Bytes of one training batch as the DataLoader collates it: float32 ``image`` (4 channels),
    ``regions`` (3 channels) and ``slices`` (3 x crop depth) per sample."""
    depth = recipe.crop[0]
    return recipe.batch_size * 4 * (7 * math.prod(recipe.crop) + 3 * depth)


def shm_needed(recipe: Recipe, workers: int, processes: int = 1) -> int:
    """Free ``/dev/shm`` bytes that ``workers`` DataLoader workers per process need (see module docstring)."""
    return 0 if workers == 0 else processes * (PREFETCH_FACTOR * workers + 1) * batch_bytes(recipe)


def shm_free(folder: Path = Path("/dev/shm")) -> int:
    """Bytes free in ``folder`` (0 when it is missing: then workers could not share tensors at all)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def loader_workers(requested: int, recipe: Recipe, free: int, processes: int = 1) -> tuple[int, str | None]:
    """The DataLoader workers to use: ``requested`` when ``free`` bytes of shared memory carry them,
    else 0, with the warning to print."""
    needed = shm_needed(recipe, requested, processes)
    if needed <= free:
        return requested, None
    mib = 1024 * 1024
    return 0, (f"Warning: /dev/shm has {free / mib:.1f} MiB free, but {requested} data-loader worker(s) need "
               f"{needed / mib:.1f} MiB for batches of {recipe.batch_size} x {'x'.join(map(str, recipe.crop))} "
               f"crops; training with --workers 0 instead (slower). In Docker, give the container more "
               f"shared memory, e.g. --shm-size {max(1, math.ceil(2 * needed / 1024 ** 3))}g.")


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


def _parent(init: Path | None, arch: str, fold: int) -> Path | None:
    """``--init``: the file itself, or ``<arch>_fold<N>.pt`` of a folder (TrainingDataError if absent)."""
    if init is None or not init.is_dir():
        return init
    path = init / f"{arch}_fold{fold}.pt"
    if not path.is_file():
        raise TrainingDataError(f"--init {init}: no {path.name} in it for {arch} fold {fold}")
    return path


def _folder_option(name: str, help_text: str, required: bool = False):
    return click.option(f"--{name}", f"{name}_dir", type=click.Path(path_type=Path), default=None, required=required,
                        help=help_text)


@click.command("preprocess")
@_folder_option("data", "Folder of labelled cases (default: $BRATS_DATA, else /data).")
@_folder_option("cache", "Cache folder to fill; cases already cached and intact are skipped.", required=True)
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
@_folder_option("data", "Folder of labelled cases, cached into OUT/cache first (default: $BRATS_DATA, else /data).")
@_folder_option("cache", "A cache from `brats-cls preprocess` (instead of --data).")
@click.option("--fold", type=click.IntRange(0, 4), default=0, show_default=True, help="Validation fold.")
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="One network; without it, both: bifpn, then unetpp.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: $BRATS_OUTPUT, else /output); each run goes to OUT/<arch>-fold<N>.")
@click.option("--size", default="paper", show_default=True, help="paper, demo, tiny, or a JSON file of hyper-parameters.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: the recipe's (200).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 4 (BiFPN), 2 (UNet++).")
@click.option("--resume", is_flag=True, help="Continue each network from OUT/<arch>-fold<N>/last.pt.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Data-loader processes; 0 when /dev/shm is too small for them (a warning says so).")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights, sampling and augmentation seed.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the 5-fold split.")
@click.option("--val-every", type=click.IntRange(min=1), default=1, show_default=True, help="Validate every K epochs.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None,
              help="Fixed steps per epoch (default: one pass over the training cases).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 where the device computes it natively, else fp16 on CUDA, else fp32.")
@click.option("--init", "init", type=click.Path(exists=True, path_type=Path), default=None,
              help="Warm start from a saved model of the same network: a file, or a folder holding "
                   "<arch>_fold<N>.pt (e.g. weights/).")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Base learning rate (default: the recipe's, 1e-3).")
@click.option("--region-weights", "region_weights", type=click.FloatRange(min=0, min_open=True), nargs=3,
              default=None, help="WT TC ET weights of the segmentation loss terms (default: 1 1 1, the paper's).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def train_command(data_dir, cache_dir, fold, arch, out_dir, size, epochs, batch_size, resume, device, workers,
                  seed, split_seed, val_every, steps_per_epoch, precision, init, learning_rate, region_weights,
                  quiet) -> None:
    """Train one cross-validation fold with the paper's recipe: one network, or both (BiFPN, then UNet++)."""
    out_dir = out_dir or _default_folder("BRATS_OUTPUT", "/output")
    if cache_dir is None:
        data_dir = data_dir or _default_folder("BRATS_DATA", "/data")
    elif data_dir is not None:
        _fail("give --data or --cache, not both", 2)
    archs = (arch,) if arch else ARCHS
    runs = []
    try:
        if data_dir is not None:
            labelled_cases(data_dir)
        check_writable(out_dir)
        size = _size(size)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        for name in archs:
            options = TrainOptions(arch=name, size=size, fold=fold, epochs=epochs, batch_size=batch_size,
                                   seed=seed, split_seed=split_seed, workers=workers, val_every=val_every,
                                   steps_per_epoch=steps_per_epoch, device=device, progress=not quiet,
                                   precision=precision, init=_parent(init, name, fold),
                                   learning_rate=learning_rate, region_weights=region_weights or None)
            recipe = options.recipe()
            build_model(name, options.size, device="meta")  # bad hyper-parameters fail here, before any work
            usable, warning = loader_workers(workers, recipe, shm_free(), processes)
            if warning:
                click.echo(f"{name}: {warning}", err=True)
            runs.append(replace(options, workers=usable))
    except (TrainingDataError, ValueError) as error:
        _fail(str(error), 2)
    for options in runs:
        if len(runs) > 1:
            click.echo(f"training {options.arch} fold {fold} into {out_dir / f'{options.arch}-fold{fold}'}")
        try:
            result = train(options, out_dir, cache_dir=cache_dir, data_dir=data_dir, resume=resume)
        except TrainingDataError as error:
            _fail(f"{options.arch}: {error}", 2)
        except (CacheBuildError, CaseError) as error:
            _fail(f"{options.arch}: {error}", 1)
        except TrainingDiverged as error:
            hint = "" if options.precision == "fp32" else "; try --precision fp32, then --resume"
            _fail(f"{options.arch}: {error}{hint}", 1)
        if result.history:
            click.echo(f"{result.run_dir}: {len(result.history)} epoch(s), best mean validation Dice "
                       f"{result.best_score:.4f}")
