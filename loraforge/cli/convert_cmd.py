"""`loraforge convert`: a thin shell over loraforge.ship.convert.convert_adapter."""

from __future__ import annotations

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths


@paths(reads={"trained_adapter": "adapter", "init": "adapter"}, writes={"out": "dir"})
@click.command(context_settings={"max_content_width": 100})
@click.argument("trained_adapter", type=click.Path())
@click.option(
    "--init",
    "init",
    required=True,
    type=click.Path(),
    help="The init directory the adapter was trained from.",
)
@click.option("-o", "--out", required=True, type=click.Path(), help="Where to write the converted adapter.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert(trained_adapter, init, out, overwrite):
    """Rewrite TRAINED_ADAPTER (from a pissa/milora/olora/olora-tail init) as a rank-2r LoRA for the original base."""
    from loraforge.ship.convert import convert_adapter

    with user_errors():
        result = convert_adapter(trained_adapter, init, out, overwrite=overwrite)
    click.echo(result.message)
