"""`loraforge train --backend verl`: the same run as a verl job (DAPO on verl's PPO trainer, FSDP + vLLM, many GPUs).

    RUN_DIR/verl/
        run_verl.sh      the command line: python3 -m verl.trainer.main_ppo KEY=VALUE ... (Hydra overrides)
        overrides.json   the same overrides as data {dotted key: value}
        train.parquet    the training prompts in verl's row format (val.parquet: --eval-data or a copy)
        reward.py        compute_score() calling loraforge's scorer (--reward), for reward.custom_reward_function
        checkpoints/     written by verl itself when the job runs (trainer.default_local_dir)

How the directory is written and when an existing one is kept, replaced or refused: rl/verl_job.py.

Supported verl: the releases in SUPPORTED_VERL (0.9.0 and 0.9.1, the newest two on PyPI). Both run DAPO from the
pip package itself: `verl.trainer.main_ppo` composes `verl/trainer/config/ppo_trainer.yaml`, which has
`algorithm.filter_groups` and `data.gen_batch_size` from 0.9.0 on, and its default V1 trainer filters groups in
its replay buffer. Earlier releases run DAPO only through `recipe.dapo.main_dapo`, which since 0.7.1 lives in the
verl-recipe git submodule (not on PyPI; a plain clone leaves `recipe/` empty), and whose copy pinned by verl 0.9.0
imports names main_ppo no longer has; they are refused with the supported list.

Key names are verl 0.9's own, read from its shipped config (cited where they are set below):
  [data]  verl/trainer/config/data/legacy_data.yaml (train_files ... gen_batch_size)
  [algo]  ppo_trainer.yaml algorithm.* (adv_estimator, kl_ctrl, filter_groups.{enable,metric})
  [lora]  model/hf_model.yaml (lora_rank, lora_alpha, target_modules, lora_adapter_path loaded with
          PeftModel.from_pretrained(..., is_trainable=True); LoRA is on when lora_adapter_path is set or
          lora_rank > 0; rollout.load_format=safetensors for vLLM LoRA)
  [actor] actor/actor.yaml and actor/dp_actor.yaml (optim.lr/weight_decay/lr_warmup_steps/lr_scheduler_type/
          min_lr_ratio, grad_clip, clip_ratio_low/high/c, loss_agg_mode, use_kl_loss/kl_loss_coef/kl_loss_type,
          ppo_epochs, ppo_mini_batch_size (prompts), ppo_micro_batch_size_per_gpu (rows))
  [reward] reward/reward.yaml (reward_manager.name, custom_reward_function.{path,name}) and the DAPO reward
          manager, verl/experimental/reward_loop/reward_manager/dapo.py, which reads
          reward.reward_kwargs.{overlong_buffer_cfg,max_resp_len}: keys the shipped yaml does not define, so they
          are added with Hydra's `++` (add or override); every other key is a plain, strictly checked override.
Departures from the DAPO recipe's own script, each because verl 0.9 reads the key elsewhere or not at all:
  - reward_model.reward_manager, reward_model.overlong_buffer.* and top-level custom_reward_function.* are the
    recipe-era keys; 0.9's main_ppo never migrates them, so they would compose and be ignored. Not emitted.
  - algorithm.filter_groups.max_num_gen_batches is ignored by 0.9's V1 trainer (it logs a warning): not emitted;
    an explicit --max-gen-batches with dynamic sampling is refused.
  - optim.warmup_style is a deprecated alias of lr_scheduler_type: lr_scheduler_type is emitted.

The adapter is handed over as is: `model.path` is the base it was made for (the residual base
ADAPTER/base for PiSSA/MiLoRA/OLoRA, named by loraforge.json's "base"), and rank/alpha/targets are
read from its adapter_config.json, so that verl's vLLM rollout gets a LoRA slot of the right size.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loraforge.adapters.directory import BaseModel, resolve_base
from loraforge.core import atomic
from loraforge.core.errors import LoraforgeError
from loraforge.rl.config import TrainConfig
from loraforge.rl.verl_job import REWARD_TEMPLATE, SCRIPT, put_job, write_parquet

# The verl releases the hand-off is written for, oldest first; both share the key layout below (composed
# strictly against each release's shipped config in tests/rl/test_verl_real.py). The `verl` extra in
# pyproject.toml pins the same range.
SUPPORTED_VERL = ("0.9.0", "0.9.1")
# verl 0.9's PPO entry point runs DAPO itself (dynamic sampling in ppo_trainer.yaml): no recipe checkout.
VERL_ENTRY = "verl.trainer.main_ppo"
VERL_INSTALL = (
    f"pip install -e '.[verl]' (verl {SUPPORTED_VERL[-1]} with vLLM, on a CUDA machine; "
    "see https://verl.readthedocs.io/en/latest/start/install.html)"
)
# Keys the shipped config does not define but verl 0.9 reads: added with Hydra's `++` (add or override).
# Nothing else is: a misspelt plain key is refused by Hydra's strict composition, as it should be.
ADDED_PREFIX = "reward.reward_kwargs."


# ------------------------------------------------------------------------------------------------
# which verl
def installed_verl_version() -> str | None:
    """The version of the verl distribution installed here, read from its metadata (verl is not imported:
    importing it pulls in ray and CUDA-only code); None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("verl")
    except metadata.PackageNotFoundError:
        return None


