"""``brats-cls evaluate``: parse, score a folder, print and write the report (registered by :mod:`brats_cls.cli`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cases import CaseError
from .folders import evaluate_folder
from .metrics import HD95_FAILURE, HD95_METHODS
from .plots import OverlayWriter, write_dice_boxplot
from .report import format_table, write_csv, write_json
from .scoring import SCHEME_CHOICES

_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
_FILE = click.Path(dir_okay=False, path_type=Path)


def _echo_result(result, hd95_method: str) -> None:
    click.echo(f"{len(result.cases)} case(s) scored, HD95 {hd95_method} in mm")
    click.echo(format_table(result))
    if result.failures:
        listed = ", ".join(f"{case_id} ({reason})" for case_id, reason in result.failures)
        click.echo(f"{len(result.failures)} failed case(s), scored Dice 0 / HD95 {HD95_FAILURE:g}: {listed}")
    if result.unmatched_predictions:
        click.echo(f"predictions without truth (ignored): {', '.join(result.unmatched_predictions)}")
    for error in result.errors:
        click.echo(f"not scored: {error}", err=True)


@click.command("evaluate")
@click.option("--pred", "pred_dir", required=True, type=_FOLDER, help="Folder of predictions <ID>.nii.gz.")
@click.option("--truth", "truth_dir", required=True, type=_FOLDER,
              help="Folder of truth files <ID>.nii.gz / <ID>_seg.nii.gz / <ID>-seg.nii.gz, flat or in case folders.")
@click.option("--label-scheme", type=click.Choice(SCHEME_CHOICES), default="auto", show_default=True,
              help="ET label: 2021 -> 4, 2023 -> 3; auto decides per case from the truth name, else the labels.")
@click.option("--hd95", "hd95_method", type=click.Choice(HD95_METHODS), default="pooled", show_default=True,
              help="Global HD95. pooled: 95th percentile of both directions' surface distances (brats-evaluation); "
                   "directed: max of the two directed 95th percentiles (classic BraTS). Lesion-wise HD95 is "
                   "always pooled.")
@click.option("--csv", "csv_path", type=_FILE, help="Per-case global and lesion-wise figures as CSV.")
@click.option("--json", "json_path", type=_FILE, help="Per-case figures, failures and summary as JSON.")
@click.option("--plot", "plot_path", type=_FILE,
              help="Box plot of global and lesion-wise Dice per region (PNG, SVG or PDF by extension).")
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for one PNG per case: FLAIR and T1ce with truth and prediction boundaries.")
@click.option("--images", "images_dir", type=_FOLDER, help="Case folders with the modalities (needed by --overlay).")
def evaluate_command(pred_dir, truth_dir, label_scheme, hd95_method, csv_path, json_path, plot_path,
                     overlay_dir, images_dir) -> None:
    """Score predictions against ground truth: global Dice, HD95 (mm), sensitivity, specificity,
    and the lesion-wise figures BraTS ranks by (tp, fp, fn, rq, sq_dsc, pq_dsc, sq_hd95), per region.

    A missing prediction scores Dice 0 and HD95 373 in every region. Exit code 1 when a truth file
    could not be used (the other cases are still scored), 2 on a usage error.
    """
    if overlay_dir is not None and images_dir is None:
        raise click.UsageError("--overlay needs --images (the case folders with FLAIR and T1ce)")
    on_case = None if overlay_dir is None else OverlayWriter(overlay_dir, images_dir)
    try:
        result = evaluate_folder(pred_dir, truth_dir, label_scheme, hd95_method, on_case)
    except CaseError as error:
        raise click.UsageError(str(error)) from None
    if not result.cases and not result.errors:
        raise click.UsageError(f"no truth file found in {truth_dir}")
    _echo_result(result, hd95_method)
    if csv_path is not None:
        write_csv(result, csv_path)
    if json_path is not None:
        write_json(result, json_path)
    if plot_path is not None:
        write_dice_boxplot(result, plot_path)
    if result.errors:
        raise SystemExit(1)
