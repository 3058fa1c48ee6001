"""The inference run: every discovered case through a :class:`~brats_cls.predictor.Predictor`, one mask
per case written atomically, reports and pictures beside it, and a summary of what failed.

* One bad case never stops the others: its error (naming the case and the file) goes to the log and
  the summary, and the run goes on.
* Interrupted runs: a run starts by deleting our own ``.<ID>.nii.gz.<random>.tmp`` files that a
  killed run left in the output folder (:func:`io.remove_stale_temporaries`); one run per output
  folder, or the shards of one (below).
* ``--skip-existing`` skips a case whose mask exists and is a valid uint8 mask on the input's grid.
* ``--report DIR`` (never the output folder) gets ``<ID>.json`` (:func:`build_report`) and
  ``<ID>.png`` (:func:`brats_cls.qc.write_qc_figure`); a report or picture that cannot be made is
  logged and the mask stands.
* ``--failures FILE`` gets ``{"written": [...], "skipped": [...], "failed": {ID: message}}`` at the end.
* Several runs into one folder (``--shard``, workers: :mod:`brats_cls.parallel`): their cases are
  disjoint, so each mask has one writer. :func:`segment_cases` is the loop that a worker runs (no
  clean-up, no failures file: the run that starts the workers does both, once), and a shard sharing
  its output folder removes only what a killed run left of its own cases (``shared_output``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cases import Case, CaseError, Discovery
from .io import (Geometry, read_image, remove_stale_temporaries, write_json_atomically,
                 write_label)
from .orientation import BRATS_DIRECTION, CANONICAL
from .predictor import THRESHOLD, Prediction, Predictor
from .preprocess import uncrop, uncrop_slices
from .regions import REGIONS, dice_score, et_label_of
from .timing import StageTimer

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """What a run does around the predictor: skipping, reports, the failures file, progress (its bar's
    label and line: a worker's own); ``shared_output``: other runs (shards) write into the same output
    folder, so the clean-up at the start touches this run's cases only."""

    skip_existing: bool = False
    report_dir: Path | None = None
    failures_path: Path | None = None
    progress: bool = True
    progress_label: str = "cases"
    progress_line: int = 0
    shared_output: bool = False


@dataclass
class RunSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        return {"written": self.written, "skipped": self.skipped, "failed": self.failed}

    @classmethod
    def from_dict(cls, record: dict) -> "RunSummary":
        return cls(list(record["written"]), list(record["skipped"]), dict(record["failed"]))

    @classmethod
    def combined(cls, summaries: Iterable["RunSummary"], seconds: float) -> "RunSummary":
        """One summary of several runs over disjoint cases (the workers of a run), IDs sorted."""
        total = cls(seconds=seconds)
        for summary in summaries:
            total.written += summary.written
            total.skipped += summary.skipped
            total.failed.update(summary.failed)
        total.written.sort()
        total.skipped.sort()
        total.failed = dict(sorted(total.failed.items()))
        return total


def slice_probabilities(prediction: Prediction) -> np.ndarray:
    """The ensemble's slice probability per region ``(3, D)`` on the case's own slices (0 outside the crop)."""
    logits = uncrop_slices(prediction.logits.slices, prediction.box, fill=-np.inf)
    return 1.0 / (1.0 + np.exp(-logits))


def suppressed_slices(prediction: Prediction) -> np.ndarray:
    """``(3, D)`` bool on the case's own slices: where suppression erased voxels."""
    return uncrop_slices(prediction.decision.suppressed, prediction.box, fill=False)


def build_report(prediction: Prediction, predictor: Predictor, names: list[str], seconds: dict) -> dict:
    """The JSON report of one case: volumes before and after suppression, slice probabilities,
    each network's WT agreement with the ensemble, settings and stage times."""
    decision = prediction.decision
    ensemble_wt = decision.regions[0]
    agreement = {name: dice_score(wt, ensemble_wt) for name, wt in zip(names, prediction.logits.model_whole_tumour)}
    return {
        "case": prediction.case.case_id,
        "scheme": prediction.scheme,
        "et_label": et_label_of(prediction.scheme),
        "threshold": THRESHOLD,
        "voxels_before_suppression": decision.voxels_before,
        "voxels_after_suppression": decision.voxels_after,
        "slices_suppressed": decision.slices_suppressed,
        "slice_probabilities": slice_probabilities(prediction).round(4).tolist(),
        "et_relabelled_as_necrosis": prediction.et_relabelled,
        "model_wt_dice_vs_ensemble": agreement,
        "sliding_window": prediction.logits.windowed,
        "orientation": {"file": prediction.orientation.code, "segmented_as": CANONICAL},
        "background_cleared": prediction.background_cleared,
        "seconds": seconds,
        "device": str(predictor.device),
        "precision": predictor.precision,
        "engine": predictor.engine.name,
        "flips": len(predictor.flips),
        "models": len(predictor.models),
        "suppression": predictor.suppression,
    }


def write_pictures(prediction: Prediction, path: Path) -> None:
    """The per-case QC picture (:mod:`brats_cls.qc`)."""
    from .qc import write_qc_figure

    decision = prediction.decision
    removed = {name: decision.voxels_before[name] - decision.voxels_after[name] for name in REGIONS}
    regions = uncrop(decision.regions, prediction.box, fill=False)  # final regions, BraTS layout
    orientation = prediction.orientation
    images = orientation.to_canonical(prediction.images.image)
    geometry = prediction.geometry
    if not orientation.is_canonical:  # the picture shows what the networks saw, in the BraTS layout
        spacing = tuple(geometry.spacing[::-1][axis] for axis in orientation.axes)[::-1]
        geometry = Geometry(images.shape[1:][::-1], spacing, geometry.origin, BRATS_DIRECTION)
    write_qc_figure(path, prediction.case.case_id, images[0], images[2], regions, slice_probabilities(prediction),
                    suppressed_slices(prediction), removed, geometry)


def _existing_output_ok(path: Path, case: Case) -> bool:
    """A finished output is a readable uint8 NIfTI on the input's grid (checked before skipping)."""
    try:
        output = read_image(path, case.case_id)
        reference = read_image(case.modalities["flair"], case.case_id)
    except CaseError:
        return False
    return Geometry.of(output) == Geometry.of(reference) and output.GetPixelIDTypeAsString() == "8-bit unsigned integer"


def _write_extras(prediction: Prediction, predictor: Predictor, names: list[str], timer: StageTimer,
                  report_dir: Path) -> None:
    """Report and picture of a written case; a failure here is logged and the mask stands."""
    case_id = prediction.case.case_id
    try:
        write_json_atomically(report_dir / f"{case_id}.json", build_report(prediction, predictor, names, timer.seconds))
    except OSError as error:
        log.warning("case %s: report not written: %s", case_id, error)
    try:
        write_pictures(prediction, report_dir / f"{case_id}.png")
    except Exception as error:  # noqa: BLE001 - drawing must never fail a case
        log.warning("case %s: QC picture not written: %s: %s", case_id, type(error).__name__, error)


def _segment(case: Case, output_dir: Path, predictor: Predictor, names: list[str], options: RunOptions) -> None:
    """One case: predict, write the mask, then the report and picture. Raises on a failed case."""
    timer = StageTimer()
    prediction = predictor.predict(case, stage=timer)
    target = output_dir / case.output_name
    with timer("write"):
        try:
            write_label(prediction.labels, prediction.geometry, target)
        except OSError as error:  # disk full, read-only or vanished folder: nothing partial is left
            raise CaseError(case.case_id, f"cannot write the mask: {error.strerror or error}", target) from None
    if options.report_dir is not None:
        _write_extras(prediction, predictor, names, timer, options.report_dir)


def clean_output_folder(discovery: Discovery, output_dir: Path, options: RunOptions) -> None:
    """What a killed run left in ``output_dir``: all of it, or, with ``options.shared_output``, what it
    left of ``discovery``'s cases."""
    # the folder must hold masks only; a shard sharing it removes only its own cases' temporaries
    remove_stale_temporaries(output_dir, [case.case_id for case in discovery.cases] if options.shared_output else None)


def segment_cases(discovery: Discovery, output_dir: Path, predictor: Predictor, names: list[str] | None = None,
                  options: RunOptions | None = None,
                  after_each: Callable[[RunSummary], None] | None = None) -> RunSummary:
    """Write one ``<ID>.nii.gz`` per case of ``discovery`` into ``output_dir``; a failing case is
    reported and the loop goes on. ``names`` label the networks in reports; ``after_each`` sees the
    summary so far after every case (a worker's record of its progress). Neither cleans the folder
    nor writes the failures file: :func:`run_inference` does."""
    from tqdm import tqdm

    options = options or RunOptions()
    names = names or [f"model{index}" for index in range(len(predictor.models))]
    started = time.perf_counter()
    summary = RunSummary()
    for error in discovery.errors:
        summary.failed[error.case_id] = str(error)
        log.error("%s", error)
    bar = tqdm(discovery.cases, desc=options.progress_label, unit="case", disable=not options.progress,
               position=options.progress_line)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        target = output_dir / case.output_name
        if options.skip_existing and target.exists() and _existing_output_ok(target, case):
            summary.skipped.append(case.case_id)
        else:
            try:
                _segment(case, output_dir, predictor, names, options)
            except Exception as error:  # one bad case never stops the others
                message = str(error) if isinstance(error, CaseError) else f"case {case.case_id}: {type(error).__name__}: {error}"
                summary.failed[case.case_id] = message
                log.error("%s", message)
                tqdm.write(f"FAILED {message}")
            else:
                summary.written.append(case.case_id)
        if after_each is not None:
            after_each(summary)
    summary.seconds = time.perf_counter() - started
    return summary


def run_inference(discovery: Discovery, output_dir: Path, predictor: Predictor, names: list[str] | None = None,
                  options: RunOptions | None = None) -> RunSummary:
    """One process: :func:`clean_output_folder`, :func:`segment_cases`, then the failures file."""
    options = options or RunOptions()
    clean_output_folder(discovery, output_dir, options)
    summary = segment_cases(discovery, output_dir, predictor, names, options)
    if options.failures_path is not None:
        write_json_atomically(options.failures_path, summary.to_dict())
    return summary
