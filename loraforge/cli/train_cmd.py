"""`loraforge train`: DAPO/GRPO on a PEFT adapter (see docs/train.md, docs/scale.md). Thin: flags -> library."""

import click

from loraforge.cli._common import user_errors
from loraforge.cli.train_options import config_options, run_train


@click.command(context_settings={"max_content_width": 120})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML file of settings (keys = flag names); flags override it.",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Continue the run in RUN_DIR from its latest checkpoint.",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "verl"]),
    default="local",
    show_default=True,
    help="local: the bundled loop (also under accelerate launch); "
    "verl: write RUN_DIR/verl/run_verl.sh, the same run as a verl DAPO job.",
)
@click.option("--run", "run_verl", is_flag=True, help="With --backend verl: launch the job now (needs verl installed).")
@click.option(
    "--verl-gpus-per-node",
    type=int,
    default=None,
    help="With --backend verl: trainer.n_gpus_per_node [default: the visible GPUs, at least 1].",
)
@click.option("--verl-nodes", type=int, default=1, show_default=True, help="With --backend verl: trainer.nnodes.")
@config_options
def train(config_file, resume_dir, backend, run_verl, verl_gpus_per_node, verl_nodes, **flags):
    """Train a LoRA adapter with DAPO or GRPO on prompts with verifiable answers.

    loraforge train --algo dapo --model BASE --adapter ADAPTER --data DATA -o RUN_DIR

    Several processes: accelerate launch --multi_gpu --num_processes N -m loraforge train ...
    """
    with user_errors():
        if backend == "verl":
            from loraforge.cli.train_options import run_verl_backend

            run_verl_backend(flags, config_file, resume_dir, run_verl, verl_gpus_per_node, verl_nodes, click.echo)
            return
        if run_verl or verl_gpus_per_node is not None or verl_nodes != 1:
            raise click.UsageError("--run, --verl-gpus-per-node and --verl-nodes go with --backend verl")
        result = run_train(flags, config_file, resume_dir)
    from loraforge.rl.distributed import context

    if context().is_main:
        click.echo(
            f"{'interrupted' if result.interrupted else 'finished'} at step {result.steps_done}: {result.run_dir}"
        )
