"""The training loop of section 3.2: Adam, warm-up + cosine/polynomial decay per batch, mixed precision,
DistributedDataParallel under ``torchrun``, per-epoch checkpoints, validation, CSV log and curves.

Output layout (``--out``): ``splits.json`` (the 5 folds, shared by every run in the folder) and one
folder per run, ``<arch>-fold<N>/``, holding ``last.pt``, ``best.pt``, ``log.csv``, ``curves.png`` and
``run.json``, so the ten models of the paper's ensemble can live side by side.

Decisions where the paper is silent:

* **Precision** (``precision``, :mod:`brats_cls.device`): ``auto`` is bfloat16 autocast where the
  device computes it natively, else float16 with a GradScaler on CUDA (the AMP of PyTorch 1.6 that the
  paper used), else float32. Losses are computed in float32 and the weights stay float32 in every mode.
* **Budget**: an epoch is one pass over the training cases (the paper's), or ``steps_per_epoch``
  optimiser steps when the recipe or ``--steps-per-epoch`` fixes it; the schedule, warm-up included,
  runs over ``epochs x steps per epoch`` optimiser steps.
* **Randomness**: the global torch generator (dropout, worker seeds) is reseeded at the start of every
  epoch from ``(seed, epoch, rank)`` and augmentation draws from generators seeded by
  ``(seed, epoch, sample)``; so the RNG state at an epoch boundary *is* ``(seed, epoch)``, which
  ``last.pt`` stores, and ``--resume`` continues bit-for-bit on the same hardware.
* **Splits**: folds come from the sorted case IDs and ``split_seed`` (default 0, not ``--seed``), so
  runs with different training seeds share folds; an existing ``splits.json`` that disagrees is an error.
* **Validation**: every ``val_every`` epochs and after the last, on whole cropped volumes through the
  same :class:`brats_cls.predictor.Predictor` that inference uses (this one network, no TTA), once
  without and once with the classifier suppression. ``best.pt`` keeps the highest mean Dice over
  (WT, TC, ET) *with* suppression, the configuration that ``brats-cls infer`` runs.
* **Warm start** (``init``): the weights of a saved model of the same network (a shipped model, a
  ``best.pt``) replace the seeded initial ones; optimiser, schedule and warm-up start afresh over the
  run's own steps. ``run.json`` and the checkpoints record the parent's file name and sha256, and
  ``--resume`` refuses a ``last.pt`` that grew from another parent (docs/design.md#warm-start).
* **Distributed**: only rank 0 writes; every rank validates its share of the validation cases and the
  sums are all-reduced. ``--resume`` reads ``last.pt`` on every rank (a shared file system).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..device import resolve_device, resolve_precision
from ..io import write_bytes_atomically, write_json_atomically
from ..models.registry import build_model, load_model, save_model
from ..predictor import Predictor
from ..regions import REGIONS, dice_score
from ..weights import sha256_of
from .data import CropDataset, EpochSampler, TrainingDataError, make_folds, open_cache, preprocess_dataset, split_fold
from .distributed import Distributed, all_reduce, setup_distributed
from .history import VALIDATION_KINDS, plot_curves, write_log
from .losses import LOSS_TERMS
from .recipe import Recipe, recipe_for
from .schedules import warmup_epochs
from .step import TrainStep

log = logging.getLogger(__name__)

LAST_FORMAT = "brats-cls-train-state/2"
#: Fields of the run that ``--resume`` must find unchanged (the rest may differ: device, workers, ...).
RESUME_FIXED = ("arch", "size", "fold", "seed", "split_seed", "recipe", "init")


class TrainingDiverged(RuntimeError):
    """Every step of an epoch had a non-finite loss or gradient (see :mod:`.step`)."""


@dataclass
class TrainOptions:
    """One training run. ``size`` is a preset name or a hyper-parameter dict; ``None`` fields take
    the recipe default (see :mod:`brats_cls.training.recipe`)."""

    arch: str
    size: str | dict = "paper"
    fold: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    crop: tuple[int, int, int] | None = None
    seed: int = 0
    split_seed: int = 0
    workers: int = 2
    val_every: int = 1
    steps_per_epoch: int | None = None
    device: str = "auto"
    progress: bool = True
    precision: str = "auto"  # see brats_cls.device
    channels_last: bool = False
    init: Path | None = None  # warm start: a saved model of the same network (module docstring)
    learning_rate: float | None = None
    region_weights: tuple[float, float, float] | None = None  # WT, TC, ET loss weights (losses.py)

    def recipe(self) -> Recipe:
        return recipe_for(self.arch, self.size, epochs=self.epochs, batch_size=self.batch_size, crop=self.crop,
                          steps_per_epoch=self.steps_per_epoch, learning_rate=self.learning_rate,
                          region_weights=self.region_weights)


@dataclass
class TrainResult:
    model: nn.Module  # unwrapped, on its training device
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_score: float = -1.0


def run_name(arch: str, fold: int) -> str:
    return f"{arch}-fold{fold}"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove it writable, or raise TrainingDataError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise TrainingDataError(f"output folder {folder} is not writable: {error.strerror or error}") from None


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def load_or_write_splits(out_dir: Path, case_ids: list[str], split_seed: int, write: bool) -> list[list[str]]:
    """The folds of ``case_ids``; written to ``out_dir/splits.json`` (when ``write``), or checked
    against the one already there. Raises TrainingDataError when they disagree."""
    folds = make_folds(case_ids, seed=split_seed)
    path = out_dir / "splits.json"
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TrainingDataError(f"cannot read {path}: {error}") from None
        if existing.get("folds") != folds:
            raise TrainingDataError(
                f"{path} holds other folds than the cases and split seed {split_seed} give; use another --out or remove it")
    elif write:
        write_json_atomically(path, {"seed": split_seed, "n_folds": len(folds), "folds": folds})
    return folds


def warm_start(model: nn.Module, init: Path) -> dict:
    """Load the weights of the saved model ``init`` into ``model`` (the same network); returns what
    the run records of its parent. Raises TrainingDataError naming the file otherwise."""
    init = Path(init)
    try:
        parent, _ = load_model(init)
    except (OSError, ValueError) as error:
        raise TrainingDataError(f"--init {init}: {error}") from None
    if parent.config != model.config:
        differ = sorted(key for key in {*parent.config, *model.config} if parent.config.get(key) != model.config.get(key))
        raise TrainingDataError(f"--init {init}: another network than the one being trained (differs in {', '.join(differ)})")
    model.load_state_dict(parent.state_dict())
    return {"file": init.name, "sha256": sha256_of(init)}


def validate(model: nn.Module, entries, precision: str, ddp: Distributed) -> dict[str, float]:
    """Mean Dice per region over ``entries`` (this rank takes every world_size-th), all-reduced, without
    (``val_dice_*``) and with (``val_cls_dice_*``) the classifier suppression."""
    model.eval()
    predictor = Predictor([model], tta=False, precision=precision, suppression=False)
    kinds = list(VALIDATION_KINDS)
    sums = np.zeros((len(kinds), len(REGIONS)))
    count = 0
    for entry in entries[ddp.rank :: ddp.world_size]:
        truth = entry.load("regions", mmap=False).astype(bool)
        logits = predictor.ensemble(entry.load("image", mmap=False).astype(np.float32))
        for row, suppression in enumerate((False, True)):
            predictor.suppression = suppression
            regions = predictor.decide(logits.seg, logits.slices).regions
            sums[row] += [dice_score(regions[index], truth[index]) for index in range(len(REGIONS))]
        count += 1
    *totals, count = all_reduce([*sums.ravel().tolist(), float(count)], predictor.device, ddp)
    model.train()
    scores = {}
    for row, kind in enumerate(kinds):
        values = np.asarray(totals[row * len(REGIONS) : (row + 1) * len(REGIONS)]) / max(count, 1.0)
        scores.update({f"{kind}_{region}": float(v) for region, v in zip(REGIONS, values)})
        scores[f"{kind}_mean"] = float(values.mean())
    return scores


@dataclass
class _Run:
    """Everything one run holds between epochs."""

    options: TrainOptions
    recipe: Recipe
    run_dir: Path
    device: torch.device
    precision: str
    ddp: Distributed
    record: dict
    model: nn.Module
    stepper: TrainStep
    loader: DataLoader
    dataset: CropDataset
    sampler: EpochSampler
    validation: list
    validation_ids: list[str]
    history: list[dict] = field(default_factory=list)
    best_score: float = -1.0
    start_epoch: int = 0


def train(options: TrainOptions, out_dir: Path | str, cache_dir: Path | str | None = None,
          data_dir: Path | str | None = None, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train one fold. Give ``cache_dir`` (from ``brats-cls preprocess``) or ``data_dir`` (cached into
    ``out_dir/cache`` first). ``stop_after`` ends the run after that many epochs in total, with the
    schedule still planned for the recipe's epochs (a later ``resume`` continues it).

    Raises TrainingDataError (before any work) on unusable data, a missing cache or an output folder
    that is not writable.
    """
    out_dir = Path(out_dir)
    recipe = options.recipe()
    if options.val_every < 1:
        raise TrainingDataError("--val-every must be at least 1")
    ddp = setup_distributed(options.device)
    try:
        run = _prepare(options, recipe, out_dir, cache_dir, data_dir, resume, ddp)
        end_epoch = min(recipe.epochs, stop_after) if stop_after is not None else recipe.epochs
        for epoch in range(run.start_epoch, end_epoch):
            _train_epoch(run, epoch)
        return TrainResult(run.model, run.run_dir, run.history, run.best_score)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def _cache_entries(out_dir: Path, cache_dir, data_dir, options: TrainOptions, ddp: Distributed) -> dict:
    if data_dir is not None:
        cache_dir = out_dir / "cache"
        if ddp.is_main:
            preprocess_dataset(data_dir, cache_dir, progress=options.progress)
        if ddp.active:
            dist.barrier()
    if cache_dir is None:
        raise TrainingDataError("give a data folder or a cache folder")
    return {entry.case_id: entry for entry in open_cache(cache_dir)}


