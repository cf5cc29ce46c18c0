"""`loraforge eval`: parse flags, build an EvalConfig, run it, print the table (see docs/eval.md)."""

import click

from loraforge.cli._common import user_errors
from loraforge.cli._paths import paths
from loraforge.eval.scoring import SCORERS

option = click.option
BENCH_HELP = (
    "gsm8k, math500, aime22, aime23, aime24, synthetic:KEY=VALUE,... (e.g. synthetic:level=1-3,n=256,split=heldout) "
    "or a .jsonl/.json/.parquet file; comma-separated."
)


@paths(
    reads={"model": "model", "adapter": "adapter", "bench": "benchmarks"},
    writes={"output": "report", "samples_path": "file"},
)
@click.command("eval")
@option("--model", required=True, help="Base model: Hub id or local directory.")
@option("--adapter", default=None, help="PEFT adapter directory to load on the base.")
@option("--revision", default=None, help="Hub revision of the base model.")
@option("--bench", required=True, help=BENCH_HELP)
@option("--samples", type=int, default=None, help="Samples per problem (default: the paper's per benchmark).")
@option("--k", default=None, help="k of pass@k, comma-separated, each <= samples (default: 1 and n).")
@option("--temperature", type=float, default=None, help="Sampling temperature; 0 = greedy (default: paper's).")
@option(
    "--greedy",
    is_flag=True,
    help="Also decode one greedy response per problem in the same pass, reported as `greedy` (with sampling).",
)
@option("--top-p", type=float, default=None, help="Nucleus mass in (0, 1] (default: paper's).")
@option("--max-new-tokens", type=int, default=None, help="Response budget (default: paper's, 4096-16384).")
@option("--max-prompt-tokens", type=int, default=1024, show_default=True, help="Longer prompts are an error.")
@option(
    "--scorer",
    type=click.Choice(SCORERS),
    default="math-verify",
    show_default=True,
    help="math-verify (answer equivalence), dapo / dapo-boxed (verl's DAPO scorer), number (one final number).",
)
@option("--prompt-template", default="dapo", show_default=True, help="dapo, boxed, raw, or a string with {problem}.")
@option("--chat-template/--no-chat-template", default=None, help="Wrap prompts in the chat template (default: if any).")
@option("--limit", type=int, default=None, help="Only the first N problems of each benchmark.")
@option("--batch-size", type=int, default=8, show_default=True, help="Sequences (prompt x sample) decoded at once.")
@option(
    "--seed", default="0", show_default=True, help="Sampling seed(s), comma-separated; several give a per-seed spread."
)
@option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the spread (0: none).")
@option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@option("-o", "--output", required=True, help="Report JSON path; per-sample jsonl goes to REPORT.samples.jsonl.")
@option("--samples-out", "samples_path", default=None, help="Per-sample jsonl path (default: beside the report).")
def eval_command(**flags):
    """Evaluate a model (+ adapter) on the paper's math benchmarks: pass@k and mean@k."""
    from loraforge.eval import format_table, run_eval
    from loraforge.eval.config import config_from_flags

    with user_errors():
        report = run_eval(config_from_flags(**flags))
    click.echo(format_table(report))
    click.echo(f"report: {flags['output']}  samples: {report.get('samples_file')}")
