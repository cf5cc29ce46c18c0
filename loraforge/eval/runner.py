"""Running an evaluation: prompts, batched sampling (loraforge.sampling.generation, shared with `train`),
scoring, pass@k / mean@k with their spread.

Two entry points:
- `evaluate(model, tokenizer, benchmark, config)`: one benchmark on an already loaded model; this is
  what a training loop calls every N steps on a held-out slice (returns a dict, writes nothing).
- `run_eval(config)`: what `loraforge eval` runs: loads the model (and adapter), evaluates every
  benchmark, writes the JSON report and the per-sample jsonl.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraforge.core.atomic import DirLock, FileStaging
from loraforge.core.errors import LoraforgeError
from loraforge.eval.benchmarks import Benchmark, load_benchmark, resolve_template
from loraforge.eval.config import EvalConfig
from loraforge.eval.metrics import bootstrap_std, problem_scores, seed_spread
from loraforge.eval.report import SampleWriter, check_writable, report_json, samples_path_for
from loraforge.eval.scoring import make_scorer

# (prompts, settings, seed) -> for each prompt, `settings["samples"]` response texts (with settings["greedy"],
# one greedy response first, then those).
SampleFn = Callable[[Sequence, dict, int], list[list[str]]]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def resolve_settings(config: EvalConfig, bench: Benchmark) -> dict:
    """The sampling settings one benchmark runs with, checked against each other."""
    s = config.settings_for(bench.defaults)
    given = "--samples" if config.samples is not None else f"{bench.name}'s default"
    if max(s["ks"]) > s["samples"]:
        raise LoraforgeError(
            f"--k {max(s['ks'])} is larger than the {s['samples']} samples per problem of {bench.name} "
            f"({given}): pass@k needs n >= k samples; pass --samples {max(s['ks'])} or a smaller --k"
        )
    if config.greedy and s["temperature"] == 0:
        raise LoraforgeError(
            f"--greedy adds one greedy response to {bench.name}'s sampled ones, but the temperature is 0, so every "
            "response is greedy already: drop --greedy, or sample with --temperature > 0"
        )
    if s["temperature"] == 0 and s["samples"] > 1:
        raise LoraforgeError(
            f"{bench.name} would sample {s['samples']} responses per problem with temperature 0 (greedy), "
            "which makes them all identical; pass --samples 1 for greedy decoding or --temperature > 0"
        )
    s.update(
        top_k=-1,
        max_prompt_tokens=config.max_prompt_tokens,
        seeds=list(config.seeds),
        batch_size=config.batch_size,
        greedy=config.greedy,
    )
    return s


def build_prompts(tokenizer, bench: Benchmark, template: str, chat_template: bool | None, limit: int | None = None):
    """Token ids of every problem's prompt, and the prompt texts (for the per-sample records).

    With a chat template the filled template is the user turn and the generation prompt is added
    (its special tokens come from the template); without one, the tokenizer adds its usual special
    tokens (e.g. Llama's BOS), as a plain `tokenizer(text)` would.

    With LIMIT (--max-prompt-tokens), a text longer than LIMIT x `max_token_chars` characters holds more than
    LIMIT tokens whatever they are, and is refused before it is tokenised: memory and time follow the setting,
    not the data (a 6 MB problem took 1.3 GB and 40 s to tokenise, only to be refused as too long).
    """
    from loraforge.sampling.generation import max_token_chars

    has_chat = getattr(tokenizer, "chat_template", None) is not None
    use_chat = has_chat if chat_template is None else chat_template
    if use_chat and not has_chat:
        raise LoraforgeError(
            "--chat-template was asked for but the tokenizer has no chat template; pass --no-chat-template"
        )
    texts, ids = [], []
    for p in bench.problems:
        text = template.format(problem=p.question)
        if use_chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        if limit is not None and len(text) > limit * max_token_chars(tokenizer):
            raise LoraforgeError(
                f"{bench.name}: the prompt of problem {p.id} is {len(text):,} characters, more than "
                f"--max-prompt-tokens {limit} tokens can hold (at most {max_token_chars(tokenizer)} characters a "
                "token for this tokenizer); raise the limit or drop the problem"
            )
        if use_chat:
            tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            tok = tokenizer(text, add_special_tokens=True)["input_ids"]
        texts.append(text)
        ids.append(list(tok))
    return texts, ids, use_chat


def generation_sample_fn(model, tokenizer, batch_size: int) -> SampleFn:
    """The default sampler: loraforge.sampling.generation.generate, the code `train` samples rollouts with."""
    import torch

    from loraforge.sampling.generation import SamplingParams, generate

    device = next(model.parameters()).device

    def sample(prompts, settings, seed):
        greedy = int(settings.get("greedy", False))  # one prefill per prompt for the greedy and sampled rows
        params = SamplingParams(
            n=settings["samples"] + greedy,
            max_new_tokens=settings["max_new_tokens"],
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            top_k=-1,
            max_prompt_tokens=None,  # over-long prompts were rejected before sampling
            greedy_first=greedy,
        )
        # One generator per (benchmark, seed) across all chunks: the run is reproducible.
        gen = torch.Generator(device=device).manual_seed(int(seed))
        n = params.n
        # batch_size counts rows (prompt x sample), as generate's does; each call takes whole prompts
        # (at least one, whose n rows generate splits further when n > batch_size).
        per_call = max(1, batch_size // n)
        out: list[list[str]] = []
        for start in range(0, len(prompts), per_call):
            chunk = list(prompts[start : start + per_call])
            g = generate(model, tokenizer, chunk, params, generator=gen, batch_size=batch_size)
            out += [g.texts[i * n : (i + 1) * n] for i in range(len(chunk))]
        return out

    return sample


def _model_info(model) -> dict:
    cfg = getattr(model, "config", None)
    info = {
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
        "revision": getattr(cfg, "_commit_hash", None),
        "adapter": None,
    }
    peft_cfg = getattr(model, "peft_config", None)
    if isinstance(peft_cfg, dict) and peft_cfg:
        first = next(iter(peft_cfg.values()))
        info["adapter"] = {
            "peft_type": str(getattr(first, "peft_type", "")),
            "base_model_name_or_path": getattr(first, "base_model_name_or_path", None),
        }
    return info


@dataclass
class _SeedResult:
    """What one sampling seed gave: (n, correct) per problem, greedy correctness per problem, records."""

    counts: list[tuple[int, int]]
    greedy: list[tuple[int, int]]
    records: list[dict]
    no_answer: int
    gen_s: float
    score_s: float


def evaluate(
    model,
    tokenizer,
    benchmark: Benchmark | str,
    config: EvalConfig | None = None,
    *,
    sample_fn: SampleFn | None = None,
    scorer=None,
    keep_samples: bool = False,
    model_info: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate one benchmark on a loaded model; return its result dict (see docs/eval.md).

    `benchmark` is a Benchmark or a name / file path (loaded with config.limit). `sample_fn` replaces
    sampling (tests, other engines); by default loraforge.sampling.generation samples. With keep_samples the
    result carries the per-sample records under "samples". The model's train/eval mode is restored.
    """
    config = config or EvalConfig(model="(in memory)", benchmarks=("(in memory)",))
    benchmark = _limited(benchmark, config)
    settings = resolve_settings(config, benchmark)
    template = resolve_template(config.prompt_template)
    scorer = scorer or make_scorer(config.scorer)
    texts, prompt_ids, used_chat = build_prompts(
        tokenizer, benchmark, template, config.chat_template, config.max_prompt_tokens
    )
    _check_prompt_lengths(benchmark, prompt_ids, config.max_prompt_tokens)
    sample_fn = sample_fn or generation_sample_fn(model, tokenizer, config.batch_size)

    started, t0 = _now(), time.perf_counter()
    runs = []
    for seed in config.seeds:
        if progress:
            extra = " + 1 greedy" if settings["greedy"] else ""
            progress(f"{benchmark.name}: sampling {len(texts)} prompts x {settings['samples']}{extra} (seed {seed})")
        runs.append(_run_seed(sample_fn, prompt_ids, texts, benchmark, settings, seed, scorer, keep_samples))
    n = settings["samples"]
    counts = {
        "samples": n * len(texts) * len(config.seeds),
        "correct": sum(c for r in runs for _, c in r.counts),
        "no_answer": sum(r.no_answer for r in runs),
        "correct_per_problem": [[c for _, c in r.counts] for r in runs],
    }
    if settings["greedy"]:
        counts["greedy_correct_per_problem"] = [[c for _, c in r.greedy] for r in runs]
    result = {
        "benchmark": benchmark.name,
        "source": benchmark.source,
        "problems": len(benchmark.problems),
        "scorer": scorer.name,
        "prompt_template": template,
        "chat_template": used_chat,
        "settings": settings,
        "model": model_info if model_info is not None else _model_info(model),
        "metrics": _metrics(settings, config, runs),
        "counts": counts,
        "started": started,
        "time_s": {
            "generate": round(sum(r.gen_s for r in runs), 3),
            "score": round(sum(r.score_s for r in runs), 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    if keep_samples:
        result["samples"] = [rec for r in runs for rec in r.records]
    return result


def _limited(benchmark: Benchmark | str, config: EvalConfig) -> Benchmark:
    if isinstance(benchmark, str):
        benchmark = load_benchmark(benchmark, limit=config.limit)
    elif config.limit is not None:
        benchmark = Benchmark(benchmark.name, benchmark.problems[: config.limit], benchmark.source, benchmark.defaults)
    if not benchmark.problems:
        raise LoraforgeError(f"benchmark {benchmark.name} has no problems to evaluate")
    return benchmark


def _check_prompt_lengths(benchmark: Benchmark, prompt_ids: list, limit: int) -> None:
    for p, ids in zip(benchmark.problems, prompt_ids):
        if len(ids) > limit:
            raise LoraforgeError(
                f"{benchmark.name}: the prompt of problem {p.id} is {len(ids)} tokens, over "
                f"--max-prompt-tokens {limit}; raise the limit or drop the problem"
            )


def _run_seed(sample_fn, prompt_ids, texts, benchmark, settings, seed, scorer, keep_samples) -> _SeedResult:
    """Sample every problem with one seed and score it. With settings["greedy"] the sampler returns the
    greedy response first, then the `samples` sampled ones."""
    n, greedy = settings["samples"], settings["greedy"]
    t = time.perf_counter()
    responses = sample_fn(prompt_ids, settings, seed)
    gen_s = time.perf_counter() - t
    per_prompt = n + int(greedy)
    if len(responses) != len(texts) or any(len(r) != per_prompt for r in responses):
        raise LoraforgeError(
            f"the sampler returned {[len(r) for r in responses][:8]}... responses for {len(texts)} "
            f"prompts; expected {per_prompt} per prompt"
        )
    t = time.perf_counter()
    out = _SeedResult([], [], [], 0, gen_s, 0.0)
    for i, (problem, outs) in enumerate(zip(benchmark.problems, responses)):
        correct = []
        for j, response in enumerate(outs):
            s = scorer.score(response, problem.answer)
            correct.append(int(s.correct))
            out.no_answer += int(s.extracted is None and not (greedy and j == 0))
            if keep_samples:
                is_greedy = greedy and j == 0
                out.records.append(
                    {
                        "benchmark": benchmark.name,
                        "problem_id": problem.id,
                        "problem_index": i,
                        "seed": seed,
                        "sample": None if is_greedy else j - int(greedy),
                        "greedy": is_greedy,
                        "prompt": texts[i],
                        "response": response,
                        "gold": problem.answer,
                        "extracted": s.extracted,
                        "correct": s.correct,
                        "scorer": scorer.name,
                        **({"detail": s.detail} if s.detail else {}),
                    }
                )
        if greedy:
            out.greedy.append((1, correct.pop(0)))
        out.counts.append((n, sum(correct)))
    out.score_s = time.perf_counter() - t
    return out


def _metrics(settings: dict, config: EvalConfig, runs: list[_SeedResult]) -> list[dict]:
    """pass@k for each k, mean@n, and greedy accuracy when asked, each with its spread."""
    n = settings["samples"]
    wanted = [("pass", k, "counts") for k in settings["ks"]] + [("mean", n, "counts")]
    if settings["greedy"]:
        wanted.append(("greedy", 1, "greedy"))
    metrics = []
    for kind, k, field_ in wanted:
        per_seed = [problem_scores(getattr(r, field_), "pass" if kind == "greedy" else kind, k) for r in runs]
        seed_scores = [sum(v) / len(v) for v in per_seed]
        score = sum(seed_scores) / len(seed_scores)
        if len(config.seeds) > 1:
            spread = seed_spread(seed_scores, config.seeds)
        elif config.bootstrap > 0:
            spread = bootstrap_std(per_seed[0], config.bootstrap, seed=config.seeds[0])
        else:
            spread = None
        name = "greedy" if kind == "greedy" else f"{kind}@{k}"
        metrics.append({"metric": name, "k": k, "n": 1 if kind == "greedy" else n, "score": score, "spread": spread})
    return metrics


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU half precision is slow and inaccurate
    return getattr(torch, name)


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _base_for(config: EvalConfig) -> str:
    """The model to load: --model, checked against a local --adapter by the one resolver of bases
    (adapters/directory.resolve_base): a pissa/milora/olora init, or an adapter trained from one, is refused
    on any model but its residual base, and an adapter made for the original model on a residual base.
    An adapter given as a Hub id is not checked here (PEFT downloads it when loading)."""
    if not config.adapter or not Path(config.adapter).is_dir():
        return config.model
    from loraforge.adapters.directory import resolve_base

    base = resolve_base(config.adapter, config.model, flag="--model")
    return base.path if base.residual else config.model


def load_model(config: EvalConfig, base: str | None = None):
    """The base model (at --revision) with the --adapter on top, its tokenizer, and what to record. BASE: the
    model run_eval resolved (default: resolved here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.core.devices import resolve_device

    device = resolve_device(config.device)
    dtype = _resolve_dtype(config.dtype, device)
    base = base or _base_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, revision=config.revision)
        model = AutoModelForCausalLM.from_pretrained(base, revision=config.revision, dtype=dtype)
    except OSError as e:
        raise LoraforgeError(
            f"could not load the model {config.model!r}: {e}. Give a local model directory or a Hub id "
            "reachable from here"
        ) from None
    info = {
        "name_or_path": config.model,
        "revision": config.revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "adapter": None,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
    }
    if config.adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, config.adapter, is_trainable=False)
        except (OSError, ValueError) as e:
            raise LoraforgeError(
                f"could not load the adapter {config.adapter!r} onto {config.model}: {e}. --adapter takes a "
                "PEFT adapter directory (adapter_config.json + weights); --model must be the base it was made "
                "for (for residual inits such as PiSSA/MiLoRA/OLoRA, the residual base)"
            ) from None
        from loraforge.adapters.writers import check_loaded_adapter

        check_loaded_adapter(model, f"--adapter {config.adapter}")
        adir = Path(config.adapter)
        info["adapter"] = config.adapter
        info["adapter_sha256"] = next(
            (d for d in (_file_digest(adir / f) for f in ("adapter_model.safetensors", "adapter_model.bin")) if d),
            None,
        )
    model.to(device)
    model.eval()
    return model, tokenizer, info


def run_eval(
    config: EvalConfig,
    *,
    echo: Callable[[str], None] | None = None,
    model=None,
    tokenizer=None,
    sample_fn: SampleFn | None = None,
) -> dict:
    """`loraforge eval`: every benchmark of the config, report JSON + per-sample jsonl; returns the report.

    Benchmarks are all loaded (and checked) before the model, so a typo fails in a second, not
    after minutes of loading. `model`/`tokenizer` may be passed in to skip loading.
    """
    config.validate()
    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    benches: list[Benchmark] = []
    names: set[str] = set()
    for b in config.benchmarks:
        bench = load_benchmark(b, limit=config.limit)
        base, i = bench.name, 2
        while bench.name in names:  # two files with one stem: keep both in the report
            bench.name = f"{base}-{i}"
            i += 1
        names.add(bench.name)
        resolve_settings(config, bench)
        benches.append(bench)
    resolve_template(config.prompt_template)
    scorer = make_scorer(config.scorer)
    samples_path = (
        Path(config.samples_path)
        if config.samples_path
        else (samples_path_for(config.output) if config.output else None)
    )
    outputs = [(Path(p), what) for p, what in ((config.output, "report"), (samples_path, "per-sample jsonl")) if p]
    for path, what in outputs:
        check_writable(path, what)  # before the model loads: a directory there fails in a second
    # A second eval writing the same report or samples file fails at once, naming the first one's pid; without
    # the lock both ran to the end and the last to finish replaced the other's files.
    with contextlib.ExitStack() as locks:
        for path, _ in outputs:
            locks.enter_context(DirLock(Path(os.path.abspath(path))))
        return _evaluate(config, benches, scorer, samples_path, model, tokenizer, sample_fn, echo)


def _evaluate(config, benches, scorer, samples_path, model, tokenizer, sample_fn, echo) -> dict:
    """run_eval past its checks: load the model (unless given), run every benchmark, stage and commit the files."""
    if model is None:
        base = _base_for(config)  # before anything loads: an adapter on the wrong base is refused here
        echo(f"loading {config.model}" + (f" + adapter {config.adapter}" if config.adapter else ""))
        model, tokenizer, info = load_model(config, base)
    else:
        info = {"name_or_path": config.model, "revision": config.revision, "adapter": config.adapter}

    report = {"created": _now(), "model": info, "scorer": scorer.name, "config": config.to_dict(), "benchmarks": {}}
    if samples_path:
        report["samples_file"] = str(samples_path)
    # The previous report and samples file stay as they are until this run is complete: both are written to
    # staging files beside them and renamed into place at the end, the samples first (their sha256 is in the
    # report, so a report always says which samples file it belongs to).
    with FileStaging(echo) as stage:
        writer = SampleWriter(stage.add(samples_path)) if samples_path else None
        report_tmp = stage.add(config.output) if config.output else None
        try:
            _run_benchmarks(benches, model, tokenizer, config, sample_fn, scorer, info, echo, writer, report)
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            report["samples_sha256"] = _file_digest(writer.path)
        if report_tmp is not None:
            report_tmp.write_text(report_json(report), encoding="utf-8")
    return report


def _run_benchmarks(benches, model, tokenizer, config, sample_fn, scorer, info, echo, writer, report) -> None:
    for bench in benches:
        res = evaluate(
            model,
            tokenizer,
            bench,
            config,
            sample_fn=sample_fn,
            scorer=scorer,
            keep_samples=writer is not None,
            model_info=info,
            progress=echo,
        )
        if writer is not None:
            writer.write(res.pop("samples"))
        report["benchmarks"][bench.name] = res
