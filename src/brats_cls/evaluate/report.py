"""An :class:`~.folders.EvaluationResult` as a CSV file, a JSON file and a text table.

JSON is strict (RFC 8259): an undefined figure (NaN: a lesion-wise figure of a region absent from
both truth and prediction, or a statistic over no value) is written as ``null``. The CSV writes it as
an empty cell. Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..io import replaced_atomically
from .folders import CaseResult, EvaluationResult
from .lesions import LESION_METRICS
from .metrics import HD95_FAILURE, METRICS
from .scoring import ALL_METRICS, REPORT_REGIONS

#: Per-case CSV columns after case_id, status and scheme: ``<metric>_<region>``, global metrics first.
CSV_FIELDS = ["case_id", "status", "scheme"] + [f"{m}_{r}" for m in ALL_METRICS for r in REPORT_REGIONS]


def _defined(value):
    """NaN -> None; every other value unchanged (JSON null, empty CSV cell)."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _strict(value):
    """A copy of nested dicts / lists with every NaN replaced by None."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict(item) for item in value]
    return _defined(value)


def case_row(case: CaseResult) -> dict[str, object]:
    """Flat row: case_id, status, scheme, then ``<metric>_<region>`` columns (NaN as None)."""
    row: dict[str, object] = {
        "case_id": case.case_id,
        "status": "ok" if case.failure is None else f"failed: {case.failure}",
        "scheme": case.scheme,
    }
    for metric in ALL_METRICS:
        for region in REPORT_REGIONS:
            row[f"{metric}_{region}"] = _defined(case.metrics[region][metric])
    return row


def write_csv(result: EvaluationResult, path: Path | str) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(case_row(case) for case in result.cases)
    with replaced_atomically(path) as handle:
        handle.write(text.getvalue().encode())


def to_json(result: EvaluationResult) -> dict[str, object]:
    return _strict({
        "hd95_method": result.hd95_method,
        "hd95_failure_mm": HD95_FAILURE,
        "lesion_wise": "brats-evaluation 0.0.10 BraTS-GLI (panoptica): 26-connected lesions, one-to-one "
                       "matching maximising Dice, any overlap; null (undefined) when a region is in neither",
        "n_cases": len(result.cases),
        "failures": [{"case_id": case_id, "reason": reason} for case_id, reason in result.failures],
        "errors": [str(error) for error in result.errors],
        "unmatched_predictions": result.unmatched_predictions,
        "summary": result.summary(),
        "cases": [
            {"case_id": c.case_id, "scheme": c.scheme, "failure": c.failure, "metrics": c.metrics}
            for c in result.cases
        ],
    })


def write_json(result: EvaluationResult, path: Path | str) -> None:
    text = json.dumps(to_json(result), indent=2, allow_nan=False) + "\n"
    with replaced_atomically(path) as handle:
        handle.write(text.encode())


def _table(summary, columns: list[tuple[str, str, str]], title: str) -> list[str]:
    """Fixed-width lines: one per region, one cell per ``(metric, statistic, heading)``."""
    width = max(12, *(len(heading) + 2 for _, _, heading in columns))
    lines = [title, f"{'region':<7}" + "".join(f"{heading:>{width}}" for _, _, heading in columns)]
    for region in REPORT_REGIONS:
        cells = "".join(f"{summary[region][metric][statistic]:>{width}.4f}" for metric, statistic, _ in columns)
        lines.append(f"{region:<7}{cells}")
    return lines


def format_table(result: EvaluationResult) -> str:
    """The summary as two fixed-width text tables: global metrics (mean and median) and lesion-wise
    figures (mean over the cases where they are defined)."""
    summary = result.summary()
    names = {"dice": "Dice", "hd95": "HD95 mm", "sensitivity": "Sens", "specificity": "Spec"}
    global_columns = [(m, s, f"{names[m]} {s}") for m in METRICS for s in ("mean", "median")]
    lesion_columns = [(m, "mean", m) for m in LESION_METRICS]
    lines = _table(summary, global_columns, "global (whole region)")
    lines += _table(summary, lesion_columns, "lesion-wise, as BraTS ranks (brats-evaluation BraTS-GLI), means")
    undefined = [f"{r} {summary[r]['sq_dsc']['n']}/{len(result.cases)}" for r in REPORT_REGIONS]
    lines.append(f"lesion-wise figures defined in (cases): {', '.join(undefined)}")
    return "\n".join(lines)
