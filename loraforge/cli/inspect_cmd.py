"""`loraforge inspect`: a thin shell over loraforge.ship.inspect (and loraforge.ship.plots for --plots)."""

from __future__ import annotations

import json

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths
from loraforge.core.atomic import write_file_atomic


def _names(spec):
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else None


@paths(
    reads={"adapter": "adapter", "init": "adapter", "base": "model"}, writes={"plots_dir": "dir", "json_file": "file"}
)
@click.command("inspect", context_settings={"max_content_width": 100})
@click.argument("adapter", type=click.Path())
@click.option(
    "--init",
    "init",
    default=None,
    help="The init directory a trained ADAPTER started from (needed for pissa/milora/olora/olora-tail).",
)
@click.option(
    "--base",
    default=None,
    help="The ORIGINAL model (Hub id or directory) [default: from the manifest or adapter_config].",
)
@click.option("--modules", default=None, help="Only these modules, e.g. q_proj,o_proj [default: all].")
@click.option("--layers", default=None, help="Only these blocks, e.g. 0,14,27 or 0-3 [default: all].")
@click.option(
    "--plots",
    "plots_dir",
    default=None,
    type=click.Path(),
    help="Write PNG figures here (needs matplotlib).",
)
@click.option(
    "--plot-modules", default=None, help="Module kinds for the spectrum/update figures [default: all inspected]."
)
@click.option("--json", "json_file", default=None, type=click.Path(), help="Write every number to this JSON file.")
@click.option("--device", default="auto", show_default=True, help="Where the SVDs run: auto, cpu, cuda, cuda:N.")
def inspect_(adapter, init, base, modules, layers, plots_dir, plot_modules, json_file, device):
    """Spectra, init norm, subspace similarity and (trained) update distribution of ADAPTER."""
    from loraforge.models.targets import parse_layers
    from loraforge.ship.inspect import LEGEND, InspectConfig, format_table, inspect_adapter

    with user_errors():
        if plots_dir:
            from loraforge.ship.plots import require_matplotlib, write_plots

            require_matplotlib()  # fail before the SVDs, not after
        report = inspect_adapter(adapter, init, base, InspectConfig(_names(modules), parse_layers(layers), device))
        figures = write_plots(report, plots_dir, _names(plot_modules)) if plots_dir else []
    click.echo(
        f"{report.adapter}: {report.method or 'unknown method'} r={report.r}, "
        f"{'trained' if report.trained else 'init'}, W0 from {report.base_model}"
    )
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(format_table(report) + "\n" + LEGEND)
    if json_file:
        with user_errors():  # a read-only or full disk: one line, not a traceback; the old file kept
            write_file_atomic(json_file, json.dumps(report.to_json(), indent=1))
        click.echo(f"numbers -> {json_file}")
    for path in figures:
        click.echo(f"figure -> {path}")
