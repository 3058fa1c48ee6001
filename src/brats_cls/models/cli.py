"""``brats-cls models``: the parameter count of every architecture and preset."""

from __future__ import annotations

import click

from .registry import parameter_table


@click.command("models")
def models_command() -> None:
    """Print the parameter count of every architecture and preset."""
    click.echo(f"{'arch':8s}{'preset':8s}{'parameters':>14s}  input_scale")
    for arch, preset, parameters, scale in parameter_table():
        click.echo(f"{arch:8s}{preset:8s}{parameters:>14,d}  {scale:g}")
