"""``brats-cls synth``: write phantom cases (and a preview)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cliutil import shape_callback
from .phantom import DEFAULT_HEALTHY_FRACTION, write_cases
from .preview import write_preview


@click.command("synth")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the case folders.")
@click.option("--cases", "count", type=click.IntRange(min=1), default=1, show_default=True, help="Number of cases.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--naming", type=click.Choice(["2021", "2023"]), default="2023", show_default=True,
              help="2021: BraTS2021_00001_flair.nii.gz, ET=4; 2023: BraTS-GLI-00001-000-t2f.nii.gz, ET=3.")
@click.option("--healthy-fraction", type=click.FloatRange(0, 1), default=DEFAULT_HEALTHY_FRACTION, show_default=True,
              help="Probability that a case has no tumour.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG montage of the first case with a tumour.")
@click.option("--start-index", type=click.IntRange(min=0), default=1, show_default=True,
              help="Index (ID number) of the first case; case k depends only on (seed, k).")
@click.option("--shape", default="155,240,240", show_default=True, callback=shape_callback,
              help="Grid D,H,W; smaller grids scale the brain down (for quick tests).")
def synth_command(out, count, seed, naming, healthy_fraction, preview, start_index, shape) -> None:
    """Write phantom BraTS cases (four modalities and ground truth) on the MNI template anatomy."""
    try:
        folders = write_cases(out, count, seed, naming, healthy_fraction, start_index, shape=shape)
    except ImportError as error:
        raise click.ClickException(str(error)) from None
    if preview is not None:
        from ..cases import find_cases
        from ..io import read_label

        chosen = folders[0]
        for folder in folders:
            case = find_cases(folder).cases[0]
            if read_label(case.seg, case.case_id).any():
                chosen = folder
                break
        write_preview(chosen, preview)
    click.echo(f"wrote {len(folders)} case(s) to {out}")
