"""The `loraforge` command line: a click group whose sub-commands are imported lazily.

Each command lives in its own module under loraforge/cli/ and stays thin: parse the flags, build a
config, call the library, print the result. Commands are loaded only when invoked, so
`loraforge --help` and `loraforge init` do not pay for importing what other commands need.
"""

from __future__ import annotations

import atexit
import gc
import importlib

import click

# name -> "module:attribute" of the click command; one line per command.
COMMANDS: dict[str, str] = {
    "init": "loraforge.cli.init_cmd:init",
    "eval": "loraforge.cli.eval_cmd:eval_command",
    "push": "loraforge.cli.push_cmd:push",
    "verify": "loraforge.cli.verify_cmd:verify",
    "convert": "loraforge.cli.convert_cmd:convert",
    "inspect": "loraforge.cli.inspect_cmd:inspect_",
    "train": "loraforge.cli.train_cmd:train",
    "plot": "loraforge.cli.plot_cmd:plot",
}

HELP_SUMMARY: dict[str, str] = {
    "init": "Initialise a LoRA adapter directory from a pretrained model.",
    "eval": "Evaluate a model or adapter on GSM8K, MATH500, AIME: pass@k and mean@k.",
    "push": "Upload an adapter (and its residual base) to the Hugging Face Hub with a model card.",
    "verify": "Check an init directory against its manifest and base model.",
    "convert": "Turn an adapter trained from a residualised init into a rank-2r LoRA for the original base.",
    "inspect": "Spectra, init norms, subspace similarity and update distribution (tables, JSON, plots).",
    "train": "Train a LoRA adapter with DAPO or GRPO on verifiable rewards.",
    "plot": "Plot reward, grad norm and KL of training runs (PNG).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        command = getattr(importlib.import_module(module), attr)
        # Every command declares the paths it reads and writes (cli/_paths.py), so that none can skip the
        # guard that keeps outputs away from inputs: a command without the declaration does not run.
        if getattr(command, "loraforge_paths", None) is None:
            raise RuntimeError(f"loraforge {name} declares no paths: decorate it with loraforge.cli._paths.paths")
        return command

    def format_commands(self, ctx, formatter):
        # Show one-line summaries without importing every command module.
        rows = [(name, HELP_SUMMARY.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="loraforge")
def main():
    """loraforge: LoRA initialisations for RL with verifiable rewards (DAPO, GRPO).

    Run `loraforge COMMAND --help` for the flags of each command. CPU threads: as many as idle cores unless
    OMP_NUM_THREADS (or MKL_NUM_THREADS, OPENBLAS_NUM_THREADS) is set.
    """
    from loraforge.core.threads import limit_threads

    limit_threads()  # before torch and scipy start their thread pools: no oversubscription on a busy machine
    _skip_gc_at_exit()


def _skip_gc_at_exit() -> None:
    """At interpreter shutdown CPython runs its cyclic garbage collector over every object still
    alive, which after `import torch` are several hundred thousand: a measurable part of every
    command's wall time (benchmarks/RESULTS.md), longer than a small model's adapter takes to write.
    gc.freeze() (run by atexit, i.e. after the command has returned and closed its files) moves them
    out of the collector's sight; the memory goes back to the OS with the process as always.
    Unregistering first keeps one registration however often the group runs (CliRunner tests)."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
