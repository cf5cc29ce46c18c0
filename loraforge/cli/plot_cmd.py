"""`loraforge plot RUN_DIR [RUN_DIR ...]`: reward, grad norm and KL panels of training runs as a PNG."""

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths


@paths(reads={"run_dirs": "run"}, writes={"output": "file"})
@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", default="training.png", show_default=True, help="PNG file to write.")
@click.option(
    "--smooth", default=1, show_default=True, type=click.IntRange(min=1), help="Moving-average window (steps)."
)
@click.option("--label", "labels", multiple=True, help="Legend label per run, in order (default: directory names).")
def plot(run_dirs, output, smooth, labels):
    """Draw the paper's Figure 2 panels (reward, grad norm, KL) for one or more runs on shared axes."""
    from loraforge.rl.plot import plot_runs

    with user_errors():
        path = plot_runs(list(run_dirs), output, smooth, list(labels) or None)
    click.echo(f"wrote {path}")
