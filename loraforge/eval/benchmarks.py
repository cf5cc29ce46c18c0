"""The paper's benchmarks (Hub ids, fields, evaluation settings) and local benchmark files.

Settings per benchmark follow the paper's appendix C.2, Table 3 (DeepSeek-R1-Distill-Qwen-1.5B runs):

| name    | Hub dataset                 | split | question  | answer                 | n  | T   | top-p | max new |
|---------|-----------------------------|-------|-----------|------------------------|----|-----|-------|---------|
| gsm8k   | openai/gsm8k (config main)  | test  | question  | answer, after "####"   | 1  | 0   | 1.0   | 4096    |
| math500 | HuggingFaceH4/MATH-500      | test  | problem   | answer                 | 4  | 0.6 | 0.95  | 8192    |
| aime22  | AI-MO/aimo-validation-aime  | train | problem   | answer (url has 2022)  | 32 | 0.6 | 0.95  | 16384   |
| aime23  | (same, url has 2023)        |       |           |                        |    |     |       |         |
| aime24  | (same, url has 2024)        |       |           |                        |    |     |       |         |

Top-k is off everywhere and prompts are limited to 1024 tokens. AI-MO/aimo-validation-aime holds the
90 problems of AIME 2022-2024; its `url` field points at the AoPS wiki page of each problem, whose name
starts with the year ("2022_AIME_I_Problems/Problem_1"), which is how the three years are told apart.

`synthetic:KEY=VALUE,...` is the built-in arithmetic task (loraforge.tasks.synthetic), usually its held-out
split: `synthetic:level=1-3,n=256,split=heldout` gives 256 distinct problems that `--data
synthetic:level=1-3,split=train` never trains on. Score it with `--scorer number`, the reward it trains with.

A local FILE (.jsonl, .json or .parquet) needs a question field (`problem`, `question` or `prompt`,
first found) holding a string and an `answer` field; an optional `id` names the problem. Gold answers
of the form "... #### 72" (GSM8K's solutions) are cut to what follows the last "####".
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.core.errors import LoraforgeError
from loraforge.core.rowfiles import gold_answer, read_row_file
from loraforge.tasks.synthetic import is_synthetic, rows_from_spec

QUESTION_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELD = "answer"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a named benchmark lives and the paper's settings for it."""

    name: str
    dataset: str  # Hub dataset id
    config: str | None  # Hub dataset config name (None: the default one)
    split: str
    question_field: str
    answer_field: str
    samples: int  # samples per problem
    ks: tuple[int, ...]  # the k of pass@k reported by default
    temperature: float  # 0 means greedy decoding
    top_p: float
    max_new_tokens: int
    year: int | None = None  # AIME: keep rows whose url names this year
    description: str = ""


_AIME = dict(
    dataset="AI-MO/aimo-validation-aime",
    config=None,
    split="train",
    question_field="problem",
    answer_field="answer",
    samples=32,
    ks=(1, 32),
    temperature=0.6,
    top_p=0.95,
    max_new_tokens=16384,
)

BENCHMARKS: dict[str, BenchmarkSpec] = {
    "gsm8k": BenchmarkSpec(
        "gsm8k",
        "openai/gsm8k",
        "main",
        "test",
        "question",
        "answer",
        samples=1,
        ks=(1,),
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=4096,
        description="GSM8K test, 1,319 grade-school word problems; pass@1 greedy",
    ),
    "math500": BenchmarkSpec(
        "math500",
        "HuggingFaceH4/MATH-500",
        None,
        "test",
        "problem",
        "answer",
        samples=4,
        ks=(1, 4),
        temperature=0.6,
        top_p=0.95,
        max_new_tokens=8192,
        description="MATH500, 500 competition problems; 4 samples at T=0.6, top-p 0.95",
    ),
    **{
        f"aime{yy}": BenchmarkSpec(
            name=f"aime{yy}",
            year=2000 + yy,
            **_AIME,
            description=f"AIME 20{yy}, 30 problems; 32 samples at T=0.6, top-p 0.95",
        )
        for yy in (22, 23, 24)
    },
}

# Defaults for a local file: one greedy sample, GSM8K's response budget.
FILE_DEFAULTS = dict(samples=1, ks=(1,), temperature=0.0, top_p=1.0, max_new_tokens=4096)
# The synthetic task's answers are one number: a short budget (the replication study trains with 32 tokens).
SYNTHETIC_DEFAULTS = dict(samples=1, ks=(1,), temperature=0.0, top_p=1.0, max_new_tokens=64)

