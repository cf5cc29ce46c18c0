"""The DAPO/GRPO loop for a PEFT adapter on one machine.

    train(cfg) / resume(run_dir)
      for each step:
        rollout   prompts -> G samples each (loraforge.sampling.generation), scored (rewards.py) with overlong
                  shaping; DAPO's dynamic sampling refills until --prompt-batch groups vary (advantage.py)
        advantage group-normalised rewards, broadcast over response tokens
        old logp  recomputed with the current policy BEFORE the updates (so updates after the first
                  mini-batch are off-policy and the clip acts), entropy on the same pass
        ref logp  only with --kl-beta > 0: the INITIAL adapter's weights (a frozen copy), never
                  "adapter disabled", which for residualised adapters (PiSSA, MiLoRA, OLoRA) is not
                  the initial policy
        updates   --prompt-batch / --mini-batch optimizer steps per epoch, each the token-mean loss over
                  its whole mini-batch (micro-batches accumulate with the mini-batch's token count)
        metrics   incl. KL(pi_new || pi_old) on the step's response tokens after its updates
        checkpoint every --save-every steps; Ctrl-C finishes the step, saves, and exits

Failing safe: the state at the end of the last complete step (adapter, optimizer, scheduler, RNGs,
data position) is kept in memory (on the CPU) during each step. A step that fails, for whatever
reason (dynamic sampling gives up, a reward function raises, the loss turns NaN, out of memory,
SIGTERM), rolls back to it and saves it as a checkpoint and as RUN_DIR/adapter before the error is
reported, so `--resume` continues exactly where the uninterrupted run would have been. That machinery
(the sound state, roll-back, rescue save, signal handling, the run lock) is failsafe.py; the optimizer side
of a step (log-probs, advantages, updates, metrics) is update.py; loading the policy and its log-probs is
policy.py; the sampling side of a step (rollout, scoring, the samples log, evaluation) is rollout_side.py;
what the run trains from, recorded and checked on --resume, is inputs.py. This module is the loop.

Departures from verl, each on purpose and named where it happens: exact token-mean under gradient
accumulation (loss.py); by default one model for sampling and training, so there are no
sampler/trainer log-prob mismatches to monitor (with --rollout vllm there are, and they are checked
every step: rollout.py); KL(new || old) logged with a non-negative control-variate estimator
(loss.kl_new_old_terms).

Several processes (accelerate launch / torchrun) run this same loop: rollouts are shared out and
gathered, gradients summed over the processes; see distributed.py. With one process those calls are
no-ops. The sampler is a rollout backend (rollout.py): the in-process transformers one by default.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.adapters.directory import resolve_base
from loraforge.adapters.schemas import read_adapter_config
from loraforge.adapters.writers import check_tensor
from loraforge.core.errors import LoraforgeError
from loraforge.rl import checkpoint as ckpt
from loraforge.rl import inputs
from loraforge.rl.advantage import GroupsExhausted
from loraforge.rl.config import TrainConfig
from loraforge.rl.data import PromptStream, load_examples
from loraforge.rl.distributed import check_world_divides, device_for, init_distributed
from loraforge.rl.distributed import context as dist_context
from loraforge.rl.failsafe import FailSafe, Terminated, TrainingDiverged, run_lock
from loraforge.rl.metrics import MetricsLogger, SamplesLog
from loraforge.rl.policy import adapter_params, load_policy, lr_factor, make_rollout
from loraforge.rl.progress import NoProgress, StepProgress, banner
from loraforge.rl.rewards import RewardGuard, Scorer, get_scorer
from loraforge.rl.rollout_side import RolloutSide
from loraforge.rl.update import PolicyUpdate


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    adapter_dir: Path | None
    interrupted: bool = False
    last_metrics: dict[str, Any] | None = None
    stop_signal: int | None = None  # signal.SIGINT or signal.SIGTERM when interrupted


# ------------------------------------------------------------------------------------------------
# the trainer
class Trainer(RolloutSide, PolicyUpdate, FailSafe):
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        scorer: Scorer | None = None,
        echo: Callable[[str], None] | None = None,
        resume_from: Path | None = None,
    ):
        self.cfg = cfg.resolved()
        self.run_dir = Path(self.cfg.output_dir)
        self.echo = echo or (lambda s: print(s, flush=True))
        # every reward goes through the guard: a raising or non-numeric reward names itself and the row
        self.scorer = RewardGuard(scorer or get_scorer(self.cfg.reward), None if scorer else self.cfg.reward)
        self.resume_from = resume_from
        self._stop_requested = False
        self._stop_signal: int | None = None
        self._abortable = False  # True while a step runs: SIGTERM may abandon it (the sound state is kept)
        self.dist = dist_context()
        self._updates, self._synced = 0, None  # optimizer steps taken; the count the sampler last received
        self._samples: SamplesLog | None = None  # RUN_DIR/samples.jsonl, opened when the run starts
        self.progress = NoProgress()  # rows, tokens, updates and the ETA while a step runs (progress.py)

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.device)
        check_world_divides(
            cfg.prompt_batch,
            self.dist.world,
            "GPUs (one vLLM engine per process)" if cfg.rollout == "vllm" else "processes",
        )
        if cfg.rollout == "vllm":  # say what to install before loading anything
            from loraforge.rl.vllm_rollout import require_vllm

            require_vllm()
        if not self.dist.is_main:  # one voice: process 0 prints, logs and saves
            self.echo = lambda s: None
        torch.manual_seed(cfg.seed)
        self.examples = load_examples(cfg.data, cfg.data_split, self.echo)
        self._row_of = {id(e): e.row for e in self.examples}  # for messages naming a data row
        self.eval_examples = (
            load_examples(cfg.eval_data, "test", self.echo, flag="--eval-data")[: cfg.eval_max_prompts]
            if cfg.eval_data and cfg.eval_every
            else []
        )
        base = resolve_base(cfg.adapter, cfg.model)
        read_adapter_config(cfg.adapter)  # damaged: one line here, not an error inside PEFT
        self.lineage = self._lineage(base.path)  # on --resume: refused here if the init, model or data changed
        self.model, self.tokenizer, self.device = load_policy(cfg, self.echo, device_for(self.dist, cfg.device), base)
        self.model.eval()  # no dropout anywhere: the paper's LoRA dropout is 0, and base dropout would bias ratios
        self.params = adapter_params(self.model)
        self.pad = self.tokenizer.pad_token_id
        self.stream = PromptStream(self.examples, cfg.seed)
        # each process samples with its own stream (process 0's is the single-process one)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.steps, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr_ratio),
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ref_path = self.run_dir / "reference_adapter.safetensors"
        self.start_step = 0
        self.skipped = 0
        # a resumed run whose reference is damaged or missing writes it again: the init it was made from has
        # just been checked unchanged (_lineage), and the parameters are still the init's until _restore
        fresh = self.resume_from is None or ckpt.reference_problem(ref_path, self.params) is not None
        if cfg.kl_beta > 0 and self.dist.is_main and fresh:
            from safetensors.torch import save_file

            if self.resume_from is not None:
                self.echo(f"warning: {ckpt.reference_problem(ref_path, self.params)}; written again from the init")
            tmp = ref_path.with_name(ckpt.TMP + ref_path.name)  # renamed into place: a kill never tears it
            save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(tmp))
            os.replace(tmp, ref_path)
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.dist.barrier()  # the reference file is written before anyone reads it
        # the KL reference: a frozen copy of the INITIAL adapter weights (saved at the start of the run)
        self.ref_params = None
        if cfg.kl_beta > 0:
            from safetensors.torch import load_file

            self.ref_params = {n: t.to(self.device) for n, t in load_file(str(ref_path)).items()}
        if self.dist.is_main:
            cfg.save(self.run_dir / "config.json")
        self.rollout = make_rollout(cfg.rollout, self)

    def _lineage(self, model_path: str) -> dict[str, Any] | None:
        """What this run trains from (rl/inputs.py), recorded in every adapter it saves: hashed once, here, by
        process 0 for a new run; on --resume the checkpoint's record, checked by every process (so that all of
        them stop together) against the init, model and data before any of them is loaded."""
        data = inputs.data_record(self.cfg.data, self.examples)
        if self.resume_from is not None:
            return inputs.check_resume(self.resume_from, self.cfg.adapter, model_path, data, self.echo)
        return inputs.new_record(self.cfg.adapter, model_path, data) if self.dist.is_main else None

    def _restore(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        blob, state = ckpt.load_trainer_state(path)
        weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise LoraforgeError(
                f"checkpoint {path} does not match the adapter: unexpected {result.unexpected_keys[:3]}"
            )
        ckpt.check_optimizer_state(blob["optimizer"], list(self.params.values()), path)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        ckpt.set_rng_state(blob["rng"], self.generator)
        per_rank = blob.get("rng_ranks")  # written by multi-process runs: each process's sampler state
        if per_rank is not None and len(per_rank) == self.dist.world:
            self.generator.set_state(per_rank[self.dist.rank])
        elif per_rank is not None or self.dist.enabled:
            self.echo(
                f"warning: {path} was saved by {len(per_rank or [1])} process(es), resumed on {self.dist.world}: "
                "the run continues, but its sampling does not replay the uninterrupted run"
            )
        self.stream.load_state(state["data"])
        self.start_step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.echo(f"resumed from {path} at step {self.start_step}")

    def step(self, step: int) -> dict[str, Any]:
        """One training step: rollout (with scoring and dynamic sampling), advantages, old/ref log-probs,
        the updates, the metrics. Parameters change only inside `_update`."""
        t0 = time.perf_counter()
        self.progress.step_started(step, self.cfg.prompt_batch // self.cfg.mini_batch * self.cfg.epochs)
        self._sync_sampler()
        kept, seen, gen_batches = self._rollout()
        t_gen = time.perf_counter() - t0
        self._log_samples(step, seen)
        batch = self._advantages(kept)
        extra = self._check_sampler(batch.mine, step) if getattr(self.rollout, "separate", False) else {}
        # this process's rows of the first mini-batch come first in `mine`
        old_lp, ent = self._old_logprobs(batch.mine, len(batch.plan[0][1]) if batch.plan else 0)
        ref_lp = self._logprobs(batch.mine, params=self.ref_params)[0] if self.cfg.kl_beta > 0 else None
        stats_acc, grad_norms, lr = self._update(batch, old_lp, ent, ref_lp, step)
        m = self._step_metrics(step, seen, gen_batches, batch.mine, old_lp, ent, (stats_acc, grad_norms, lr), t0, t_gen)
        m.update(extra)
        return m

    # -- the loop -----------------------------------------------------------------------------
    def _check_params(self) -> None:
        """The writers' one check on every tensor saved (adapters/writers.check_tensor)."""
        for name, p in self.params.items():
            check_tensor(name, p, what=f"the adapter of {self.run_dir}")

    def save(self, step: int) -> Path:
        """Checkpoint (written by process 0; with several processes it holds every process's sampler state)."""
        self._check_params()
        extra = {"rng_ranks": self.dist.all_gather_object(self.generator.get_state())} if self.dist.enabled else None
        path = ckpt.checkpoint_path(self.run_dir, step)
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir,
                step,
                self.model,
                self.optimizer,
                self.scheduler,
                self.generator,
                {"data": self.stream.state(), "skipped": self.skipped},
                keep=self.cfg.keep_checkpoints,
                extra=extra,
                lineage=self.lineage,
            )
        self.dist.barrier()
        return path

    def save_adapter(self) -> Path:
        """RUN_DIR/adapter: the current adapter in PEFT format, with its lineage (process 0 writes it)."""
        dest = self.run_dir / "adapter"
        self._check_params()
        if self.dist.is_main:
            ckpt.atomic_save_adapter(self.model, dest, self.lineage)
        self.dist.barrier()
        return dest

    def run(self) -> TrainResult:
        self.setup()
        cfg = self.cfg
        logger = (
            MetricsLogger(
                self.run_dir,
                cfg.steps,
                self._write,
                cfg.tensorboard,
                resume_step=self.start_step if self.resume_from is not None else None,
            )
            if self.dist.is_main
            else _NullLogger()
        )
        if self.dist.is_main:  # read back (and cut to the resumed step) before the first step appends
            self._samples = SamplesLog(self.run_dir, self.start_step if self.resume_from is not None else 0, self.echo)
        detail = f"{len(self.params)} adapter tensors, {sum(p.numel() for p in self.params.values()):,} parameters"
        self.echo(f"{banner(cfg.algo, cfg.steps, self.start_step, detail, self.dist.world)} -> {self.run_dir}")
        self._last_saved = self.start_step if self.resume_from is not None else None
        bar = self._bar = _progress(cfg.steps, self.start_step) if self.dist.is_main else None
        if self.dist.is_main:
            self.progress = StepProgress(cfg.steps, self.start_step, bar)
        try:
            with self._deferred_interrupt():
                result = self._loop(logger, bar)
        finally:
            logger.close()
            if bar is not None:
                bar.close()
        if result is not None:
            return result
        self.dist.check_in_sync(list(self.params.values()))
        final = self.save_adapter()
        if self.dist.enabled:
            self.echo(f"the adapter is identical on all {self.dist.world} processes")
        self.echo(f"done: adapter saved to {final}")
        return TrainResult(self.run_dir, cfg.steps, final, last_metrics=self._last_metrics)

    def _loop(self, logger, bar) -> TrainResult | None:
        """The steps; a TrainResult when the run stopped early on a signal, None when it completed."""
        cfg = self.cfg
        self._last_metrics = None
        sound = None
        for step in range(self.start_step + 1, cfg.steps + 1):
            sound = self._capture(step - 1, sound)
            try:
                self._abortable = True
                metrics = self.step(step)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    metrics.update(self.evaluate())
                self._abortable = False
            except Terminated:
                self._abortable = False
                saved, what_saved = self._rescue(sound, self._last_saved)
                self.echo(f"SIGTERM during step {step}: {what_saved}")
                return self._stopped(saved if saved is not None else (self._last_saved or 0), signal.SIGTERM)
            except Exception as e:
                self._abortable = False
                if self.dist.enabled and not isinstance(e, (GroupsExhausted, TrainingDiverged)):
                    raise  # raised on this process only: the others are not at a point where they can save
                saved, what_saved = self._rescue(sound, self._last_saved)
                message = self._failure_message(e, step, saved, what_saved)
                if isinstance(e, (LoraforgeError, GroupsExhausted, TrainingDiverged)):
                    raise LoraforgeError(message) from None
                self.echo(message)  # an unexpected error: what was saved, then its traceback
                raise
            logger.log(metrics)
            self._last_metrics = metrics
            if bar is not None:
                bar.update(1)
            self.progress.step_finished()
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                self.save(step)
                self._last_saved = step
            if self.dist.any(self._stop_requested):  # every process stops at the same step
                if self._last_saved != step:
                    self.save(step)
                    self._last_saved = step
                self.echo(
                    f"interrupted: saved a checkpoint at step {step}; continue with "
                    f"`loraforge train --resume {self.run_dir}`"
                )
                return self._stopped(step, self._stop_signal or signal.SIGINT)
        return None

    def _stopped(self, step: int, signum: int) -> TrainResult:
        return TrainResult(
            self.run_dir, step, None, interrupted=True, last_metrics=self._last_metrics, stop_signal=signum
        )

    def _write(self, line: str) -> None:
        """Print a line; above the progress bar when one is shown."""
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable:
            bar.write(line, file=sys.stdout)
        else:
            self.echo(line)


