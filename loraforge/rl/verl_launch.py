"""`loraforge train --backend verl`: the same run as a verl job (DAPO recipe, FSDP + vLLM, many GPUs).

    RUN_DIR/verl/
        run_verl.sh      the command line: python3 -m recipe.dapo.main_dapo KEY=VALUE ... (Hydra overrides)
        overrides.json   the same overrides as data {dotted key: value}
        train.parquet    the training prompts in verl's row format (val.parquet: --eval-data or a copy)
        reward.py        compute_score() calling loraforge's scorer (--reward), for custom_reward_function

Key names are verl's own, taken from (cited where they are set below):
  [dapo]  verl recipe/dapo/run_dapo_qwen2.5_32b.sh (the DAPO reproduction script: data.*, algorithm.filter_groups.*,
          actor.clip_ratio_low/high/c, actor.loss_agg_mode, reward_model.reward_manager=dapo,
          reward_model.overlong_buffer.*, rollout.n/temperature/top_p/top_k)
  [main]  verl recipe/dapo/main_dapo.py (custom_reward_function via get_custom_reward_fn; overlong_buffer_cfg
          read from reward_model.overlong_buffer)
  [lora]  verl docs/advance/ppo_lora.rst and fsdp_workers.py (model.lora_rank, lora_alpha, target_modules,
          lora_adapter_path loaded with PeftModel.from_pretrained(..., is_trainable=True); LoRA is on when
          lora_adapter_path is set or lora_rank > 0; rollout.load_format=safetensors for vLLM LoRA)
  [ppo]   verl trainer/config ppo_trainer.yaml (actor.optim.lr/weight_decay/lr_warmup_steps/warmup_style/
          min_lr_ratio, actor.grad_clip, use_kl_loss/kl_loss_coef/kl_loss_type=low_var_kl, ppo_epochs,
          ppo_mini_batch_size (prompts), ppo_micro_batch_size_per_gpu (rows), trainer.*)
  `warmup_style` is the name verl's recipe era uses; newer verl renamed it `lr_scheduler_type` and still
  maps `warmup_style` onto it (verl/workers/config/optimizer.py, FSDPOptimizerConfig.__post_init__).

The adapter is handed over as is: `model.path` is the base it was made for (the residual base
ADAPTER/base for PiSSA/MiLoRA/OLoRA, named by loraforge.json's "base"), and rank/alpha/targets are
read from its adapter_config.json, so that verl's vLLM rollout gets a LoRA slot of the right size.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loraforge.adapters.directory import BaseModel, resolve_base
from loraforge.core.errors import LoraforgeError
from loraforge.rl.config import TrainConfig

# The DAPO recipe's entry point in a verl checkout (the recipe directory is not part of the pip package).
VERL_ENTRY = "recipe.dapo.main_dapo"
VERL_INSTALL = (
    "pip install verl vllm (on a CUDA machine; see https://verl.readthedocs.io/en/latest/start/install.html) "
    "and run from a clone of https://github.com/volcengine/verl, whose recipe/ directory holds the DAPO recipe"
)


# ------------------------------------------------------------------------------------------------
# what the adapter directory says
@dataclass
class LoraSettings:
    r: int
    alpha: int | float
    target_modules: list[str] | str
    max_rank: int  # r, or the largest rank of a rank_pattern
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    patterns: bool = False  # per-module rank/alpha patterns


def read_lora_settings(adapter: str | Path) -> LoraSettings:
    """Rank, alpha and target modules from the adapter's adapter_config.json (PEFT LoRA only)."""
    path = Path(adapter) / "adapter_config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoraforgeError(f"--adapter {adapter}: cannot read adapter_config.json ({e})") from e
    if c.get("peft_type", "LORA") != "LORA":
        raise LoraforgeError(
            f"--adapter {adapter}: a {c.get('peft_type')} adapter; only LoRA adapters can be handed on"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if c.get(key) in (None, "", []):
            raise LoraforgeError(f"--adapter {adapter}: adapter_config.json has no {key}")
    targets = c["target_modules"]
    targets = sorted(targets) if isinstance(targets, list) else str(targets)
    ranks = [int(c["r"])] + [int(v) for v in (c.get("rank_pattern") or {}).values()]
    return LoraSettings(
        r=int(c["r"]),
        alpha=_number(c["lora_alpha"]),
        target_modules=targets,
        max_rank=max(ranks),
        exclude_modules=c.get("exclude_modules"),
        use_rslora=bool(c.get("use_rslora")),
        use_dora=bool(c.get("use_dora")),
        patterns=bool(c.get("rank_pattern") or c.get("alpha_pattern")),
    )


def _number(x) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() else x


def _safetensors_shapes(files: list[Path]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shapes[k] = list(h.get_slice(k).get_shape())
    return shapes


def check_adapter_fits_base(adapter: str | Path, base: BaseModel) -> int:
    """Compare the adapter's LoRA shapes with the base's weight shapes (file headers only, nothing is
    loaded); raise naming the first module that does not fit. Returns the number of modules checked
    (0 when the base is not a local safetensors directory: nothing to compare)."""
    adapter, base_dir = Path(adapter), Path(base.path)
    weights = adapter / "adapter_model.safetensors"
    base_files = sorted(base_dir.glob("*.safetensors")) if base_dir.is_dir() else []
    if not weights.is_file() or not base_files:
        return 0
    lora, full = _safetensors_shapes([weights]), _safetensors_shapes(base_files)
    checked = 0
    for key, shape in sorted(lora.items()):
        m = re.match(r"base_model\.model\.(.+)\.lora_([AB])(?:\.\w+)?\.weight$", key)
        if not m or len(shape) != 2:
            continue
        module, which = m.group(1), m.group(2)
        w = full.get(f"{module}.weight") or full.get(f"{module}.base_layer.weight")
        if w is None or len(w) != 2:
            continue
        checked += 1
        out_f, in_f = w
        ok = shape[1] == in_f if which == "A" else shape[0] == out_f
        if not ok:
            want = f"[r, {in_f}]" if which == "A" else f"[{out_f}, r]"
            raise LoraforgeError(
                f"--adapter {adapter} does not match the base {base.path}: module {module} has lora_{which} of shape "
                f"{shape} in the adapter but the base's weight is {w}, which needs {want}; pass the base model the "
                "adapter was made for"
            )
    return checked


# ------------------------------------------------------------------------------------------------
# the overrides
def check_verl_batch(cfg: TrainConfig, gpus: int) -> None:
    """verl splits every batch of rows evenly over the GPUs (trainer.n_gpus_per_node x nnodes): the
    rollout batch and each PPO mini-batch (in rows: prompts x group size) must divide, and a GPU's
    share of a mini-batch must be a multiple of its micro-batch (verl's own asserts, checked here first)."""
    rows = cfg.prompt_batch * cfg.group_size
    mini_rows = cfg.mini_batch * cfg.group_size
    if rows % gpus:
        raise LoraforgeError(
            f"the GPU count {gpus} does not divide the batch: --prompt-batch {cfg.prompt_batch} x --group-size "
            f"{cfg.group_size} = {rows} rows; verl splits them evenly over the GPUs"
        )
    if mini_rows % gpus:
        raise LoraforgeError(
            f"the GPU count {gpus} does not divide the PPO mini-batch: --mini-batch {cfg.mini_batch} x --group-size "
            f"{cfg.group_size} = {mini_rows} rows"
        )
    if (mini_rows // gpus) % cfg.micro_batch:
        raise LoraforgeError(
            f"each GPU's share of a mini-batch ({mini_rows // gpus} rows) is not a multiple of --micro-batch "
            f"{cfg.micro_batch}; choose a --micro-batch that divides {mini_rows // gpus}"
        )


@dataclass
class VerlFiles:
    train: Path
    val: Path
    reward: Path
    checkpoints: Path


def verl_overrides(
    cfg: TrainConfig,
    base: BaseModel,
    lora: LoraSettings,
    files: VerlFiles,
    gpus_per_node: int,
    nodes: int = 1,
    n_examples: int | None = None,
) -> dict[str, Any]:
    """The Hydra overrides {dotted key: value} of the DAPO recipe for this (resolved) config."""
    gen_factor = (cfg.max_gen_batches or 10) if cfg.dynamic_sampling else 1
    epochs = math.ceil(cfg.steps * cfg.prompt_batch * gen_factor / max(1, n_examples or cfg.prompt_batch)) + 1
    logger = ["console"] + (["tensorboard"] if cfg.tensorboard else [])
    o: dict[str, Any] = {
        # data [dapo]; gen_batch_size = prompt_batch: each generation batch is one prompt batch, as in loraforge
        "data.train_files": str(files.train),
        "data.val_files": str(files.val),
        "data.prompt_key": "prompt",
        "data.truncation": "left",
        "data.max_prompt_length": cfg.max_prompt_length,
        "data.max_response_length": cfg.max_response_length,
        "data.train_batch_size": cfg.prompt_batch,
        "data.gen_batch_size": cfg.prompt_batch,
        # algorithm [dapo]: GRPO outcome advantage, dynamic sampling on the acc metric
        "algorithm.adv_estimator": "grpo",
        "algorithm.use_kl_in_reward": False,
        "algorithm.kl_ctrl.kl_coef": 0.0,
        "algorithm.filter_groups.enable": bool(cfg.dynamic_sampling),
        "algorithm.filter_groups.metric": "acc",
        "algorithm.filter_groups.max_num_gen_batches": cfg.max_gen_batches,  # 0 = no limit in both
        # the adapter [lora]
        "actor_rollout_ref.model.path": base.path,
        "actor_rollout_ref.model.lora_adapter_path": str(Path(cfg.adapter).resolve()),
        "actor_rollout_ref.model.lora_rank": lora.max_rank,
        "actor_rollout_ref.model.lora_alpha": lora.alpha,
        "actor_rollout_ref.model.target_modules": lora.target_modules,
        "actor_rollout_ref.model.trust_remote_code": bool(cfg.trust_remote_code),
        "actor_rollout_ref.model.use_remove_padding": True,
        # optimisation [ppo]
        "actor_rollout_ref.actor.optim.lr": cfg.lr,
        "actor_rollout_ref.actor.optim.weight_decay": cfg.weight_decay,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": cfg.warmup_steps,
        "actor_rollout_ref.actor.optim.warmup_style": cfg.lr_schedule,
        "actor_rollout_ref.actor.optim.min_lr_ratio": cfg.min_lr_ratio,
        "actor_rollout_ref.actor.grad_clip": cfg.grad_clip,
        "actor_rollout_ref.actor.ppo_epochs": cfg.epochs,
        "actor_rollout_ref.actor.ppo_mini_batch_size": cfg.mini_batch,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": cfg.micro_batch,
        # the loss [dapo]
        "actor_rollout_ref.actor.clip_ratio_low": cfg.eps_low,
        "actor_rollout_ref.actor.clip_ratio_high": cfg.eps_high,
        "actor_rollout_ref.actor.clip_ratio_c": cfg.clip_c,
        "actor_rollout_ref.actor.loss_agg_mode": cfg.loss_agg,
        "actor_rollout_ref.actor.entropy_coeff": 0,
        # KL to the reference [ppo]: GRPO's k3 ("low_var_kl") as an actor loss term
        "actor_rollout_ref.actor.use_kl_loss": cfg.kl_beta > 0,
        "actor_rollout_ref.actor.kl_loss_coef": cfg.kl_beta,
        "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": cfg.micro_batch,
        # rollout [dapo] [lora]: vLLM, one GPU per engine, greedy validation as `loraforge train --eval-data`
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.load_format": "safetensors",
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
        "actor_rollout_ref.rollout.gpu_memory_utilization": cfg.vllm_gpu_memory,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": cfg.micro_batch,
        "actor_rollout_ref.rollout.n": cfg.group_size,
        "actor_rollout_ref.rollout.temperature": cfg.temperature,
        "actor_rollout_ref.rollout.top_p": cfg.top_p,
        "actor_rollout_ref.rollout.top_k": cfg.top_k,
        "actor_rollout_ref.rollout.val_kwargs.temperature": 0,
        "actor_rollout_ref.rollout.val_kwargs.do_sample": False,
        "actor_rollout_ref.rollout.val_kwargs.n": 1,
        # reward [dapo] [main]: the DAPO reward manager adds the overlong penalty to loraforge's scorer
        "reward_model.reward_manager": "dapo",
        "reward_model.overlong_buffer.enable": cfg.overlong_buffer > 0,
        "reward_model.overlong_buffer.len": cfg.overlong_buffer,
        "reward_model.overlong_buffer.penalty_factor": cfg.overlong_penalty,
        "custom_reward_function.path": str(files.reward),
        "custom_reward_function.name": "compute_score",
        # trainer [ppo]
        "trainer.total_training_steps": cfg.steps,
        "trainer.total_epochs": epochs,
        "trainer.save_freq": cfg.save_every or cfg.steps,
        "trainer.test_freq": cfg.eval_every if cfg.eval_every else -1,
        "trainer.val_before_train": False,
        "trainer.n_gpus_per_node": gpus_per_node,
        "trainer.nnodes": nodes,
        "trainer.default_local_dir": str(files.checkpoints),
        "trainer.max_actor_ckpt_to_keep": cfg.keep_checkpoints or None,
        "trainer.project_name": "loraforge",
        "trainer.experiment_name": Path(cfg.output_dir).name or "run",
        "trainer.logger": logger,
    }
    return o


_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+\-]+$")


def hydra_value(v: Any) -> str:
    """A Python value as a Hydra command-line override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in ("true", "false", "null", "none"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def command_line(overrides: dict[str, Any], python: str = "python3") -> list[str]:
    return [python, "-m", VERL_ENTRY] + [f"{k}={hydra_value(v)}" for k, v in overrides.items()]


def render_script(argv: list[str], notes: list[str]) -> str:
    lines = [
        "#!/usr/bin/env bash",
        "# Written by `loraforge train --backend verl`: the same run as a verl DAPO-recipe job.",
        f"# Run it from a clone of verl (the recipe is not in the pip package): {VERL_INSTALL}.",
        "# Extra Hydra overrides given to this script are appended (later ones win).",
    ]
    lines += [f"# note: {n}" for n in notes]
    lines += ["set -euo pipefail", 'cd "${VERL_HOME:-$PWD}"']
    return "\n".join(lines) + "\n" + format_command(argv) + ' "$@"\n'


def format_command(argv: list[str]) -> str:
    """`python3 -m ENTRY` on the first line, one shell-quoted override per continued line."""
    return " \\\n    ".join([" ".join(shlex.quote(a) for a in argv[:3])] + [shlex.quote(a) for a in argv[3:]])


# ------------------------------------------------------------------------------------------------
# data and reward files
def _verl_prompt(example, template: str) -> list[dict]:
    from loraforge.rl.data import DAPO_TEMPLATE

    prompt = example.prompt
    if isinstance(prompt, list):
        return prompt
    if example.is_question and template != "none":
        text = DAPO_TEMPLATE if template == "dapo" else template
        if "{question}" not in text:
            raise LoraforgeError(
                f"--prompt-template must be dapo, none, or a text containing {{question}}, got {template!r}"
            )
        prompt = text.replace("{question}", prompt)
    return [{"role": "user", "content": prompt}]


def write_parquet(examples, path: Path, template: str) -> None:
    """Rows in verl's format: data_source, prompt (chat messages; verl applies the chat template),
    reward_model.ground_truth, extra_info.index."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise LoraforgeError(
            "--backend verl writes parquet data and needs pyarrow: pip install 'loraforge[train]'"
        ) from e
    rows = [
        {
            "data_source": "loraforge",
            "prompt": _verl_prompt(e, template),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": e.ground_truth},
            "extra_info": {"index": i},
        }
        for i, e in enumerate(examples)
    ]
    pq.write_table(pa.Table.from_pylist(rows), str(path))


REWARD_TEMPLATE = '''"""Written by `loraforge train --backend verl`: verl's custom_reward_function calling loraforge's
scorer ({reward!r}), so the verl run scores exactly as `loraforge train` does. verl's DAPO reward manager adds the
overlong penalty; "acc" feeds dynamic sampling (algorithm.filter_groups.metric=acc)."""

from loraforge.rl.rewards import get_scorer

_SCORER = get_scorer({reward!r})


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    result = _SCORER(solution_str, ground_truth)
    return {{"score": float(result.score), "acc": bool(result.acc), "pred": str(result.pred)}}
'''


# ------------------------------------------------------------------------------------------------
# the whole hand-off
@dataclass
class VerlLaunch:
    directory: Path
    script: Path
    argv: list[str]
    overrides: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def default_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # pragma: no cover - torch is a dependency
        return 1


def prepare(cfg: TrainConfig, gpus_per_node: int | None = None, nodes: int = 1) -> VerlLaunch:
    """Check the run, write RUN_DIR/verl/ and return what it holds. `cfg` may be unresolved."""
    from loraforge.rl.data import load_examples

    cfg = cfg.resolved()
    gpus_per_node = gpus_per_node or default_gpus()
    if gpus_per_node < 1 or nodes < 1:
        raise LoraforgeError(f"--verl-gpus-per-node and --verl-nodes must be >= 1, got {gpus_per_node} and {nodes}")
    check_verl_batch(cfg, gpus_per_node * nodes)
    if cfg.rollout not in ("transformers", "vllm"):
        raise LoraforgeError(
            f"--backend verl rolls out with verl's own vLLM workers; --rollout {cfg.rollout} cannot be handed on"
        )
    base = resolve_base(cfg.adapter, cfg.model)
    lora = read_lora_settings(cfg.adapter)
    check_adapter_fits_base(cfg.adapter, base)
    examples = load_examples(cfg.data, cfg.data_split)
    out = Path(cfg.output_dir) / "verl"
    out.mkdir(parents=True, exist_ok=True)
    files = VerlFiles(
        train=(out / "train.parquet").resolve(),
        val=(out / "val.parquet").resolve(),
        reward=(out / "reward.py").resolve(),
        checkpoints=(out / "checkpoints").resolve(),
    )
    write_parquet(examples, files.train, cfg.prompt_template)
    val = (
        load_examples(cfg.eval_data, "test")[: cfg.eval_max_prompts]
        if cfg.eval_data
        else examples[: cfg.eval_max_prompts]
    )
    write_parquet(val, files.val, cfg.prompt_template)
    files.reward.write_text(REWARD_TEMPLATE.format(reward=cfg.reward))
    overrides = verl_overrides(cfg, base, lora, files, gpus_per_node, nodes, len(examples))

    notes = []
    if base.residual and cfg.kl_beta > 0:
        notes.append(
            "with LoRA, verl's KL reference is the actor with the adapter disabled, which for this "
            "residualised adapter is the residual base, NOT the initial policy (loraforge's bundled loop "
            "uses the initial adapter); the KL term will pull towards a different model"
        )
    if not cfg.chat_template:
        notes.append("--no-chat-template is not handed on: verl applies the tokenizer's chat template to the prompts")
    if lora.patterns:
        notes.append(
            f"the adapter has per-module rank/alpha patterns; lora_rank is their maximum {lora.max_rank} "
            "(verl loads the adapter's own config for training)"
        )
    if ":" in cfg.reward:
        notes.append(f"--reward {cfg.reward}: its module must be importable in verl's workers (PYTHONPATH)")
    notes.append(
        "verl averages micro-batch token means (loraforge's token-mean is exact over the mini-batch); "
        "verl seeds its own data order and sampling"
    )
    argv = command_line(overrides)
    script = out / "run_verl.sh"
    script.write_text(render_script(argv, notes))
    script.chmod(0o755)
    (out / "overrides.json").write_text(json.dumps(overrides, indent=2) + "\n")
    return VerlLaunch(directory=out, script=script, argv=argv, overrides=overrides, notes=notes)


def launch(prepared: VerlLaunch, echo: Callable[[str], None] = print) -> int:
    """Run the verl job in the foreground (needs verl and its DAPO recipe importable); returns its exit code."""
    if importlib.util.find_spec("verl") is None:
        raise LoraforgeError(
            f"--run needs verl, which is not installed here: {VERL_INSTALL}. "
            f"Or copy {prepared.directory} to a GPU machine and run {prepared.script.name} there"
        )
    cwd = os.environ.get("VERL_HOME") or os.getcwd()
    sys.path.insert(0, cwd)
    try:
        found = importlib.util.find_spec(VERL_ENTRY) is not None
    except ModuleNotFoundError:
        found = False
    finally:
        sys.path.remove(cwd)
    if not found:
        raise LoraforgeError(
            f"verl is installed but its DAPO recipe ({VERL_ENTRY}) is not importable from {cwd}: run "
            "from a clone of https://github.com/volcengine/verl or set VERL_HOME to one"
        )
    argv = [sys.executable] + prepared.argv[1:]
    echo(f"launching verl in {cwd}: {prepared.script}")
    return subprocess.call(argv, cwd=cwd)