def _prepare(options, recipe, out_dir, cache_dir, data_dir, resume, ddp: Distributed) -> _Run:
    """Data, splits, model, optimiser, loader; the state of ``last.pt`` when resuming."""
    device = resolve_device(options.device, ddp.local_rank)
    precision = resolve_precision(options.precision, device, training=True)
    run_dir = out_dir / run_name(options.arch, options.fold)
    if ddp.is_main:
        check_writable(run_dir)
    entries = _cache_entries(out_dir, cache_dir, data_dir, options, ddp)
    folds = load_or_write_splits(out_dir, list(entries), options.split_seed, write=ddp.is_main)
    training_ids, validation_ids = split_fold(folds, options.fold)
    torch.manual_seed(options.seed)  # the same initial weights on every rank
    model = build_model(options.arch, options.size)
    init = warm_start(model, options.init) if options.init is not None else None
    model = model.to(device)
    dataset = CropDataset([entries[i] for i in training_ids], recipe.crop, seed=options.seed,
                          augmentation=recipe.augmentation())
    samples = recipe.steps_per_epoch * recipe.batch_size if recipe.steps_per_epoch else None
    sampler = EpochSampler(len(dataset), options.seed, ddp.rank, ddp.world_size, samples)
    loader = DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=options.workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp.active else model
    steps = len(loader)
    stepper = TrainStep(model, network, recipe, device, precision, recipe.epochs * steps,
                        warmup_epochs(recipe.epochs) * steps, options.channels_last)
    record = {"arch": options.arch, "size": options.size, "fold": options.fold, "seed": options.seed,
              "split_seed": options.split_seed, "recipe": recipe.to_dict(), "steps_per_epoch": steps,
              "warmup_epochs": warmup_epochs(recipe.epochs), "precision": precision,
              "channels_last": options.channels_last, "init": init}
    run = _Run(options, recipe, run_dir, device, precision, ddp, record, model, stepper, loader, dataset, sampler,
               [entries[i] for i in validation_ids], validation_ids)
    _resume_or_start(run, resume, training_ids)
    return run


