"""`loraforge eval`: the paper's math benchmarks with pass@k done right (see docs/eval.md).

    from loraforge.eval import pass_at_k, evaluate, run_eval, EvalConfig
    pass_at_k(n=4, c=1, k=2)                       # 0.5: unbiased 1 - C(n-c,k)/C(n,k)
    result = evaluate(model, tokenizer, "math500", EvalConfig(model="m", benchmarks=("math500",), limit=50))

Importing this package does not import torch or transformers; `evaluate`/`run_eval` do when called.
"""

from loraforge.eval.benchmarks import BENCHMARKS, PROMPT_TEMPLATES, Benchmark, Problem, load_benchmark
from loraforge.eval.config import EvalConfig
from loraforge.eval.metrics import bootstrap_std, mean_at_k, pass_at_k
from loraforge.eval.report import format_table
from loraforge.eval.runner import evaluate, load_model, run_eval
from loraforge.eval.scoring import SCORERS, extract_answer, extract_boxed, make_scorer

__all__ = [
    "BENCHMARKS",
    "PROMPT_TEMPLATES",
    "SCORERS",
    "Benchmark",
    "EvalConfig",
    "Problem",
    "bootstrap_std",
    "evaluate",
    "extract_answer",
    "extract_boxed",
    "format_table",
    "load_benchmark",
    "load_model",
    "make_scorer",
    "mean_at_k",
    "pass_at_k",
    "run_eval",
]
