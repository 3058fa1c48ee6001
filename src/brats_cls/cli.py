"""Command line: a thin click group. Each command parses, calls one function, maps errors to exit codes.

Exit codes: 0 success; 1 some work failed (e.g. a case), the rest done; 2 usage error before any work.
"""

from __future__ import annotations

import logging

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="brats-cls")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """BraTS tumour segmentation with an additional slice classification network."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
