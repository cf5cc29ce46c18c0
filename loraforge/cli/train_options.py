"""What `loraforge train` needs beyond the library: click options generated from TrainConfig (one per
field, help = the field's metadata help), and the merge of defaults < YAML (--config) < flags.

Generating the options keeps the flags, the YAML keys, the dataclass and docs/train.md in step: a
field added to TrainConfig is a flag and a key at once.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import click

from loraforge.core.errors import LoraforgeError
from loraforge.core.settings import help_texts
from loraforge.rl.config import ALGO_PRESETS, TrainConfig, load_yaml

# fields with a short alias or a different flag name
FLAG_NAMES = {"output_dir": ("-o", "--output"), "model": ("--model",), "adapter": ("--adapter",)}


def flag_of(name: str) -> str:
    return FLAG_NAMES.get(name, ("--" + name.replace("_", "-"),))[-1]


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _default_text(f: dataclasses.Field) -> str:
    if f.default is None and any(f.name in p for p in ALGO_PRESETS.values()):
        return "default: " + ", ".join(f"{a} {p[f.name]}" for a, p in ALGO_PRESETS.items())
    if f.default in (None, ""):
        return ""
    return f"default: {f.default}"


def config_options(func):
    """Decorate a click command with one option per TrainConfig field, every default None (= not given)."""
    docs = help_texts(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(dataclasses.fields(TrainConfig)):
        kind = _base_type(hints[f.name])
        help_text = docs[f.name]
        extra = _default_text(f)
        if extra:
            help_text = f"{help_text} [{extra}]"
        names = FLAG_NAMES.get(f.name, ("--" + f.name.replace("_", "-"),))
        if kind is bool:
            flag = names[-1][2:]
            func = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_text)(func)
        else:
            click_type = {int: int, float: float}.get(kind, str)
            if f.name == "algo":
                click_type = click.Choice(sorted(ALGO_PRESETS))
            func = click.option(*names, f.name, type=click_type, default=None, help=help_text)(func)
    return func


def build_config(flags: dict[str, Any], config_file: str | None) -> TrainConfig:
    """TrainConfig from dataclass defaults, then the YAML file, then the flags actually given."""
    values, lines = load_yaml(config_file) if config_file else ({}, {})
    values = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in values.items()}
    given = {k: v for k, v in flags.items() if v is not None}
    lines = {k: n for k, n in lines.items() if isinstance(k, str) and k.replace("-", "_") not in given}
    values.update(given)
    return TrainConfig.from_dict(values, f"--config {config_file}" if config_file else "flags", lines)


def run_train(flags: dict[str, Any], config_file: str | None, resume_dir: str | None):
    """The whole `loraforge train` command: a new run, or --resume RUN_DIR (only --steps may change)."""
    from loraforge.rl.trainer import RESUME_OVERRIDES, resume, train

    if resume_dir:
        given = sorted(flag_of(k) for k, v in flags.items() if v is not None and k not in RESUME_OVERRIDES)
        if given or config_file:
            raise LoraforgeError(
                "--resume uses the run's saved config.json; only --steps, --max-gen-batches and "
                "--dynamic-sampling/--no-dynamic-sampling may change, but got "
                f"{', '.join(given + (['--config'] if config_file else []))}. Start a new run (-o) to change settings"
            )
        return resume(resume_dir, overrides={k: flags.get(k) for k in RESUME_OVERRIDES})
    return train(build_config(flags, config_file))


def run_verl_backend(
    flags: dict[str, Any],
    config_file: str | None,
    resume_dir: str | None,
    launch_now: bool,
    gpus_per_node: int | None,
    nodes: int,
    echo,
    overwrite: bool = False,
) -> None:
    """`loraforge train --backend verl`: write RUN_DIR/verl/ (and with --run, launch it)."""
    from loraforge.rl import verl_launch

    if resume_dir:
        raise LoraforgeError(
            "--backend verl starts a verl job; verl resumes its own runs (trainer.resume_mode=auto): "
            "run RUN_DIR/verl/run_verl.sh again (or this command again, with the same settings and --run)"
        )
    prepared = verl_launch.prepare(build_config(flags, config_file), gpus_per_node, nodes, overwrite)
    if prepared.unchanged:
        echo(
            f"{prepared.directory} already holds this job for verl {prepared.verl_version}, file for file: "
            "left it as it is (with any checkpoints verl saved there)"
        )
    else:
        echo(
            f"wrote {prepared.script} for verl {prepared.verl_version} "
            f"(and overrides.json, train.parquet, val.parquet, reward.py in {prepared.directory})"
        )
    for note in prepared.notes:
        echo(f"note: {note}")
    echo("command:\n" + verl_launch.format_command(prepared.argv))
    if not launch_now:
        echo(f"run it where verl {prepared.verl_version} is installed: bash {prepared.script}   (or add --run)")
        return
    code = verl_launch.launch(prepared, echo)
    if code != 0:
        raise LoraforgeError(f"the verl job exited with status {code}")