def _supported_text() -> str:
    return " or ".join(SUPPORTED_VERL)


def choose_verl_version(requested: str | None, installed: str | None) -> tuple[str, list[str]]:
    """The verl release to write the job for, and notes about the choice: --verl-version when given, else the
    installed verl, else the newest supported. An unsupported version, asked for or installed, is refused."""
    if requested:
        if requested not in SUPPORTED_VERL:
            raise LoraforgeError(
                f"--verl-version {requested} is not supported: the verl hand-off is written for verl "
                f"{_supported_text()}; pass one of them and install it with {VERL_INSTALL}"
            )
        if installed and installed != requested:
            return requested, [f"written for verl {requested} (--verl-version), but verl {installed} is installed here"]
        return requested, []
    if installed is None:
        newest = SUPPORTED_VERL[-1]
        return newest, [f"verl is not installed here: written for verl {newest} (--verl-version to choose)"]
    if installed not in SUPPORTED_VERL:
        raise LoraforgeError(
            f"verl {installed} is installed here, but the verl hand-off is written for verl {_supported_text()}: "
            f"pip install 'verl=={SUPPORTED_VERL[-1]}', or pass --verl-version {SUPPORTED_VERL[-1]} to write the "
            "job for another machine"
        )
    return installed, []


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
    if c.get("target_parameters"):
        # MoE expert stacks (and MLPs PEFT would remap) are PEFT target_parameters: verl's LoRA settings name
        # target_modules only, and vLLM's loading of such adapters is not verified; refuse rather than hand on an
        # adapter whose experts the engine may silently leave out.
        raise LoraforgeError(
            f"--adapter {adapter}: adapter_config.json has target_parameters ({', '.join(c['target_parameters'][:3])}"
            "...: MoE experts or MLPs PEFT remaps), which verl's LoRA settings and vLLM's adapter loading do not "
            "express. Train it with the bundled loop (`loraforge train` without --backend verl / --rollout vllm), "
            "or init an adapter without them (--target-modules naming attention projections only)."
        )
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
    """The Hydra overrides {dotted key: value} of this (resolved) config for verl 0.9's main_ppo; keys under
    ADDED_PREFIX are given with `++` on the command line (command_line)."""
    gen_factor = (cfg.max_gen_batches or 10) if cfg.dynamic_sampling else 1
    epochs = math.ceil(cfg.steps * cfg.prompt_batch * gen_factor / max(1, n_examples or cfg.prompt_batch)) + 1
    logger = ["console"] + (["tensorboard"] if cfg.tensorboard else [])
    o: dict[str, Any] = {
        # data [data]; gen_batch_size = prompt_batch: each generation batch is one prompt batch, as in loraforge
        "data.train_files": str(files.train),
        "data.val_files": str(files.val),
        "data.prompt_key": "prompt",
        "data.truncation": "left",
        "data.max_prompt_length": cfg.max_prompt_length,
        "data.max_response_length": cfg.max_response_length,
        "data.train_batch_size": cfg.prompt_batch,
        "data.gen_batch_size": cfg.prompt_batch,
        # algorithm [algo]: GRPO outcome advantage, dynamic sampling on reward.py's "acc" (0.9.0's metric default
        # is null, which verl refuses with filtering on)
        "algorithm.adv_estimator": "grpo",
        "algorithm.use_kl_in_reward": False,
        "algorithm.kl_ctrl.kl_coef": 0.0,
        "algorithm.filter_groups.enable": bool(cfg.dynamic_sampling),
        "algorithm.filter_groups.metric": "acc",
        # the adapter [lora]
        "actor_rollout_ref.model.path": base.path,
        "actor_rollout_ref.model.lora_adapter_path": str(Path(cfg.adapter).resolve()),
        "actor_rollout_ref.model.lora_rank": lora.max_rank,
        "actor_rollout_ref.model.lora_alpha": lora.alpha,
        "actor_rollout_ref.model.target_modules": lora.target_modules,
        "actor_rollout_ref.model.trust_remote_code": bool(cfg.trust_remote_code),
        "actor_rollout_ref.model.use_remove_padding": True,
        # optimisation [actor]
        "actor_rollout_ref.actor.optim.lr": cfg.lr,
        "actor_rollout_ref.actor.optim.weight_decay": cfg.weight_decay,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": cfg.warmup_steps,
        "actor_rollout_ref.actor.optim.lr_scheduler_type": cfg.lr_schedule,
        "actor_rollout_ref.actor.optim.min_lr_ratio": cfg.min_lr_ratio,
        "actor_rollout_ref.actor.grad_clip": cfg.grad_clip,
        "actor_rollout_ref.actor.ppo_epochs": cfg.epochs,
        "actor_rollout_ref.actor.ppo_mini_batch_size": cfg.mini_batch,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": cfg.micro_batch,
        # the loss [actor]
        "actor_rollout_ref.actor.clip_ratio_low": cfg.eps_low,
        "actor_rollout_ref.actor.clip_ratio_high": cfg.eps_high,
        "actor_rollout_ref.actor.clip_ratio_c": cfg.clip_c,
        "actor_rollout_ref.actor.loss_agg_mode": cfg.loss_agg,
        "actor_rollout_ref.actor.entropy_coeff": 0,
        # KL to the reference [actor]: GRPO's k3 ("low_var_kl") as an actor loss term
        "actor_rollout_ref.actor.use_kl_loss": cfg.kl_beta > 0,
        "actor_rollout_ref.actor.kl_loss_coef": cfg.kl_beta,
        "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": cfg.micro_batch,
        # rollout [lora]: vLLM, one GPU per engine, greedy validation as `loraforge train --eval-data`
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
        # reward [reward]: the DAPO reward manager adds the overlong penalty to loraforge's scorer. It reads all four
        # overlong_buffer_cfg keys (a missing `log` stops it) and refuses the buffer without max_resp_len.
        "reward.reward_manager.name": "dapo",
        "reward.custom_reward_function.path": str(files.reward),
        "reward.custom_reward_function.name": "compute_score",
        ADDED_PREFIX + "overlong_buffer_cfg.enable": cfg.overlong_buffer > 0,
        ADDED_PREFIX + "overlong_buffer_cfg.len": cfg.overlong_buffer,
        ADDED_PREFIX + "overlong_buffer_cfg.penalty_factor": cfg.overlong_penalty,
        ADDED_PREFIX + "overlong_buffer_cfg.log": cfg.overlong_buffer > 0,
        ADDED_PREFIX + "max_resp_len": cfg.max_response_length,
        # trainer [ppo_trainer.yaml]
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
        # the run directory's own name: `-o .` or `-o ..` named "." or ".." before
        "trainer.experiment_name": Path(cfg.output_dir).resolve().name or "run",
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


def override_arg(key: str, value: Any) -> str:
    """One Hydra override: KEY=VALUE, or ++KEY=VALUE for a key verl reads but its shipped config lacks."""
    return ("++" if key.startswith(ADDED_PREFIX) else "") + f"{key}={hydra_value(value)}"


def command_line(overrides: dict[str, Any], python: str = "python3") -> list[str]:
    return [python, "-m", VERL_ENTRY] + [override_arg(k, v) for k, v in overrides.items()]


def version_guard(version: str) -> str:
    """The script's first command: stop with one line unless a supported verl is installed (an unsupported
    release would fail in Hydra on a renamed key or, worse, compose and ignore a setting)."""
    program = "\n".join(
        [
            "import importlib.metadata as m, sys",
            "try:",
            "    v = m.version('verl')",
            "except m.PackageNotFoundError:",
            f"    sys.exit('run_verl.sh needs verl {version}, which is not installed: pip install verl=={version}')",
            f"if v not in {SUPPORTED_VERL!r}:",
            f"    sys.exit('run_verl.sh is written for verl {version} (supported: {_supported_text()}), found verl '"
            f" + v + ': pip install verl=={version}')",
        ]
    )
    return "python3 -c " + shlex.quote(program)


def render_script(argv: list[str], notes: list[str], version: str) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by `loraforge train --backend verl` for verl {version}: the same run as a verl DAPO job.",
        f"# Needs verl {_supported_text()} installed ({VERL_INSTALL}); runs from any directory.",
        "# Extra Hydra overrides given to this script are appended (later ones win).",
    ]
    lines += [f"# note: {n}" for n in notes]
    lines += [
        "set -euo pipefail",
        version_guard(version),
    ]
    return "\n".join(lines) + "\n" + format_command(argv) + ' "$@"\n'


