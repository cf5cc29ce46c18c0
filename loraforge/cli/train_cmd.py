"""`loraforge train`: DAPO/GRPO on a PEFT adapter (see docs/train.md, docs/scale.md). Thin: flags -> library."""

import signal

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths
from loraforge.cli.train_options import config_options, run_train

EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143


@paths(
    reads={
        "model": "model",
        "adapter": "adapter",
        "tokenizer": "model",
        "data": "data",
        "eval_data": "data",
        "config_file": "file",
    },
    writes={"output_dir": "run", "resume_dir": "run"},  # --resume writes into the run it continues
    settings="config_file",
)
@click.command(context_settings={"max_content_width": 120})
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="YAML file of settings (keys = flag names); flags override it.",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(),
    help="Continue the run in RUN_DIR from its newest sound checkpoint (step 0 if it saved none); "
    "only --steps, --max-gen-batches, --dynamic-sampling/--no-dynamic-sampling may be given with it.",
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
@click.option(
    "--overwrite",
    is_flag=True,
    help="With --backend verl: replace a RUN_DIR/verl/ job prepared with other settings "
    "(never one holding verl's checkpoints).",
)
@config_options
def train(config_file, resume_dir, backend, run_verl, verl_gpus_per_node, verl_nodes, overwrite, **flags):
    """Train a LoRA adapter with DAPO or GRPO on prompts with verifiable answers.

    loraforge train --algo dapo --model BASE --adapter ADAPTER --data DATA -o RUN_DIR

    Several processes: accelerate launch --multi_gpu --num_processes N -m loraforge train ...

    Exit status: 0 done, 1 an error (the last complete step saved first), 130 Ctrl-C, 143 SIGTERM (both after saving).
    """
    with user_errors():
        if backend == "verl":
            from loraforge.cli.train_options import run_verl_backend

            run_verl_backend(
                flags, config_file, resume_dir, run_verl, verl_gpus_per_node, verl_nodes, click.echo, overwrite
            )
            return
        if run_verl or overwrite or verl_gpus_per_node is not None or verl_nodes != 1 or flags.get("verl_version"):
            raise click.UsageError(
                "--run, --overwrite, --verl-gpus-per-node, --verl-nodes and --verl-version go with --backend verl"
            )
        try:
            result = run_train(flags, config_file, resume_dir)
        except KeyboardInterrupt:  # a second Ctrl-C: aborted without saving
            click.echo("aborted without saving", err=True)
            raise SystemExit(EXIT_SIGINT) from None
    from loraforge.rl.distributed import context

    if context().is_main:
        click.echo(
            f"{'interrupted' if result.interrupted else 'finished'} at step {result.steps_done}: {result.run_dir}"
        )
    if result.interrupted:  # the shell's convention for death by a signal: 128 + its number
        raise SystemExit(EXIT_SIGTERM if result.stop_signal == signal.SIGTERM else EXIT_SIGINT)