def _resume_or_start(run: _Run, resume: bool, training_ids: list[str]) -> None:
    last_path = run.run_dir / "last.pt"
    if resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("format") != LAST_FORMAT:
            raise TrainingDataError(f"{last_path} is not a brats-cls training state ({LAST_FORMAT})")
        changed = [key for key in RESUME_FIXED if json.dumps(state["run"].get(key)) != json.dumps(run.record[key])]
        if changed:
            raise TrainingDataError(f"cannot resume from {last_path}: {', '.join(changed)} changed since it was written")
        run.model.load_state_dict(state["model"])
        run.stepper.load_state_dict(state["stepper"])
        run.start_epoch, run.history, run.best_score = int(state["epoch"]), list(state["history"]), float(state["best_score"])
        log.info("resuming %s at epoch %d", run.run_dir, run.start_epoch)
    elif resume:
        log.warning("--resume: no %s yet, starting from scratch", last_path)
    if run.ddp.is_main:
        write_json_atomically(run.run_dir / "run.json", {**run.record, "world_size": run.ddp.world_size,
                                                         "training_cases": training_ids,
                                                         "validation_cases": run.validation_ids})


def _train_epoch(run: _Run, epoch: int) -> None:
    """One epoch of steps, validation when due, the checkpoints and the log."""
    torch.manual_seed(_epoch_seed(run.options.seed, epoch, run.ddp.rank))
    run.dataset.set_epoch(epoch)
    run.sampler.set_epoch(epoch)
    run.model.train()
    started = time.perf_counter()
    sums = np.zeros(1 + len(LOSS_TERMS))
    samples = 0
    skipped_before = run.stepper.skipped
    bar = tqdm(run.loader, desc=f"{run.run_dir.name} epoch {epoch + 1}/{run.recipe.epochs}", unit="step",
               disable=not (run.options.progress and run.ddp.is_main), leave=False)
    for batch in bar:
        loss, terms = run.stepper.step(batch)
        size = batch["image"].shape[0]
        samples += size
        sums += size * np.array([loss, *(terms[name] for name in LOSS_TERMS)])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.stepper.learning_rate:.2e}",
                        samples_s=f"{samples * run.ddp.world_size / (time.perf_counter() - started):.2f}")
    bar.close()
    skipped = run.stepper.skipped - skipped_before
    if skipped == len(run.loader):
        raise TrainingDiverged(f"{run.run_dir.name}: every step of epoch {epoch + 1} had a non-finite loss or "
                               f"gradient; the last good state is {run.run_dir / 'last.pt'}")
    *sums, samples_all = all_reduce([*sums.tolist(), float(samples)], run.device, run.ddp)
    row = {"epoch": epoch + 1, "step": (epoch + 1) * len(run.loader), "loss": sums[0] / samples_all,
           "skipped_steps": skipped,
           "lr": run.stepper.learning_rate, "samples_per_s": samples_all / (time.perf_counter() - started)}
    row.update({name: sums[index] / samples_all for index, name in enumerate(LOSS_TERMS, start=1)})
    if (epoch + 1) % run.options.val_every == 0 or epoch + 1 == run.recipe.epochs:
        row.update(validate(run.model, run.validation, run.precision, run.ddp))
    row["seconds"] = time.perf_counter() - started
    run.history.append(row)
    score = row.get("val_cls_dice_mean")
    improved = score is not None and score > run.best_score
    if improved:
        run.best_score = score
    if run.ddp.is_main:
        _save_epoch(run, epoch + 1, improved)
        _announce(run, row)


