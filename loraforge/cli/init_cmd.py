"""`loraforge init`: a thin shell over loraforge.adapters.build.init_adapter. The help of each option
that sets an InitConfig field is that field's metadata help (inits/config.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths
from loraforge.core.settings import help_texts
from loraforge.inits.config import InitConfig
from loraforge.inits.methods import METHODS

HELP = help_texts(InitConfig)


@paths(reads={"model": "model"}, writes={"out": "dir"})
@click.command(context_settings={"max_content_width": 100})
@click.argument("model")
@click.option("--method", required=True, type=click.Choice(list(METHODS)), help=HELP["method"])
@click.option("-r", "--rank", "r", required=True, type=click.IntRange(min=1), help=HELP["r"])
@click.option("--alpha", type=float, default=None, help=HELP["alpha"])
@click.option("--rslora", is_flag=True, help=HELP["rslora"])
@click.option(
    "--target-modules",
    default="all-linear",
    show_default=True,
    help=HELP["target_modules"],
)
@click.option("--layers", default=None, help=HELP["layers"])
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help=HELP["seed"],
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help=HELP["device"],
)
@click.option(
    "--device-map",
    default=None,
    help="Load the whole model with this accelerate device map (auto, cpu, ...) and "
    "initialise it in memory, instead of streaming the checkpoint.",
)
@click.option(
    "--adapter-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help=HELP["adapter_dtype"],
)
@click.option(
    "--base-dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help=HELP["base_dtype"],
)
@click.option(
    "--svd",
    type=click.Choice(["exact", "fast"]),
    default="exact",
    show_default=True,
    help=HELP["svd"],
)
@click.option("--quantize", type=click.Choice(["nf4", "fp4", "int8"]), default=None, help=HELP["quantize"])
@click.option("--quant-iters", type=click.IntRange(min=0), default=5, show_default=True, help=HELP["quant_iters"])
@click.option(
    "--batch-mib",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help=HELP["batch_mib"],
)
@click.option(
    "--residual-mib",
    type=click.IntRange(min=0),
    default=512,
    show_default=True,
    help=HELP["residual_mib"],
)
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--trust-remote-code", is_flag=True, help="Allow running the model repository's own code.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output adapter directory.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def init(model, out, revision, device_map, overwrite, trust_remote_code, layers, **settings):
    """Write a ready-to-train PEFT adapter for MODEL (a Hub id or a local directory) to OUT."""
    from loraforge.adapters.build import init_adapter
    from loraforge.models.targets import parse_layers

    with user_errors():
        config = InitConfig(layers=parse_layers(layers), **settings)
        result = init_adapter(
            model,
            out,
            config,
            revision=revision,
            device_map=device_map,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            progress=sys.stderr.isatty(),
        )
    for name, (why, count) in _grouped(result.manifest.get("skipped", {})).items():
        what = name if count == 1 else f"{name} ({count} modules)"
        click.echo(f"note: {what} left out of the default targets ({why})", err=True)
    peft_form = result.manifest.get("peft") or {}
    if peft_form.get("modules_as_parameters"):
        click.echo(
            f"note: {', '.join(peft_form['modules_as_parameters'])} written as PEFT target_parameters: PEFT would not "
            "adapt them as planned from target_modules on this model type (see loraforge.json 'peft')",
            err=True,
        )
    s = result.manifest["summary"]
    stacks = [m["experts"] for m in result.manifest["modules"].values() if m.get("experts")]
    experts = f" ({len(stacks)} of them expert stacks, {sum(stacks)} experts)" if stacks else ""
    click.echo(
        f"{config.method} r={config.r}: {result.modules} modules{experts} in {result.seconds:.1f} s, "
        f"max relative reconstruction error {s['recon_rel_max']:.2e} -> {result.out}"
    )
    if "quant_rel_max" in s:
        click.echo(
            f"on a {config.quantize} base: relative error of Q(base) + s B0 A0 against W, max "
            f"{s['quant_rel_max']:.2e}, median {s['quant_rel_median']:.2e} (loraforge.json 'quantize')"
        )
    # which base a server loads, with vLLM's flags for this rank (the same line `loraforge verify` ends with)
    from loraforge.ship.verify import serve_line

    click.echo(serve_line(Path(result.out), METHODS[config.method], result.manifest["source"]["model_id"], config.r))


def _grouped(skipped: dict[str, str]) -> dict[str, tuple[str, int]]:
    """{name: reason} grouped over layers: model.layers.*.mlp.shared_expert_gate once, with a count."""
    import re

    groups: dict[str, list[str]] = {}
    for name in skipped:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(name)
    return {(n[0] if len(n) == 1 else key): (skipped[n[0]], len(n)) for key, n in groups.items()}