# The prompt DAPO-Math-17k trains with (the paper's training prompts), so an RLVR-trained model is
# asked in the format it learned, and the DAPO scorer (which reads only `Answer:`) can score it.
PROMPT_TEMPLATES: dict[str, str] = {
    "dapo": (
        "Solve the following math problem step by step. The last line of your response should be of "
        "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "{problem}\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    ),
    "boxed": ("{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."),
    "raw": "{problem}",
}


def resolve_template(template: str) -> str:
    """A template name (dapo, boxed, raw) or a literal template containing `{problem}`."""
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if "{problem}" not in template:
        raise LoraforgeError(
            f"--prompt-template {template!r} is neither a known template "
            f"({', '.join(PROMPT_TEMPLATES)}) nor a template containing {{problem}}; "
            "pass one of the names or a string with {problem} where the question goes"
        )
    import string

    try:
        # only the bare {problem}: an index, attribute, conversion or format spec ({problem[0]}, {problem.x},
        # {problem:>999999999}) is checked here against "x" but applied to every real problem later, where an
        # empty one raised IndexError and a width took gigabytes
        odd = [
            f
            for _, f, spec, conv in string.Formatter().parse(template)
            if f is not None and (f, spec, conv) != ("problem", "", None)
        ]
    except ValueError as e:
        odd, error = None, e
    if odd is None or odd:
        found = f"{{{odd[0]}...}}" if odd else f"{type(error).__name__}: {error}"
        raise LoraforgeError(
            f"--prompt-template cannot be filled ({found}); write literal braces as {{{{ and }}}}, and use only "
            "{problem}, as it is"
        ) from None
    return template


@dataclass
class Problem:
    id: str
    question: str
    answer: str


@dataclass
class Benchmark:
    """A loaded benchmark: its problems, where they came from, and its default settings."""

    name: str
    problems: list[Problem]
    source: dict  # dataset id / config / split, or file path and sha256
    defaults: dict = field(default_factory=lambda: dict(FILE_DEFAULTS))


def known_benchmarks_text() -> str:
    return ", ".join(BENCHMARKS)


def gold_from_gsm8k(answer: str) -> str:
    """GSM8K's answer field is a worked solution ending in `#### 72`: keep the number after ####."""
    if "####" not in answer:
        return answer.strip()
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def aime_year(url: str) -> int | None:
    """The year of an AIME problem from its AoPS wiki url (".../2023_AIME_II_Problems/Problem_4")."""
    m = re.search(r"(\d{4})_AIME", url or "")
    return int(m.group(1)) if m else None


def _rows_to_problems(rows, question_field: str | None, answer_field: str, where: str) -> list[Problem]:
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LoraforgeError(f"{where}: row {i + 1} is a {type(row).__name__}, expected a JSON object")
        q_field = question_field or next((f for f in QUESTION_FIELDS if f in row), None)
        if q_field is None or q_field not in row:
            wanted = question_field or " or ".join(QUESTION_FIELDS)
            raise LoraforgeError(
                f"{where}: row {i + 1} has no question field ({wanted}); its fields are "
                f"{sorted(row)}. Rename the question field to `problem`"
            )
        if answer_field not in row:
            raise LoraforgeError(
                f"{where}: row {i + 1} has no `{answer_field}` field (fields: {sorted(row)}); every "
                f"row needs the gold answer in `{answer_field}`"
            )
        question = row[q_field]
        if not isinstance(question, str):
            raise LoraforgeError(
                f"{where}: row {i + 1}: `{q_field}` is a {type(question).__name__}, expected a string "
                "(chat-message lists are not supported; put the problem text there)"
            )
        pid = str(row.get("id", row.get("unique_id", i)))
        gold = gold_answer(row[answer_field], f"{where}: row {i + 1}", answer_field)
        problems.append(Problem(pid, question, gold_from_gsm8k(gold)))
    return problems