def _announce(run: _Run, row: dict) -> None:
    message = f"{run.run_dir.name} epoch {row['epoch']} (step {row['step']}): loss {row['loss']:.4f}"
    if row.get("val_dice_mean") is not None:
        message += " val Dice " + " ".join(f"{r} {row[f'val_dice_{r}']:.3f}" for r in REGIONS)
        message += f"; with suppression mean {row['val_cls_dice_mean']:.3f}"
    tqdm.write(message) if run.options.progress else log.info(message)


def _save_epoch(run: _Run, epoch: int, improved: bool) -> None:
    """``last.pt`` (everything ``--resume`` needs), ``best.pt`` when improved, the log and the curves."""
    state = {"format": LAST_FORMAT, "run": run.record, "epoch": epoch, "model": run.model.state_dict(),
             "stepper": run.stepper.state_dict(), "rng": {"seed": run.options.seed, "next_epoch": epoch},
             "history": run.history, "best_score": run.best_score}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomically(run.run_dir / "last.pt", buffer.getvalue())
    if improved:
        row = run.history[-1]
        save_model(run.model, run.run_dir / "best.pt", {
            **run.record, "epoch": epoch, "step": row["step"],
            "val_dice": {region: row[f"val_dice_{region}"] for region in (*REGIONS, "mean")},
            "val_cls_dice": {region: row[f"val_cls_dice_{region}"] for region in (*REGIONS, "mean")},
            "validation_cases": run.validation_ids,
        })
    write_log(run.history, run.run_dir / "log.csv")
    plot_curves(run.history, run.run_dir / "curves.png")