def format_command(argv: list[str]) -> str:
    """`python3 -m ENTRY` on the first line, one shell-quoted override per continued line."""
    return " \\\n    ".join([" ".join(shlex.quote(a) for a in argv[:3])] + [shlex.quote(a) for a in argv[3:]])


# ------------------------------------------------------------------------------------------------
# the whole hand-off
@dataclass
class VerlLaunch:
    directory: Path
    script: Path
    argv: list[str]
    overrides: dict[str, Any]
    verl_version: str
    notes: list[str] = field(default_factory=list)
    unchanged: bool = False  # RUN_DIR/verl already held this very job: nothing was written


def default_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # pragma: no cover - torch is a dependency
        return 1


def check_handed_on(cfg: TrainConfig) -> None:
    """Refuse a setting the user gave that verl 0.9 would accept and ignore."""
    if cfg.quantize:
        raise LoraforgeError(
            f"--quantize {cfg.quantize} cannot be handed to verl 0.9: its FSDP actor trains an unquantized base "
            "(its rollout quantization is fp8 only); drop --quantize, or train with the bundled loop (--backend local)"
        )
    default_limit = TrainConfig.__dataclass_fields__["max_gen_batches"].default
    # 0 (never give up) is what verl does; the default is not a choice the user made
    if cfg.dynamic_sampling and cfg.max_gen_batches not in (0, default_limit):
        raise LoraforgeError(
            f"--max-gen-batches {cfg.max_gen_batches} cannot be handed to verl: verl 0.9 ignores "
            "algorithm.filter_groups.max_num_gen_batches and refills each batch until it is full; drop the flag "
            "(or use --no-dynamic-sampling)"
        )


