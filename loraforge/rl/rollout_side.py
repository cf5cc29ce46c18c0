"""The sampling side of a training step: prompts formatted and sampled by the rollout backend (rollout.py),
every response scored through the reward guard with DAPO's overlong shaping, grouped per prompt, refilled by
dynamic sampling, shared out over processes; a few logged to samples.jsonl; a separate sampler's log-probs
checked against the trainer's; greedy evaluation. A mixin of `Trainer` (trainer.py), which owns the model,
tokenizer, data stream and rollout backend; moved out of trainer.py unchanged."""

from __future__ import annotations

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.rl.advantage import fill_batch
from loraforge.rl.data import format_prompt
from loraforge.rl.distributed import split_evenly
from loraforge.rl.policy import Group, Sample, pack, response_logprobs
from loraforge.rl.rewards import overlong_penalty
from loraforge.rl.rollout import check_sampler, logprob_gap_terms
from loraforge.rl.update import mean
from loraforge.sampling.generation import SamplingParams


class RolloutSide:
    """Trainer methods that sample, score and log responses."""

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
        """ "prompt 2 of this batch (data row 17 of --data), response row 5": where a reward was computed. Every
        position counts from 1, as eval's rows and a JSONL file's lines do."""
        data_row = self._row_of.get(id(example))
        source = f"data row {data_row + 1} of --data {self.cfg.data}" if data_row is not None else "--eval-data"
        return f"prompt {prompt_index + 1} of this batch ({source}), response row {row + 1}"

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
        chosen = [g.samples[0] for g in groups[:per_step] if g.samples]
        if not any(s.acc for s in chosen):
            chosen += [s for g in groups for s in g.samples if s.acc][:1]
        rows = []
        for s in chosen:
            prompt, response = (
                self.tokenizer.decode(ids, skip_special_tokens=True) for ids in (s.prompt_ids, s.response_ids)
            )
            row = {"step": step, "prompt": prompt, "response": response, "reward": s.reward, "score": s.score}
            rows.append(row | {"acc": s.acc})
        self._samples.append(rows)

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
