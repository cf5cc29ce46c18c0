"""The settings of one `loraforge train` run: a dataclass whose fields are the CLI flags and YAML keys.

Defaults are the paper's 1.5B DAPO run (appendix C, Table 2), scaled down where one machine must:
the paper's value is named in each field's help when it differs. Fields left at None take the
preset of the chosen algorithm (`ALGO_PRESETS`): `--algo dapo` is the paper's 1.5B recipe,
`--algo grpo` its 7B one (KL against the initial policy, no dynamic sampling, no overlong shaping,
symmetric clip). Every range check names the flag it is about.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import decode_utf8, read_bytes, read_json
from loraforge.core.settings import MIN_TEMPERATURE, setting, typed_values

ALGO_PRESETS: dict[str, dict[str, Any]] = {
    # the paper's 1.5B run: clip 0.2/0.28, dynamic sampling, overlong shaping, no KL
    "dapo": {"eps_high": 0.28, "kl_beta": 0.0, "dynamic_sampling": True, "overlong_buffer": 256},
    # the paper's 7B run: GRPO with KL beta 0.001 against the initial adapter; symmetric clip 0.2
    "grpo": {"eps_high": 0.2, "kl_beta": 0.001, "dynamic_sampling": False, "overlong_buffer": 0},
}


@dataclass
class TrainConfig:
    """One training run. Each field is a flag (`--field-name`) and a YAML key; its help text (field
    metadata, see core/settings.py) is the flag's `--help` line."""

    # --- what to train -------------------------------------------------------------------------
    model: str | None = setting(
        None,
        "base model: a local dir or Hub id "
        "(default: ADAPTER/base if present, else the adapter's base_model_name_or_path)",
    )
    adapter: str = setting("", "PEFT adapter dir to train (from `loraforge init` or any PEFT save_pretrained)")
    data: str = setting("", "training prompts: .jsonl/.json/.parquet file, Hub dataset id, or synthetic[:k=v,...]")
    output_dir: str = setting("", "RUN_DIR: metrics.jsonl, checkpoints/, the final adapter/")
    algo: str = setting(
        "dapo", "dapo (the paper's 1.5B recipe) or grpo (its 7B recipe); sets the defaults marked dapo/grpo"
    )
    gguf_file: str | None = setting(None, "load the base from this GGUF file inside --model (dequantised)")
    tokenizer: str | None = setting(None, "tokenizer dir or id (default: the base model's)")
    data_split: str = setting("train", "split of a Hub dataset")
    dtype: str = setting(
        "float32", "float32 | bfloat16 | float16: dtype of the base model weights (16-bit with --rollout vllm)"
    )
    device: str = setting("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    quantize: str | None = setting(
        None,
        "nf4 | fp4 | int8: load the base quantized through bitsandbytes (QLoRA; pip install -e '.[quant]'); "
        "the adapter stays float32, the rest of the base stays in --dtype",
    )
    quant_compute_dtype: str | None = setting(
        None,
        "with --quantize nf4/fp4: float32 | bfloat16 | float16, the dtype 4-bit layers compute in [default: --dtype]",
    )
    trust_remote_code: bool = setting(False, "allow a model repository's own code to run")
    # --- prompts and rewards ------------------------------------------------------------------
    reward: str = setting(
        "dapo",
        "dapo (verl 0.7, +1/-1), dapo-boxed (newer verl), math-verify (1/0), number (one final number, 1/0; "
        "for synthetic: data), or module:function",
    )
    prompt_template: str = setting(
        "dapo", "for question rows (GSM8K, synthetic): dapo (DAPO-Math's instruction), none, or a text with {question}"
    )
    chat_template: bool = setting(True, "wrap prompts in the tokenizer's chat template when it has one")
    max_prompt_length: int = setting(512, "prompt tokens kept (left truncation) [paper 512]")
    max_response_length: int = setting(1024, "new tokens per response [paper 16384]")
    overlong_buffer: int | None = setting(
        None, "DAPO length shaping buffer in tokens, 0 = off [paper 4096 of 16384; dapo 256]"
    )
    overlong_penalty: float = setting(1.0, "penalty at max length (the factor alpha) [paper 1.0]")
    # --- sampling ------------------------------------------------------------------------------
    group_size: int = setting(8, "responses per prompt G [paper 8]")
    temperature: float = setting(1.0, "rollout temperature [paper 1.0]")
    top_p: float = setting(1.0, "rollout nucleus sampling, 1.0 = off [paper 1.0]")
    top_k: int = setting(-1, "rollout top-k, -1 = off [paper -1]")
    dynamic_sampling: bool | None = setting(
        None, "DAPO: drop groups whose accuracies are all equal, refill [dapo on, grpo off]"
    )
    max_gen_batches: int = setting(
        10, "dynamic sampling gives up after this many generation batches per step, 0 = never"
    )
    rollout_batch_size: int = setting(64, "rows (prompt x sample) decoded at once; lower it on out-of-memory")
    rollout: str = setting(
        "transformers",
        "rollout engine: transformers (in-process), vllm (pip install -e '.[vllm]', CUDA), or module:factory",
    )
    vllm_gpu_memory: float = setting(
        0.5, "fraction of each GPU's memory vLLM may take (--rollout vllm, --backend verl); the trainer uses the rest"
    )
    logprob_check_rows: int = setting(
        4, "separate samplers (vllm): responses whose sampler and trainer log-probs are compared each step, 0 = off"
    )
    logprob_check_tol: float = setting(
        0.1,
        "stop when their mean |logp difference| per token exceeds this (nats): "
        "the sampler is not running the current adapter",
    )
    # --- optimisation --------------------------------------------------------------------------
    steps: int = setting(500, "training steps (one rollout batch each) [paper 500]")
    prompt_batch: int = setting(16, "prompts per step [paper 128]")
    mini_batch: int = setting(
        4, "prompts per optimizer step; prompt_batch / mini_batch updates per step [paper 32: 4 updates]"
    )
    micro_batch: int = setting(8, "rows per forward/backward (gradient accumulation); lower it on out-of-memory")
    epochs: int = setting(1, "passes over each rollout batch (PPO epochs) [paper 1]")
    lr: float = setting(1e-5, "AdamW learning rate [paper 1e-5]")
    lr_schedule: str = setting("constant", "constant | cosine [paper: both]")
    warmup_steps: int = setting(0, "linear warmup steps [paper 0]")
    min_lr_ratio: float = setting(0.0, "cosine decays to lr * min_lr_ratio (verl's default 0)")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay [paper 0.1]")
    grad_clip: float = setting(1.0, "max total grad norm; steps with a non-finite norm are skipped [paper 1.0]")
    eps_low: float = setting(0.2, "lower clip ratio [paper 0.2]")
    eps_high: float | None = setting(None, 'upper clip ratio ("clip-higher") [dapo 0.28 as the paper; grpo 0.2]')
    clip_c: float = setting(10.0, "dual-clip bound for negative advantages, > 1 [paper 10]")
    loss_agg: str = setting("token-mean", "token-mean (DAPO) | seq-mean-token-mean (original GRPO) [paper token-mean]")
    kl_beta: float | None = setting(
        None, "k3 KL penalty weight against the INITIAL adapter [dapo 0 as the paper; grpo 0.001]"
    )
    # --- bookkeeping ---------------------------------------------------------------------------
    seed: int = setting(0, "seeds data order, sampling and torch")
    save_every: int = setting(50, "checkpoint every N steps (and at the end), 0 = only at the end")
    keep_checkpoints: int = setting(2, "keep the newest N step checkpoints, 0 = keep all")
    eval_data: str | None = setting(None, "held-out prompts scored greedily every eval_every steps")
    eval_every: int = setting(0, "evaluation interval in steps, 0 = off")
    eval_max_prompts: int = setting(64, "evaluate on at most this many held-out prompts")
    tensorboard: bool = setting(True, "also log to RUN_DIR/tb when tensorboard is installed")
    verl_version: str | None = setting(
        None,
        "--backend verl: the verl release to write the job for, 0.9.0 or 0.9.1 "
        "(default: the installed verl, else the newest)",
    )

    # ------------------------------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """A copy with the algorithm preset filled into the None fields, checked."""
        if self.algo not in ALGO_PRESETS:
            raise LoraforgeError(f"--algo must be one of {sorted(ALGO_PRESETS)}, got {self.algo!r}")
        # typed wherever the values came from (TrainConfig(lr="5e-6") from Python too): see typed_values
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        cfg = dataclasses.replace(self, **typed_values(TrainConfig, fields, "settings"))
        for key, value in ALGO_PRESETS[cfg.algo].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        cfg.check()
        return cfg

    def check(self) -> None:
        def need(ok: bool, flag: str, what: str, got: Any) -> None:
            if not ok:
                raise LoraforgeError(f"{flag} must be {what}, got {got!r}")

        need(bool(self.adapter), "--adapter", "a PEFT adapter directory", self.adapter)
        need(bool(self.data), "--data", "a dataset (file, Hub id or synthetic)", self.data)
        need(bool(self.output_dir), "--output/-o", "a run directory", self.output_dir)
        need(self.dtype in ("float32", "bfloat16", "float16"), "--dtype", "float32, bfloat16 or float16", self.dtype)
        self._check_quantize()
        need(self.max_prompt_length >= 1, "--max-prompt-length", ">= 1", self.max_prompt_length)
        need(self.max_response_length >= 1, "--max-response-length", ">= 1", self.max_response_length)
        need(
            0 <= self.overlong_buffer < self.max_response_length,
            "--overlong-buffer",
            f"in [0, max response length {self.max_response_length})",
            self.overlong_buffer,
        )
        need(self.overlong_penalty >= 0, "--overlong-penalty", ">= 0", self.overlong_penalty)
        need(self.group_size >= 1, "--group-size", ">= 1", self.group_size)
        need(
            self.temperature >= MIN_TEMPERATURE,
            "--temperature",
            f">= {MIN_TEMPERATURE:g} for training rollouts (a smaller one overflows the logits)",
            self.temperature,
        )
        need(0 < self.top_p <= 1, "--top-p", "in (0, 1]", self.top_p)
        need(self.top_k == -1 or self.top_k >= 1, "--top-k", "-1 (off) or >= 1", self.top_k)
        need(self.max_gen_batches >= 0, "--max-gen-batches", ">= 0 (0 = no limit)", self.max_gen_batches)
        need(self.rollout_batch_size >= 1, "--rollout-batch-size", ">= 1", self.rollout_batch_size)
        need(
            self.rollout in ("transformers", "vllm") or ":" in self.rollout,
            "--rollout",
            "transformers, vllm or module:factory",
            self.rollout,
        )
        need(0 < self.vllm_gpu_memory <= 1, "--vllm-gpu-memory", "in (0, 1]", self.vllm_gpu_memory)
        if self.rollout == "vllm" and self.dtype == "float32":
            # vLLM's LoRA kernels take only 16-bit activations and LoRA weights (lora_shrink asserts it); the
            # engine runs in --dtype, like the trainer. Refused rather than switched: a silent bf16 sampler next
            # to a float32 trainer would be a different run than the one asked for.
            raise LoraforgeError(
                "--rollout vllm needs --dtype bfloat16 or float16, got float32 (the default): vLLM's LoRA kernels "
                "run only in 16-bit and vLLM loads the base in --dtype, as the trainer does; add --dtype bfloat16"
            )
        need(self.logprob_check_rows >= 0, "--logprob-check-rows", ">= 0 (0 = off)", self.logprob_check_rows)
        need(self.logprob_check_tol > 0, "--logprob-check-tol", "> 0", self.logprob_check_tol)
        need(self.steps >= 1, "--steps", ">= 1", self.steps)
        need(self.prompt_batch >= 1, "--prompt-batch", ">= 1", self.prompt_batch)
        need(
            1 <= self.mini_batch <= self.prompt_batch and self.prompt_batch % self.mini_batch == 0,
            "--mini-batch",
            f"between 1 and --prompt-batch ({self.prompt_batch}) and divide it",
            self.mini_batch,
        )
        need(self.micro_batch >= 1, "--micro-batch", ">= 1", self.micro_batch)
        need(self.epochs >= 1, "--epochs", ">= 1", self.epochs)
        need(self.lr > 0, "--lr", "> 0", self.lr)
        need(self.lr_schedule in ("constant", "cosine"), "--lr-schedule", "constant or cosine", self.lr_schedule)
        need(0 <= self.warmup_steps < self.steps, "--warmup-steps", f"in [0, --steps {self.steps})", self.warmup_steps)
        need(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio", "in [0, 1]", self.min_lr_ratio)
        need(self.weight_decay >= 0, "--weight-decay", ">= 0", self.weight_decay)
        need(self.grad_clip > 0, "--grad-clip", "> 0", self.grad_clip)
        need(0 <= self.eps_low < 1, "--eps-low", "in [0, 1)", self.eps_low)
        need(self.eps_high >= 0, "--eps-high", ">= 0", self.eps_high)
        need(self.clip_c > 1, "--clip-c", "> 1 (the dual clip bounds ratios above 1)", self.clip_c)
        need(
            self.loss_agg in ("token-mean", "seq-mean-token-mean"),
            "--loss-agg",
            "token-mean or seq-mean-token-mean",
            self.loss_agg,
        )
        need(self.kl_beta >= 0, "--kl-beta", ">= 0", self.kl_beta)
        need(self.save_every >= 0, "--save-every", ">= 0", self.save_every)
        need(self.keep_checkpoints >= 0, "--keep-checkpoints", ">= 0", self.keep_checkpoints)
        need(self.eval_every >= 0, "--eval-every", ">= 0", self.eval_every)
        need(self.eval_every == 0 or bool(self.eval_data), "--eval-data", "given when --eval-every > 0", self.eval_data)
        need(self.eval_max_prompts >= 1, "--eval-max-prompts", ">= 1", self.eval_max_prompts)

    def _check_quantize(self) -> None:
        from loraforge.models.quantize import check_quantize, require_bitsandbytes

        check_quantize(self.quantize)
        if self.quantize:
            require_bitsandbytes()  # one line on how to install it, before the run directory is made
        if self.quant_compute_dtype is not None:
            if self.quant_compute_dtype not in ("float32", "bfloat16", "float16"):
                raise LoraforgeError(
                    f"--quant-compute-dtype must be float32, bfloat16 or float16, got {self.quant_compute_dtype!r}"
                )
            if self.quantize not in ("nf4", "fp4"):
                raise LoraforgeError(
                    "--quant-compute-dtype goes with --quantize nf4 or fp4 (int8 layers compute in float16), "
                    f"got --quantize {self.quantize}"
                )
        if self.quantize and self.rollout == "vllm":
            # vLLM quantizes in flight with its own loader (nf4 only); that its weights equal the trainer's
            # is not checked anywhere, and the per-step log-prob check would stop the run on any gap
            raise LoraforgeError(
                f"--rollout vllm cannot sample from a --quantize {self.quantize} base: vLLM's own bitsandbytes "
                "loading is not checked against the trainer's; use --rollout transformers (the default)"
            )

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", lines: dict | None = None) -> "TrainConfig":
        """A config from keys (flag names, - or _) and values of any source, typed (core/settings.typed_values);
        an unknown key, a key that is not text or a value of the wrong kind is one line naming SOURCE (and, with
        LINES, the line of the key)."""
        odd = [k for k in values if not isinstance(k, str)]
        if odd:
            raise LoraforgeError(f"{source}: the key {odd[0]!r} is not a name; the keys are the flag names")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in (k.replace("-", "_") for k in values) if k not in names)
        if unknown:
            raise LoraforgeError(
                f"{source}: unknown key(s) {unknown}; the keys are the flag names with _ for -, "
                "see `loraforge train --help`"
            )
        values = {k.replace("-", "_"): v for k, v in values.items()}
        lines = {k.replace("-", "_"): n for k, n in (lines or {}).items() if isinstance(k, str)}
        return cls(**typed_values(cls, values, source, lines))

    def save(self, path: Path) -> None:
        """Write through a temporary file and a rename: a kill mid-write leaves the old config.json whole."""
        tmp = path.parent / f".tmp-{path.name}"
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, echo: Callable[[str], None] | None = None) -> "TrainConfig":
        """A run's config.json read back (core/readers.py), typed: a hand-edited `"lr": "5e-6"` is a number. A
        key it lacks takes its default, as for a config.json written before the setting existed; ECHO is told."""
        remedy = "Restore it (`loraforge train` wrote it when the run started), or start a new run with -o."
        values = read_json(path, "the run's config", remedy=remedy)
        missing = [
            f.name for f in dataclasses.fields(cls) if f.name not in values and f.name.replace("_", "-") not in values
        ]
        if missing and echo is not None:
            echo(f"note: {path} has no {', '.join(missing)}: the default applies (written by an older loraforge?)")
        text = path.read_text(errors="replace")
        lines = {m.group(1): text.count("\n", 0, m.start()) + 1 for m in re.finditer(r'^\s*"([^"]+)"\s*:', text, re.M)}
        return cls.from_dict(values, str(path), lines)