def load_file(path: str | os.PathLike, limit: int | None = None) -> Benchmark:
    """A benchmark from a local .jsonl / .json / .parquet file."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "is not a regular file (a pipe?)" if p.exists() else "does not exist"
        raise LoraforgeError(f"benchmark file {p} {what}; give a .jsonl, .json or .parquet file to --bench")
    rows = read_row_file(p)
    if not rows:
        raise LoraforgeError(f"benchmark file {p} holds no rows")
    problems = _rows_to_problems(rows, None, ANSWER_FIELD, str(p))
    if limit is not None:
        problems = problems[:limit]
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return Benchmark(p.stem, problems, {"file": str(p.resolve()), "sha256": digest, "rows": len(rows)})


def _load_hub_rows(spec: BenchmarkSpec, revision: str | None):
    try:
        import datasets
    except ImportError:
        raise LoraforgeError(
            f"benchmark {spec.name} is read from the Hub ({spec.dataset}) with the `datasets` package, "
            f"which is not installed: `pip install datasets`, or download the {spec.split} split and "
            f"pass the file (.jsonl/.parquet with `{spec.question_field}` and `{spec.answer_field}`) "
            "to --bench"
        ) from None
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, revision=revision)
    except Exception as e:  # network, auth, offline mode: all end the same way for the user
        raise LoraforgeError(
            f"could not load benchmark {spec.name} from the Hub dataset {spec.dataset}"
            f"{' (config ' + spec.config + ')' if spec.config else ''}, split {spec.split}: "
            f"{type(e).__name__}: {e}. Check the network (or HF_DATASETS_OFFLINE / the cache), or "
            "pass a local copy of the split as a file to --bench"
        ) from None
    return list(ds), getattr(ds, "_fingerprint", None)


def hub_rows_to_benchmark(
    spec: BenchmarkSpec,
    rows: list,
    fingerprint: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> Benchmark:
    """Turn the rows of a Hub split into a Benchmark (AIME: keep only the spec's year)."""
    if spec.year is not None:
        rows = [r for r in rows if aime_year(r.get("url", "")) == spec.year]
        if not rows:
            raise LoraforgeError(
                f"{spec.dataset} has no rows whose url names {spec.year}; the dataset's layout may have "
                "changed: pass the problems as a local file to --bench"
            )
    where = f"{spec.dataset} ({spec.split})"
    problems = _rows_to_problems(rows, spec.question_field, spec.answer_field, where)
    if limit is not None:
        problems = problems[:limit]
    source = {
        "dataset": spec.dataset,
        "config": spec.config,
        "split": spec.split,
        "revision": revision,
        "fingerprint": fingerprint,
        "rows": len(rows),
    }
    defaults = dict(
        samples=spec.samples,
        ks=spec.ks,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_new_tokens=spec.max_new_tokens,
    )
    return Benchmark(spec.name, problems, source, defaults)


def load_synthetic(spec: str, limit: int | None = None) -> Benchmark:
    """The built-in arithmetic task from its spec (`synthetic:level=1-3,n=256,split=heldout`)."""
    rows = rows_from_spec(spec, flag="--bench")
    problems = [Problem(str(i), r["prompt"], r["answer"]) for i, r in enumerate(rows)]
    if limit is not None:
        problems = problems[:limit]
    digest = hashlib.sha256("\n".join(f"{p.question}\t{p.answer}" for p in problems).encode()).hexdigest()
    return Benchmark(spec, problems, {"synthetic": spec, "sha256": digest, "rows": len(rows)}, dict(SYNTHETIC_DEFAULTS))


def load_benchmark(name_or_path: str, limit: int | None = None, revision: str | None = None) -> Benchmark:
    """A named benchmark (gsm8k, math500, aime22, aime23, aime24) from the Hub, the synthetic task, or a file."""
    if is_synthetic(name_or_path):
        return load_synthetic(name_or_path, limit)
    if name_or_path in BENCHMARKS:
        spec = BENCHMARKS[name_or_path]
        rows, fingerprint = _load_hub_rows(spec, revision)
        return hub_rows_to_benchmark(spec, rows, fingerprint, revision, limit)
    p = Path(name_or_path)
    if p.suffix.lower() in (".jsonl", ".json", ".parquet") or p.exists():
        return load_file(p, limit)
    raise LoraforgeError(
        f"--bench {name_or_path!r} is neither a known benchmark ({known_benchmarks_text()}), nor "
        "synthetic:KEY=VALUE,..., nor a .jsonl/.json/.parquet file"
    )
