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
policy.py. This module is the loop that wires them.

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

from loraforge.core.errors import LoraforgeError
from loraforge.rl import checkpoint as ckpt
from loraforge.rl.advantage import GroupsExhausted, fill_batch
from loraforge.rl.config import TrainConfig
from loraforge.rl.data import PromptStream, format_prompt, load_examples
from loraforge.rl.distributed import check_world_divides, device_for, init_distributed, split_evenly
from loraforge.rl.distributed import context as dist_context
from loraforge.rl.failsafe import FailSafe, Terminated, TrainingDiverged, run_lock
from loraforge.rl.metrics import MetricsLogger, parse_lines
from loraforge.rl.policy import (
    Group,
    Sample,
    adapter_params,
    load_policy,
    lr_factor,
    make_rollout,
    pack,
    response_logprobs,
)
from loraforge.rl.rewards import RewardGuard, Scorer, get_scorer, overlong_penalty
from loraforge.rl.rollout import check_sampler, logprob_gap_terms
from loraforge.rl.update import PolicyUpdate, mean
from loraforge.sampling.generation import SamplingParams


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
class Trainer(PolicyUpdate, FailSafe):
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
        self.examples = load_examples(cfg.data, cfg.data_split)
        self._row_of = {id(e): i for i, e in enumerate(self.examples)}  # for messages naming a data row
        self.eval_examples = (
            load_examples(cfg.eval_data, "test")[: cfg.eval_max_prompts] if cfg.eval_data and cfg.eval_every else []
        )
        self.model, self.tokenizer, self.device = load_policy(cfg, self.echo, device_for(self.dist, cfg.device))
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
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif cfg.kl_beta > 0 and self.dist.is_main:
            from safetensors.torch import save_file

            tmp = ref_path.with_name(ckpt.TMP + ref_path.name)  # renamed into place: a kill never tears it
            save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(tmp))
            os.replace(tmp, ref_path)
        self.dist.barrier()  # the reference file is written before anyone reads it
        # the KL reference: a frozen copy of the INITIAL adapter weights (saved at the start of the run)
        self.ref_params = None
        if cfg.kl_beta > 0:
            from safetensors.torch import load_file

            self.ref_params = {n: t.to(self.device) for n, t in load_file(str(ref_path)).items()}
        if self.dist.is_main:
            cfg.save(self.run_dir / "config.json")
            # the init this run trains, recorded in every adapter it saves (hashed once, here)
            kept = ckpt.read_lineage(self.resume_from / "adapter") if self.resume_from is not None else None
            self.lineage = kept or ckpt.init_lineage(cfg.adapter)
        self.rollout = make_rollout(cfg.rollout, self)

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

    # -- rollout ------------------------------------------------------------------------------
    def _sampling(self, n: int, greedy: bool = False) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(
            n=n,
            max_new_tokens=cfg.max_response_length,
            temperature=0.0 if greedy else cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_prompt_tokens=cfg.max_prompt_length,
        )

    def _generate_groups(self, examples, n: int, greedy: bool = False) -> list[Group]:
        """Sample n responses to each example and score them: one Group per example."""
        cfg = self.cfg
        prompts = [format_prompt(e, self.tokenizer, cfg.prompt_template, cfg.chat_template) for e in examples]
        try:
            gen = self.rollout.generate(prompts, self._sampling(n, greedy))
        except LoraforgeError as e:
            raise LoraforgeError(f"{e} (flags: --rollout-batch-size, --max-response-length, --group-size)") from None
        return self._score(examples, prompts, gen)

    def _score(self, examples, prompts: list[str], gen) -> list[Group]:
        """Rewards (through the guard) plus DAPO's overlong penalty for every generated row, grouped by prompt."""
        cfg = self.cfg
        groups: list[Group] = [Group([], p) for p in prompts]
        sampler_lp = getattr(gen, "sampler_logprobs", None)
        for row, pi in enumerate(gen.prompt_index):
            length = gen.lengths[row]
            result = self.scorer(gen.texts[row], examples[pi].ground_truth, self._where(examples[pi], pi, row))
            penalty = (
                overlong_penalty(length, cfg.max_response_length, cfg.overlong_buffer, cfg.overlong_penalty)
                if cfg.overlong_buffer > 0
                else 0.0
            )
            groups[pi].samples.append(
                Sample(
                    prompt_ids=gen.prompt_ids[row][gen.prompt_mask[row].bool()].tolist(),
                    response_ids=gen.response_ids[row, :length].tolist(),
                    reward=float(result.score) + penalty,
                    score=float(result.score),
                    acc=bool(result.acc),
                    truncated=bool(gen.truncated[row]),
                    sampler_logp=sampler_lp[row] if sampler_lp is not None else None,
                    text=gen.texts[row],
                )
            )
        return groups

    def _where(self, example, prompt_index: int, row: int) -> str:
        """ "prompt 2 of this batch (data row 17 of --data), response row 5": where a reward was computed."""
        data_row = self._row_of.get(id(example))
        source = f"data row {data_row} of --data {self.cfg.data}" if data_row is not None else "--eval-data"
        return f"prompt {prompt_index} of this batch ({source}), response row {row}"

    def _generate_shared(self, examples, n: int, greedy: bool = False) -> list[Group]:
        """Groups for `examples`: each process generates its contiguous share, then all are gathered, so
        every process holds the same groups in the same order (one process: just `_generate_groups`)."""
        if not self.dist.enabled:
            return self._generate_groups(examples, n, greedy)
        share = split_evenly(len(examples), self.dist.world, self.dist.rank)
        mine = self._generate_groups([examples[i] for i in share], n, greedy) if len(share) else []
        return [g for part in self.dist.all_gather_object(mine) for g in part]

    def _sync_sampler(self) -> None:
        """Hand the current adapter to the sampler when it has changed since the last rollout."""
        if self._synced != self._updates:
            self.rollout.sync(self.model, self._updates)
            self._synced = self._updates

    def _rollout(self):
        cfg = self.cfg

        def next_groups():
            return self._generate_shared(self.stream.next_batch(cfg.prompt_batch), cfg.group_size)

        return fill_batch(next_groups, cfg.prompt_batch, cfg.max_gen_batches, cfg.dynamic_sampling)

    def _log_samples(self, step: int, groups: list[Group], per_step: int = 4) -> None:
        """Append a few of the step's scored responses to RUN_DIR/samples.jsonl, as TRL and verl log
        completions, so a reader can see what the reward paid for: the first response of each of the first
        `per_step` groups, plus the step's first correct one when none of those is. Rows: step, prompt
        (as the model saw it, special tokens dropped), response, reward, score, acc. On resume, rows of
        steps after the checkpoint are dropped first (those steps are redone)."""
        if not self.dist.is_main:
            return
        import json

        path = self.run_dir / "samples.jsonl"
        if not getattr(self, "_samples_started", False):
            self._samples_started = True
            if path.exists():  # a torn last line (a kill mid-write) is dropped with the redone steps' rows
                keep = self.start_step if self.resume_from is not None else 0
                rows, _ = parse_lines(path.read_text())
                ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= keep))
        chosen = [g.samples[0] for g in groups[:per_step] if g.samples]
        if not any(s.acc for s in chosen):
            chosen += [s for g in groups for s in g.samples if s.acc][:1]
        with path.open("a") as f:
            for s in chosen:
                prompt, response = (
                    self.tokenizer.decode(ids, skip_special_tokens=True) for ids in (s.prompt_ids, s.response_ids)
                )
                row = {"step": step, "prompt": prompt, "response": response, "reward": s.reward, "score": s.score}
                f.write(json.dumps(row | {"acc": s.acc}) + "\n")

    def step(self, step: int) -> dict[str, Any]:
        """One training step: rollout (with scoring and dynamic sampling), advantages, old/ref log-probs,
        the updates, the metrics. Parameters change only inside `_update`."""
        t0 = time.perf_counter()
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

    def _check_sampler(self, samples: list[Sample], step: int) -> dict[str, float]:
        """Compare a separate sampler's log-probs with the trainer's on a few responses (rollout.py).

        Both sides are the raw model distribution (logits at temperature 1, no top-k/top-p): what vLLM V1
        reports by default. The trainer side is measured with the current adapter and with the adapter
        disabled, so a sampler that runs the bare base is recognised even before the adapter has moved far.
        """
        cfg = self.cfg
        rows = samples[: cfg.logprob_check_rows]
        if any(s.sampler_logp is None for s in rows):
            raise LoraforgeError(
                f"--rollout {cfg.rollout} is a separate sampler but reported no log-probs for its "
                "tokens; it must return them (SampledGeneration.sampler_logprobs)"
            )
        d_cur = d_base = n = 0.0
        if rows:
            with torch.no_grad():
                batch = pack(rows, self.pad)
                cur = response_logprobs(self.model, batch, 1.0)[0].cpu()
                with self.model.disable_adapter():
                    base = response_logprobs(self.model, batch, 1.0)[0].cpu()
            lens = [len(s.response_ids) for s in rows]
            sampled = [s.sampler_logp for s in rows]
            d_cur, n = logprob_gap_terms(sampled, [cur[i, :k] for i, k in enumerate(lens)])
            d_base, _ = logprob_gap_terms(sampled, [base[i, :k] for i, k in enumerate(lens)])
        d_cur, d_base, n = self.dist.sum_floats([d_cur, d_base, n])  # every process takes part, rows or not
        if n == 0:
            return {}
        gap, gap_base = d_cur / n, d_base / n
        check_sampler(gap, cfg.logprob_check_tol, step, gap_base, engine=f"the {cfg.rollout} sampler")
        return {"sampler_logp_diff": gap, "sampler_logp_diff_base": gap_base}

    def evaluate(self) -> dict[str, float]:
        """Greedy decoding on the held-out prompts, scored with the run's reward."""
        self._sync_sampler()
        groups = self._generate_shared(self.eval_examples, 1, greedy=True)
        samples = [g.samples[0] for g in groups]
        return {"eval_acc": mean([float(s.acc) for s in samples]), "eval_reward": mean([s.score for s in samples])}

    # -- the loop -----------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Checkpoint (written by process 0; with several processes it holds every process's sampler state)."""
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
        where = f" on {self.dist.world} processes" if self.dist.enabled else ""
        self.echo(
            f"training {cfg.algo} for {cfg.steps} steps{where} ({len(self.params)} adapter tensors, "
            f"{sum(p.numel() for p in self.params.values()):,} parameters) -> {self.run_dir}"
        )
        self._last_saved = self.start_step if self.resume_from is not None else None
        bar = self._bar = _progress(cfg.steps, self.start_step) if self.dist.is_main else None
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
    if not (run_dir / "config.json").is_file():
        raise LoraforgeError(f"--resume {run_dir}: no config.json there; expected a directory `loraforge train` wrote")
    try:
        cfg = TrainConfig.load(run_dir / "config.json")
    except ValueError as e:  # bad JSON: LoraforgeError (config problems) passes through as it is
        raise LoraforgeError(f"--resume {run_dir}: config.json is unreadable ({e})") from None
    cfg.output_dir = str(run_dir)
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
