"""The training loop of section 3.2: Adam, warm-up + cosine/polynomial decay per batch, mixed
precision on CUDA, DistributedDataParallel under ``torchrun``, per-epoch checkpoints, validation,
CSV log and curves.

Output layout (``--out``): ``splits.json`` (the 5 folds, shared by every run in the folder) and one
folder per run, ``<arch>-fold<N>/``, holding ``last.pt``, ``best.pt``, ``log.csv``, ``curves.png`` and
``run.json``, so the ten models of the paper's ensemble can live side by side.

Decisions where the paper is silent:

* **Mixed precision** (``precision``): ``auto`` is float16 autocast with a GradScaler on CUDA (the AMP
  of PyTorch 1.6 that the paper used) and float32 on CPU; ``bf16`` is bfloat16 autocast without a
  scaler (its exponent range is float32's) on either device; ``fp32`` turns autocast off. Losses are
  computed in float32 and the weights stay float32 in every mode. On this project's 2-core AMX CPU a
  demo UNet++ training step (2 x 96^3) took 1.33 s in fp32 and 0.92 s in bf16, a demo BiFPN step
  0.34 s either way (``/tmp`` probe, 2026-11-28), so the shipped UNet++ folds were trained in bf16.
* **Randomness**: the global torch generator (dropout, worker seeds) is reseeded at the start of every
  epoch from ``(seed, epoch, rank)`` and augmentation draws from generators seeded by
  ``(seed, epoch, sample)``; so the RNG state at an epoch boundary *is* ``(seed, epoch)``, which
  ``last.pt`` stores, and ``--resume`` continues bit-for-bit on the same hardware.
* **Splits**: folds come from the sorted case IDs and ``split_seed`` (default 0, not ``--seed``), so
  runs with different training seeds share folds; an existing ``splits.json`` that disagrees is an error.
* **Validation**: each K epochs and after the last, on whole cropped volumes through
  :func:`brats_cls.inference.predict_case_logits` (no TTA), thresholded at 0.5 and nested by
  :func:`brats_cls.inference.decide_regions` without classifier suppression; Dice per region, 1 when
  truth and prediction are both empty. ``best.pt`` keeps the highest mean Dice over (WT, TC, ET).
* **Distributed**: only rank 0 writes; every rank validates its share of the validation cases and the
  sums are all-reduced. ``--resume`` reads ``last.pt`` on every rank (a shared file system).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
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

from ..inference import decide_regions, predict_case_logits
from ..models.registry import build_model, save_model
from ..regions import REGIONS
from .data import (CachedCase, CropDataset, EpochSampler, TrainingDataError, make_folds, open_cache,
                   preprocess_dataset, split_fold)
from .losses import LOSS_TERMS, PaperLoss
from .recipe import Recipe, recipe_for
from .schedules import make_scheduler, warmup_epochs

log = logging.getLogger(__name__)

LAST_FORMAT = "brats-cls-train-state/1"
LOG_COLUMNS = ("epoch", "loss", *LOSS_TERMS, "lr", *(f"val_dice_{r}" for r in REGIONS), "val_dice_mean",
               "seconds", "samples_per_s")
PRECISIONS = ("auto", "fp32", "bf16")
#: Fields of the run that ``--resume`` must find unchanged (the rest may differ: device, workers, ...).
RESUME_FIXED = ("arch", "size", "fold", "seed", "split_seed", "recipe", "steps_per_epoch")


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
    precision: str = "auto"  # auto | fp32 | bf16 (see the module docstring)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of this run on ``device``; None for plain float32."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.precision == "bf16":
            return torch.bfloat16
        if self.precision == "auto" and device.type == "cuda":
            return torch.float16
        return None

    def recipe(self) -> Recipe:
        return recipe_for(self.arch, self.size, epochs=self.epochs, batch_size=self.batch_size, crop=self.crop)


@dataclass
class TrainResult:
    model: nn.Module  # unwrapped, on its training device
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_score: float = -1.0


# ---------------------------------------------------------------------------- small helpers


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


def _atomic_bytes(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_torch_save(state: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _atomic_bytes(path, buffer.getvalue())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingDataError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise TrainingDataError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device("cpu")


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (the BraTS convention)."""
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_name: str) -> _Distributed:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, ...), if any."""
    if dist.is_available() and dist.is_initialized():
        return _Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    uses_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if uses_cuda:
        torch.cuda.set_device(local_rank)
    # Long timeout: rank 0 may be preprocessing the whole data set while the others wait.
    dist.init_process_group("nccl" if uses_cuda else "gloo", timeout=datetime.timedelta(hours=4))
    return _Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def _all_reduce(values: list[float], device: torch.device, ddp: _Distributed) -> list[float]:
    if not ddp.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------- splits


def load_or_write_splits(out_dir: Path, case_ids: list[str], split_seed: int, write: bool) -> list[list[str]]:
    """The folds of ``case_ids``; written to ``out_dir/splits.json`` (when ``write``), or checked
    against the one already there. Raises TrainingDataError when they disagree."""
    folds = make_folds(case_ids, seed=split_seed)
    path = out_dir / "splits.json"
    content = {"seed": split_seed, "n_folds": len(folds), "folds": folds}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TrainingDataError(f"cannot read {path}: {error}") from None
        if existing.get("folds") != folds:
            raise TrainingDataError(
                f"{path} holds other folds than the cases and split seed {split_seed} give; "
                "use another --out or remove it"
            )
    elif write:
        _atomic_bytes(path, (json.dumps(content, indent=1) + "\n").encode())
    return folds


# ---------------------------------------------------------------------------- validation


def validate(model: nn.Module, entries: list[CachedCase], device: torch.device, ddp: _Distributed) -> dict[str, float]:
    """Mean Dice per region over ``entries`` (this rank takes every world_size-th), all-reduced."""
    model.eval()
    precision = "bf16" if device.type == "cuda" else "fp32"
    sums = [0.0] * len(REGIONS)
    count = 0
    for entry in entries[ddp.rank :: ddp.world_size]:
        volume = entry.load("image", mmap=False).astype(np.float32)
        truth = entry.load("regions", mmap=False).astype(bool)
        logits = predict_case_logits([model], volume, flips=((),), device=device, precision=precision)
        prediction = decide_regions(logits.seg, logits.slices, suppression=False).regions
        for index in range(len(REGIONS)):
            sums[index] += dice_score(prediction[index], truth[index])
        count += 1
    *sums, count = _all_reduce([*sums, float(count)], device, ddp)
    model.train()
    scores = {region: sums[index] / max(count, 1.0) for index, region in enumerate(REGIONS)}
    scores["mean"] = float(np.mean([scores[region] for region in REGIONS]))
    return scores


# ---------------------------------------------------------------------------- log and plot


def write_log(history: list[dict], path: Path) -> None:
    """The whole history as CSV (rewritten atomically each epoch, so a resumed run's log is whole)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in LOG_COLUMNS})
    _atomic_bytes(path, buffer.getvalue().encode())


def plot_curves(history: list[dict], path: Path) -> None:
    """Losses by term, learning rate and validation Dice per region against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (losses, rate, dice) = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", *LOSS_TERMS):
        losses.plot(epochs, [row[key] for row in history], marker=".", label=key)
    losses.set(title="training loss", xlabel="epoch", yscale="log")
    losses.legend()
    rate.plot(epochs, [row["lr"] for row in history], marker=".")
    rate.set(title="learning rate (end of epoch)", xlabel="epoch")
    validated = [row for row in history if row.get("val_dice_mean") is not None]
    for key in (*(f"val_dice_{r}" for r in REGIONS), "val_dice_mean"):
        dice.plot([row["epoch"] for row in validated], [row[key] for row in validated], marker="o", label=key[9:])
    dice.set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    dice.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    _atomic_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------- the loop


def _run_record(options: TrainOptions, recipe: Recipe) -> dict:
    return {
        "arch": options.arch,
        "size": options.size,
        "fold": options.fold,
        "seed": options.seed,
        "split_seed": options.split_seed,
        "recipe": recipe.to_dict(),
        "steps_per_epoch": options.steps_per_epoch,
        "warmup_epochs": warmup_epochs(recipe.epochs),
        "precision": options.precision,
    }


def train(
    options: TrainOptions,
    out_dir: Path | str,
    cache_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
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
    ddp = _setup_distributed(options.device)
    try:
        return _train(options, recipe, out_dir, cache_dir, data_dir, resume, stop_after, ddp)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def _train(options, recipe, out_dir, cache_dir, data_dir, resume, stop_after, ddp: _Distributed) -> TrainResult:
    device = resolve_device(options.device, ddp.local_rank)
    run_dir = out_dir / run_name(options.arch, options.fold)
    if ddp.is_main:
        check_writable(run_dir)
    if data_dir is not None:
        cache_dir = out_dir / "cache"
        if ddp.is_main:
            preprocess_dataset(data_dir, cache_dir, progress=options.progress)
        if ddp.active:
            dist.barrier()
    if cache_dir is None:
        raise TrainingDataError("give a data folder or a cache folder")
    entries = {entry.case_id: entry for entry in open_cache(cache_dir)}
    folds = load_or_write_splits(out_dir, list(entries), options.split_seed, write=ddp.is_main)
    training_ids, validation_ids = split_fold(folds, options.fold)
    training = [entries[i] for i in training_ids]
    validation = [entries[i] for i in validation_ids]
    record = _run_record(options, recipe)

    torch.manual_seed(options.seed)  # the same initial weights on every rank
    model = build_model(options.arch, options.size).to(device)
    dataset = CropDataset(training, recipe.crop, seed=options.seed,
                          augmentation=recipe.augmentation())
    samples_per_rank = options.steps_per_epoch * recipe.batch_size if options.steps_per_epoch else None
    sampler = EpochSampler(len(dataset), options.seed, ddp.rank, ddp.world_size, samples_per_rank)
    loader = DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=options.workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    steps_per_epoch = len(loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    scheduler = make_scheduler(optimizer, recipe.schedule, recipe.epochs, steps_per_epoch)
    autocast_dtype = options.autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    criterion = PaperLoss()

    start_epoch, history, best_score = 0, [], -1.0
    last_path = run_dir / "last.pt"
    if resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("format") != LAST_FORMAT:
            raise TrainingDataError(f"{last_path} is not a brats-cls training state")
        changed = [key for key in RESUME_FIXED if json.dumps(state["run"].get(key)) != json.dumps(record[key])]
        if changed:
            raise TrainingDataError(f"cannot resume from {last_path}: {', '.join(changed)} changed since it was written")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, best_score = int(state["epoch"]), list(state["history"]), float(state["best_score"])
        log.info("resuming %s at epoch %d", run_dir, start_epoch)
    elif resume:
        log.warning("--resume: no %s yet, starting from scratch", last_path)
    if ddp.is_main:
        _atomic_bytes(run_dir / "run.json", (json.dumps({**record, "world_size": ddp.world_size,
                                                          "training_cases": training_ids,
                                                          "validation_cases": validation_ids}, indent=1) + "\n").encode())

    network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp.active else model
    end_epoch = min(recipe.epochs, stop_after) if stop_after is not None else recipe.epochs
    for epoch in range(start_epoch, end_epoch):
        torch.manual_seed(_epoch_seed(options.seed, epoch, ddp.rank))
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        network.train()
        started = time.perf_counter()
        sums = [0.0] * (1 + len(LOSS_TERMS))
        samples = 0
        bar = tqdm(loader, desc=f"{run_dir.name} epoch {epoch + 1}/{recipe.epochs}", unit="step",
                   disable=not (options.progress and ddp.is_main), leave=False)
        for batch in bar:
            image = batch["image"].to(device, non_blocking=True)
            regions = batch["regions"].to(device, non_blocking=True)
            slices = batch["slices"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                outputs = network(image)
            loss, terms = criterion(outputs, regions, slices)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            size = image.shape[0]
            samples += size
            loss_value = float(loss.detach())
            sums[0] += loss_value * size
            for index, name in enumerate(LOSS_TERMS, start=1):
                sums[index] += float(terms[name]) * size
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            samples_s=f"{samples * ddp.world_size / elapsed:.2f}")
        bar.close()
        *sums, samples_all = _all_reduce([*sums, float(samples)], device, ddp)
        seconds_train = time.perf_counter() - started
        row = {"epoch": epoch + 1, "loss": sums[0] / samples_all, "lr": scheduler.get_last_lr()[0],
               "samples_per_s": samples_all / seconds_train}
        row.update({name: sums[index] / samples_all for index, name in enumerate(LOSS_TERMS, start=1)})
        if (epoch + 1) % options.val_every == 0 or epoch + 1 == recipe.epochs:
            scores = validate(model, validation, device, ddp)
            row.update({f"val_dice_{region}": scores[region] for region in REGIONS})
            row["val_dice_mean"] = scores["mean"]
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        improved = row.get("val_dice_mean") is not None and row["val_dice_mean"] > best_score
        if improved:
            best_score = row["val_dice_mean"]
        if ddp.is_main:
            _save_epoch(run_dir, model, optimizer, scheduler, scaler, record, epoch + 1, history, best_score,
                        improved, options, validation_ids)
            message = f"{run_dir.name} epoch {epoch + 1}: loss {row['loss']:.4f}"
            if row.get("val_dice_mean") is not None:
                message += " val Dice " + " ".join(f"{r} {row[f'val_dice_{r}']:.3f}" for r in REGIONS)
            tqdm.write(message) if options.progress else log.info(message)
    return TrainResult(model, run_dir, history, best_score)


def _save_epoch(run_dir, model, optimizer, scheduler, scaler, record, epoch, history, best_score, improved,
                options, validation_ids) -> None:
    state = {
        "format": LAST_FORMAT,
        "run": record,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"seed": options.seed, "next_epoch": epoch},  # see the module docstring: reseeded per epoch
        "history": history,
        "best_score": best_score,
    }
    _atomic_torch_save(state, run_dir / "last.pt")
    if improved:
        row = history[-1]
        save_model(model, run_dir / "best.pt", {
            **record,
            "epoch": epoch,
            "val_dice": {region: row[f"val_dice_{region}"] for region in (*REGIONS, "mean")},
            "validation_cases": validation_ids,
        })
    write_log(history, run_dir / "log.csv")
    plot_curves(history, run_dir / "curves.png")
