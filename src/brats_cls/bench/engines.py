"""The engines side by side (issue #24): the shipped path (:class:`~brats_cls.predictor.Predictor` +
``write_label``) once per engine, on the same case and the same networks. Figures are returned as
JSON-able dicts, never asserted.

Per engine (``NAME[:PRECISION]``, precision float32 unless named):

* **first case**: a new Predictor on an empty engine cache, so it pays every one-off cost (export or
  compile of each shape, loading, first calls); :attr:`Engine.stats` says how much went where;
* **steady state**: the same Predictor on the same case again (the warm-up was the first case);
  ``one_off_seconds`` is the first case less this;
* **warm cache** (engines that keep artefacts on disk): a new Predictor, the disk cache filled by the
  first case: what a container started once per case pays when its cache outlives it;
* **peak RSS** of each of these cases;
* **agreement with eager float32**, which always runs first as the reference: the share of voxels of
  the final label map labelled alike, the Dice of each region between the two, and, the phantom
  having a ground truth, each one's Dice against the truth and the difference.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..device import PRECISIONS
from ..engines import ENGINES, EngineError
from ..io import read_label
from ..predictor import Predictor
from ..regions import REGIONS, dice_score, labels_to_regions
from .case import timed_case


@dataclass(frozen=True)
class EngineSpec:
    """One engine row: an engine name and the precision it runs at."""

    name: str
    precision: str = "fp32"

    @classmethod
    def parse(cls, item: str) -> "EngineSpec":
        """``"onnxruntime"``, ``"openvino:bf16"``: a name of :data:`~brats_cls.engines.ENGINES`, then
        optionally ``:`` and a precision (float32 when none)."""
        name, _, precision = item.strip().partition(":")
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
        precision = precision.strip() or "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"engine {name}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        return cls(name, precision)

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


REFERENCE = EngineSpec("eager", "fp32")


def parse_engines(values) -> list[EngineSpec]:
    """``--engine`` values (repeatable, each a comma list) as specs, in order, duplicates dropped."""
    specs: list[EngineSpec] = []
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            spec = EngineSpec.parse(item)
            if spec not in specs:
                specs.append(spec)
    return specs


def _case_run(predictor: Predictor, case, out_dir: Path) -> dict:
    """One case through ``predictor`` and ``write_label``: seconds, stages, peak memory, labels."""
    prediction, timer, seconds, memory = timed_case(predictor, case, out_dir)
    return {"seconds": seconds, "stages": dict(timer.seconds), "labels": prediction.labels,
            "scheme": prediction.scheme, "sliding_window": prediction.logits.windowed, **memory.to_dict()}


def region_dice(labels: np.ndarray, other: np.ndarray, scheme: str) -> dict[str, float]:
    """Dice of WT, TC and ET between two label maps of ``scheme``."""
    first, second = labels_to_regions(labels, scheme), labels_to_regions(other, scheme)
    return {name: dice_score(first[index], second[index]) for index, name in enumerate(REGIONS)}


def run_engine(case, models, spec: EngineSpec, tta: bool, out_dir: Path, cache_dir: Path, progress=print) -> dict:
    """``spec``'s first case (empty cache), steady case and, where it keeps a disk cache, a warm-cache
    first case (module docstring). Raises EngineError when the engine cannot run here."""
    settings = {"tta": tta, "precision": spec.precision, "engine": spec.name, "engine_cache": cache_dir}
    start = time.perf_counter()
    predictor = Predictor(models, **settings)
    setup = time.perf_counter() - start
    progress(f"engine {spec.label}: first case (one-off costs included)")
    first = _case_run(predictor, case, out_dir)
    first_stats = dict(predictor.engine.stats)
    progress(f"engine {spec.label}: steady-state case")
    steady = _case_run(predictor, case, out_dir)
    result = {
        "engine": spec.name, "precision": predictor.precision, "requested": asdict(spec), "label": spec.label,
        "engine_version": predictor.engine.version, "setup_seconds": setup,
        "seconds_first_case": first["seconds"], "seconds_steady": steady["seconds"],
        "one_off_seconds": first["seconds"] - steady["seconds"], "one_off": first_stats,
        "steady_stats": {key: predictor.engine.stats[key] - first_stats[key] for key in first_stats},
        "stages_first_case": first["stages"], "stages_steady": steady["stages"],
        "peak_rss_bytes_first_case": first["peak_rss_bytes"], "peak_rss_bytes_steady": steady["peak_rss_bytes"],
        "peak_rss_method": steady["peak_rss_method"], "sliding_window": steady["sliding_window"],
        "labels": steady["labels"], "scheme": steady["scheme"],
        "first_and_steady_identical": bool(np.array_equal(first["labels"], steady["labels"])),
    }
    if predictor.engine.persistent:
        del predictor
        gc.collect()
        progress(f"engine {spec.label}: first case from a warm disk cache")
        warm = Predictor(models, **settings)
        warm_run = _case_run(warm, case, out_dir)
        result.update(seconds_first_case_warm_cache=warm_run["seconds"], warm_cache=dict(warm.engine.stats),
                      peak_rss_bytes_warm_cache=warm_run["peak_rss_bytes"])
        del warm
    gc.collect()
    return result


def bench_engines(case, models, specs: list[EngineSpec], tta: bool, out_dir: Path, cache_dir: Path | None,
                  progress=print, save=lambda rows: None) -> list[dict]:
    """Every engine of ``specs``, eager float32 first (the reference); an engine that cannot run here
    gives a row with its error. ``cache_dir`` None: a new empty cache folder per engine."""
    specs = [REFERENCE] + [spec for spec in specs if spec != REFERENCE]
    truth = read_label(case.seg, case.case_id) if case.seg is not None else None
    rows, reference = [], None
    for spec in specs:
        with tempfile.TemporaryDirectory(prefix="brats-cls-engine-cache-") as fresh:
            try:
                row = run_engine(case, models, spec, tta, out_dir, Path(fresh) if cache_dir is None else cache_dir,
                                 progress)
            except (EngineError, torch.OutOfMemoryError) as error:
                progress(f"engine {spec.label}: {error}")
                rows.append({"engine": spec.name, "precision": spec.precision, "label": spec.label,
                             "error": str(error).splitlines()[0]})
                save(rows)
                continue
        labels, scheme = row.pop("labels"), row.pop("scheme")
        if truth is not None:
            row["dice_vs_truth"] = region_dice(labels, truth, scheme)
        if reference is None:
            if spec != REFERENCE:  # the reference itself failed: nothing to compare with
                rows.append(row)
                continue
            reference = row | {"labels": labels}
        row["identical_voxels"] = float((labels == reference["labels"]).mean())
        row["dice_vs_reference"] = region_dice(labels, reference["labels"], scheme)
        row["reference_over_this"] = reference["seconds_steady"] / row["seconds_steady"]
        if truth is not None:
            row["dice_vs_truth_minus_reference"] = {
                name: row["dice_vs_truth"][name] - reference["dice_vs_truth"][name] for name in REGIONS}
        rows.append(row)
        save(rows)
    return rows
