"""`loraforge train`: DAPO/GRPO on a PEFT adapter (see docs/train.md). Thin: flags -> library."""

import click

from loraforge.cli._common import user_errors
from loraforge.rl.cli_support import config_options, run_train


@click.command(context_settings={"max_content_width": 120})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings (keys = flag names); flags override it.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in RUN_DIR from its latest checkpoint.")
@config_options
def train(config_file, resume_dir, **flags):
    """Train a LoRA adapter with DAPO or GRPO on prompts with verifiable answers.

    loraforge train --algo dapo --model BASE --adapter ADAPTER --data DATA -o RUN_DIR
    """
    with user_errors():
        result = run_train(flags, config_file, resume_dir)
    click.echo(f"{'interrupted' if result.interrupted else 'finished'} at step {result.steps_done}: {result.run_dir}")
