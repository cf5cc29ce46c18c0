"""`loraforge verify`: a thin shell over loraforge.ship.verify.verify_adapter."""

from __future__ import annotations

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths


@paths(reads={"out": "adapter", "base": "model"})
@click.command(context_settings={"max_content_width": 100})
@click.argument("out", type=click.Path())
@click.option("--base", default=None, help="The ORIGINAL model (Hub id or directory) [default: the manifest's source].")
@click.option("--device", default="auto", show_default=True, help="Where the checks compute: auto, cpu, cuda, cuda:N.")
@click.option(
    "--logit-max-params",
    type=click.IntRange(min=0),
    default=None,
    help="Residualised methods: compare logits through PEFT when the base has at most this many parameters "
    "[default: 200000000].",
)
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "fp4", "int8"]),
    default=None,
    help="Also check the adapter on the base quantized by bitsandbytes: error per module, PEFT's logits "
    "[default: the format init --quantize recorded, if any].",
)
def verify(out, base, device, logit_max_params, quantize):
    """Check the init directory OUT against its manifest and its base; exit 1 naming failing modules."""
    from loraforge.ship.verify import verify_adapter

    with user_errors():
        limit = {} if logit_max_params is None else {"logit_max_params": logit_max_params}
        report = verify_adapter(out, base=base, device=device, quantize=quantize, **limit)
    click.echo(
        f"{report.path}: {report.method} r={report.r}, {len(report.modules)} modules, against {report.base_model}"
    )
    for c in report.checks:
        click.echo(f"  {c.name:<15} {c.status:<7} {c.detail}".rstrip())
        for what, why in list(c.failures.items())[:20]:
            click.echo(f"      {what}: {why}")
        if len(c.failures) > 20:
            click.echo(f"      ... and {len(c.failures) - 20} more")
    click.echo(report.serve)
    if not report.ok:
        failing = report.failing
        raise click.ClickException(
            f"verification failed for {len(failing)} module(s)/file(s): {', '.join(failing[:10])}"
            + (" ..." if len(failing) > 10 else "")
        )
