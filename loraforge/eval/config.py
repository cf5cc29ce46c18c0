"""EvalConfig: everything one `loraforge eval` run needs, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from loraforge.core.errors import LoraforgeError
from loraforge.core.settings import MIN_TEMPERATURE, in_int64
from loraforge.eval.scoring import SCORERS


@dataclass
class EvalConfig:
    """Settings of an evaluation. None in a sampling field means the benchmark's paper default."""

    model: str = ""  # --model: base model, Hub id or local directory
    benchmarks: tuple[str, ...] = ()  # --bench: names (gsm8k, math500, aime22-24) or files
    adapter: str | None = None  # --adapter: PEFT adapter directory (or Hub id) to load on the base
    revision: str | None = None  # --revision: Hub revision of the base model (recorded in the report)
    samples: int | None = None  # --samples: samples per problem (n of pass@k)
    k: tuple[int, ...] | None = None  # --k: the k of pass@k, each <= samples
    temperature: float | None = None  # --temperature: 0 means greedy decoding
    greedy: bool = False  # --greedy: also one greedy response per problem, in the same pass ("greedy" metric)
    top_p: float | None = None  # --top-p: nucleus mass in (0, 1]
    max_new_tokens: int | None = None  # --max-new-tokens: response budget in tokens
    max_prompt_tokens: int = 1024  # --max-prompt-tokens: longer prompts are an error (paper: 1024)
    scorer: str = "math-verify"  # --scorer: math-verify, dapo, dapo-boxed or number
    prompt_template: str = "dapo"  # --prompt-template: dapo, boxed, raw or a string with {problem}
    chat_template: bool | None = None  # --chat-template/--no-chat-template: None = when the tokenizer has one
    limit: int | None = None  # --limit: first N problems of each benchmark, for quick looks
    batch_size: int = 8  # --batch-size: prompts per generate call
    seeds: tuple[int, ...] = (0,)  # --seed: several seeds give a per-seed spread instead of bootstrap
    bootstrap: int = 1000  # --bootstrap: resamples of the problems for the spread (0 = none)
    dtype: str = "auto"  # --dtype: auto, float32, bfloat16 or float16
    device: str = "auto"  # --device: auto (cuda when available), cpu, cuda, cuda:1, ...
    output: str | None = None  # -o: report JSON path; per-sample jsonl goes beside it
    samples_path: str | None = None  # --samples-out: per-sample jsonl (default REPORT.samples.jsonl)
    extra: dict = field(default_factory=dict)  # free-form notes copied into the report

    def validate(self) -> EvalConfig:
        """Raise LoraforgeError naming the flag of the first bad value; return self."""
        if not self.model:
            raise LoraforgeError("--model is required: a Hub id or a local model directory")
        if not self.benchmarks:
            raise LoraforgeError("--bench is required: gsm8k, math500, aime22, aime23, aime24 or a file")
        _at_least("--samples", self.samples, 1)
        if self.k is not None:
            if not self.k:
                raise LoraforgeError("--k needs at least one value, e.g. --k 1,4")
            for k in self.k:
                _at_least("--k", k, 1)
            if self.samples is not None and max(self.k) > self.samples:
                raise LoraforgeError(
                    f"--k {max(self.k)} is larger than --samples {self.samples}: pass@k needs at least "
                    f"k samples per problem; raise --samples to {max(self.k)} or drop that k"
                )
        if self.temperature is not None and not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 10):
            raise LoraforgeError(
                f"--temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, 10], got {self.temperature}: a "
                "smaller one overflows the logits and samples garbage; use 0 for greedy decoding"
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LoraforgeError(f"--top-p must be in (0, 1], got {self.top_p}")
        _at_least("--max-new-tokens", self.max_new_tokens, 1)
        _at_least("--max-prompt-tokens", self.max_prompt_tokens, 1)
        _at_least("--limit", self.limit, 1)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--bootstrap", self.bootstrap, 0)
        if not self.seeds:
            raise LoraforgeError("--seed needs at least one value")
        bad = [s for s in self.seeds if not isinstance(s, int) or not in_int64(s)]
        if bad:
            raise LoraforgeError(f"--seed {bad[0]} is not a 64-bit integer, which torch needs; use a smaller seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise LoraforgeError(f"--seed values must differ, got {list(self.seeds)}")
        if self.scorer not in SCORERS:
            raise LoraforgeError(f"--scorer {self.scorer!r} is not known; choose one of: {', '.join(SCORERS)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LoraforgeError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        return self

    def settings_for(self, defaults: dict) -> dict:
        """Sampling settings for one benchmark: the flags given, else the benchmark's defaults."""
        s = {
            "samples": self.samples if self.samples is not None else defaults["samples"],
            "temperature": self.temperature if self.temperature is not None else defaults["temperature"],
            "top_p": self.top_p if self.top_p is not None else defaults["top_p"],
            "max_new_tokens": self.max_new_tokens if self.max_new_tokens is not None else defaults["max_new_tokens"],
        }
        if self.k is not None:
            ks = tuple(self.k)
        else:
            # The default ks follow the sample count: 1 and n (the paper's "@n").
            ks = tuple(sorted({k for k in defaults["ks"] if k <= s["samples"]} | {1, s["samples"]}))
        s["ks"] = ks
        return s

    def to_dict(self) -> dict:
        return asdict(self)


def _at_least(flag: str, value, low: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LoraforgeError(f"{flag} must be an integer >= {low}, got {value!r}")


def parse_list(flag: str, text: str | None, kind=str) -> tuple | None:
    """A comma-separated flag value ("1,4,32") as a tuple; the error names the flag."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise LoraforgeError(f"{flag} got an empty list; give comma-separated values, e.g. {flag} 1,4")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        raise LoraforgeError(
            f"{flag} {text!r}: expected comma-separated {kind.__name__} values, e.g. {flag} 1,4"
        ) from None


def parse_benchmarks(text: str | None) -> tuple[str, ...] | None:
    """`gsm8k,synthetic:level=1-3,n=256,math500` -> ("gsm8k", "synthetic:level=1-3,n=256", "math500"): the
    comma list of --bench, where the key=value parts after a `synthetic:` spec belong to it."""
    parts = parse_list("--bench", text)
    if parts is None:
        return None
    out: list[str] = []
    for part in parts:
        if "=" in part and out and out[-1].startswith("synthetic:"):
            out[-1] += "," + part
        else:
            out.append(part)
    return tuple(out)


def config_from_flags(bench: str, k: str | None = None, seed: str | None = "0", **flags) -> EvalConfig:
    """EvalConfig from the CLI's raw values (comma lists parsed here), validated."""
    return EvalConfig(
        benchmarks=parse_benchmarks(bench),
        k=parse_list("--k", k, int),
        seeds=parse_list("--seed", seed, int) or (0,),
        **flags,
    ).validate()
