"""`loraforge push`: a thin shell over loraforge.ship.hub (plan_push, then push)."""

from __future__ import annotations

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths


@paths(reads={"out": "adapter"})  # writes nothing here: the files go to the Hub
@click.command(context_settings={"max_content_width": 100})
@click.argument("out", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create new repositories as private.")
@click.option("--revision", default=None, help="Branch to commit to (created if missing) [default: main].")
@click.option(
    "--base-repo",
    default=None,
    help="Repository for the residual base (pissa, milora, olora, olora-tail) [default: REPO_ID-residual-base].",
)
@click.option(
    "--base-model", default=None, help="Hub id of the original model, when OUT was made from a local directory."
)
@click.option("--commit-message", default=None, help="Message of the commit(s).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded where, and the card(s); no network.")
def push(out, dry_run, **settings):
    """Upload the adapter directory OUT to the Hub repository REPO_ID, with a model card."""
    from loraforge.ship.hub import PushConfig, plan_push
    from loraforge.ship.hub import push as push_plan

    with user_errors():
        config = PushConfig(**settings)
        plan = plan_push(out, config)
        if dry_run:
            click.echo("Dry run, nothing sent. Would upload:\n" + plan.describe())
            for repo, card in plan.cards.items():
                click.echo(f"\n----- README.md for {repo} -----\n{card}")
            return
        result = push_plan(plan, config)
    for repo, commit in result.commits.items():
        click.echo(f"pushed {repo}: {commit}")