def load_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a --config YAML file into (a dict of config keys, the line of each key); needs pyyaml. Bad bytes, bad
    YAML, or anything but a mapping at the top is one line naming the file (and the line)."""
    try:
        import yaml
    except ImportError as e:
        raise LoraforgeError("--config needs pyyaml: pip install -e '.[train]'") from e
    p = Path(path)
    if not p.exists():
        raise LoraforgeError(f"--config {path}: no such file")
    text = decode_utf8(read_bytes(p, "a --config file", 16 * 2**20), p, "the --config file")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise LoraforgeError(
            f"--config {path}{where}: not valid YAML ({getattr(e, 'problem', None) or e}); fix the file"
        ) from None
    except (ValueError, OverflowError) as e:  # a constructor's own: an int of more than 4,300 digits, a huge date
        raise LoraforgeError(f"--config {path}: a value cannot be read ({str(e)[:120]}); fix the file") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise LoraforgeError(f"--config {path}: expected a mapping of keys to values, found {type(values).__name__}")
    lines: dict[str, int] = {}
    for key, _ in node.value:
        name = getattr(key, "value", None)
        if isinstance(name, str) and name in lines:  # PyYAML keeps the last silently: a slip, not a setting
            raise LoraforgeError(
                f"--config {path} line {key.start_mark.line + 1}: {name} is given twice (also line {lines[name]})"
            )
        if isinstance(name, str):
            lines[name] = key.start_mark.line + 1
    return values, lines