def prepare(cfg: TrainConfig, gpus_per_node: int | None = None, nodes: int = 1, overwrite: bool = False) -> VerlLaunch:
    """Check the run, write RUN_DIR/verl/ (see put_job) and return what it holds. `cfg` may be unresolved."""
    from loraforge.rl.data import load_examples

    cfg = cfg.resolved()
    version, version_notes = choose_verl_version(cfg.verl_version, installed_verl_version())
    check_handed_on(cfg)
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
    skipped: list[str] = []  # rows past data.MAX_ROW_CHARS: said in the notes
    # every input is read before anything is written
    examples = load_examples(cfg.data, cfg.data_split, skipped.append)
    val = (
        load_examples(cfg.eval_data, "test", skipped.append, flag="--eval-data")[: cfg.eval_max_prompts]
        if cfg.eval_data
        else examples[: cfg.eval_max_prompts]
    )
    shown = Path(cfg.output_dir) / "verl"  # as the user named it, for messages
    out = Path(cfg.output_dir).resolve() / "verl"
    files = VerlFiles(
        train=out / "train.parquet",
        val=out / "val.parquet",
        reward=out / "reward.py",
        checkpoints=out / "checkpoints",
    )
    overrides = verl_overrides(cfg, base, lora, files, gpus_per_node, nodes, len(examples))

    notes = list(version_notes) + [line.removeprefix("warning: ") for line in skipped]
    if cfg.dynamic_sampling:
        notes.append(
            "dynamic sampling in verl 0.9 refills the batch until it is full, with no limit on generation "
            "batches per step (loraforge's --max-gen-batches has no verl equivalent)"
        )
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

    def write(d: Path) -> None:
        write_parquet(examples, d / files.train.name, cfg.prompt_template)
        write_parquet(val, d / files.val.name, cfg.prompt_template)
        (d / files.reward.name).write_text(REWARD_TEMPLATE.format(reward=cfg.reward))
        (d / SCRIPT).write_text(render_script(argv, notes, version))
        (d / "overrides.json").write_text(json.dumps(overrides, indent=2) + "\n")

    changed = put_job(out, write, overwrite)
    return VerlLaunch(
        directory=shown,
        script=shown / SCRIPT,
        argv=argv,
        overrides=overrides,
        verl_version=version,
        notes=notes,
        unchanged=not changed,
    )


def launch(prepared: VerlLaunch, echo: Callable[[str], None] = print) -> int:
    """Run the verl job in the foreground (needs a supported verl installed); returns its exit code."""
    installed = installed_verl_version()
    if installed is None:
        raise LoraforgeError(
            f"--run needs verl, which is not installed here: {VERL_INSTALL}. "
            f"Or copy {prepared.directory} to a GPU machine and run {prepared.script.name} there"
        )
    if installed not in SUPPORTED_VERL:
        raise LoraforgeError(
            f"--run: verl {installed} is installed, but the job is written for verl {prepared.verl_version} "
            f"(supported: {_supported_text()}): pip install 'verl=={prepared.verl_version}'"
        )
    argv = [sys.executable] + prepared.argv[1:]
    echo(f"launching verl {installed}: {prepared.script}")
    # RUN_DIR/verl's lock, held while verl runs: another prepare (with --overwrite) would otherwise replace the
    # job's files under it before its first checkpoint, which is what protects a job afterwards (put_job)
    with atomic.DirLock(Path(prepared.directory).resolve()):
        return subprocess.call(argv)