class _NullLogger:
    """The metrics logger of processes other than 0: metrics are written once."""

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None: shown only on a terminal, so logs and tests stay clean
    return tqdm(total=total, initial=initial, disable=None, file=sys.stderr, unit="step", leave=False)


# ------------------------------------------------------------------------------------------------
# entry points
# settings `--resume` may change: how a run stopped by dynamic sampling goes on (the rest would make the
# resumed run a different run than the one its checkpoints belong to)
RESUME_OVERRIDES = ("steps", "max_gen_batches", "dynamic_sampling")


def train(cfg: TrainConfig, *, scorer: Scorer | None = None, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Run a training from scratch into cfg.output_dir. A directory that already holds a run is refused,
    unless that run saved nothing (no checkpoint, no adapter): then it is started afresh."""
    echo = echo or (lambda s: print(s, flush=True))
    cfg.resolved()  # bad settings are refused before anything is created on disk
    dist = init_distributed(cfg.device)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    with run_lock(run_dir, dist, echo):
        exists = run_dir is not None and (run_dir / "config.json").exists()
        saved = exists and (ckpt.list_checkpoints(run_dir) or (run_dir / "adapter").exists())
        dist.barrier()  # every process has looked before process 0 writes config.json
        if saved:
            raise LoraforgeError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another -o directory"
            )
        if exists:
            echo(f"{run_dir} holds a run that saved no checkpoint; starting it afresh")
        return Trainer(cfg, scorer=scorer, echo=echo).run()


def resume(
    run_dir: str | Path,
    *,
    steps: int | None = None,
    scorer: Scorer | None = None,
    echo: Callable[[str], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainResult:
    """Continue the run in run_dir from its newest sound checkpoint, with its saved config. `steps` may be
    raised; `overrides` may set max_gen_batches and dynamic_sampling. A run that saved no checkpoint is
    started from step 0 with its config; a damaged newest checkpoint is set aside, falling back to the one before."""
    echo = echo or (lambda s: print(s, flush=True))
    run_dir = Path(run_dir)
    if not os.path.lexists(run_dir / "config.json"):
        raise LoraforgeError(f"--resume {run_dir}: no config.json there; expected a directory `loraforge train` wrote")
    try:
        cfg = TrainConfig.load(run_dir / "config.json", echo)
    except ValueError as e:  # bad JSON: LoraforgeError (config problems) passes through as it is
        raise LoraforgeError(f"--resume {run_dir}: config.json is unreadable ({e})") from None
    cfg.output_dir = str(run_dir)
    try:
        cfg.resolved()
    except LoraforgeError as e:  # a config.json edited by hand: name the file
        raise LoraforgeError(f"--resume {run_dir}: {run_dir / 'config.json'} holds a bad setting: {e}") from None
    dist = init_distributed(cfg.device)
    _apply_overrides(cfg, {"steps": steps, **(overrides or {})}, echo)
    with run_lock(run_dir, dist, echo):
        had = ckpt.list_checkpoints(run_dir)
        latest = ckpt.newest_sound_checkpoint(run_dir, echo) if dist.is_main else None
        if dist.enabled:
            latest = dist.all_gather_object(latest)[0]
        if latest is None and had:
            raise LoraforgeError(
                f"--resume {run_dir}: none of its {len(had)} checkpoint(s) reads back whole (set aside as "
                f"{run_dir / ckpt.CKPT_DIR}/damaged-step_N); start a new run with -o"
            )
        if latest is None:
            if (run_dir / "adapter").exists():
                raise LoraforgeError(
                    f"--resume {run_dir}: it holds an adapter but no checkpoint to continue from (were "
                    f"{run_dir / ckpt.CKPT_DIR} deleted?); start a new run with -o, from that adapter if you like"
                )
            echo(f"{run_dir} holds no checkpoint: starting its run from step 0 with its config.json")
        return Trainer(cfg, scorer=scorer, echo=echo, resume_from=latest).run()


def _apply_overrides(cfg: TrainConfig, values: dict[str, Any], echo: Callable[[str], None]) -> None:
    for key, value in values.items():
        if key not in RESUME_OVERRIDES:
            raise LoraforgeError(f"--resume may change only {', '.join(RESUME_OVERRIDES)}; got {key}")
        if value is not None and value != getattr(cfg, key):
            name = key.replace("_", "-")
            given = (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"
            echo(f"resuming with {given} (the run had {key} = {getattr(cfg, key)})")
            setattr(cfg, key, value)
