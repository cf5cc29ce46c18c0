"""The optimizer side of a training step: log-probs over micro-batches, group advantages, the updates
(token-mean loss over each mini-batch, gradients summed over processes) and the step's metrics. A mixin of
`Trainer` (trainer.py), which owns the model, optimizer and data; moved out of trainer.py unchanged."""

from __future__ import annotations

import time
from typing import Any

import torch

from loraforge.adapters.writers import tensor_problem
from loraforge.core.errors import LoraforgeError
from loraforge.rl.advantage import group_advantages
from loraforge.rl.distributed import plan_minibatches
from loraforge.rl.failsafe import TrainingDiverged
from loraforge.rl.loss import aggregate, kl_k3, kl_new_old_terms, masked_mean, policy_loss
from loraforge.rl.policy import Group, Sample, StepBatch, pack, response_logprobs


class PolicyUpdate:
    """Trainer methods for one step's log-probs, advantages, updates and metrics."""

    # -- log-probs -----------------------------------------------------------------------------
    def _logprobs(self, samples: list[Sample], entropy=False, params=None, grad=False):
        """Batched over micro-batches; returns per-sample tensors (list) of logp (and entropy)."""
        out_lp, out_ent = [], []
        mb = self.cfg.micro_batch
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for i in range(0, len(samples), mb):
                chunk = samples[i : i + mb]
                batch = pack(chunk, self.pad)
                lp, ent = self._forward(batch, entropy, params)
                for j, s in enumerate(chunk):
                    n = len(s.response_ids)
                    out_lp.append(lp[j, :n].detach().cpu())
                    out_ent.append(ent[j, :n].cpu() if ent is not None else None)
        return out_lp, out_ent

    def _forward(self, batch, entropy=False, params=None):
        try:
            return response_logprobs(self.model, batch, self.cfg.temperature, entropy, params)
        except torch.OutOfMemoryError as e:
            rows, width = batch["response_ids"].shape
            raise LoraforgeError(
                f"out of memory in a training forward of {rows} rows x {width} response tokens; lower --micro-batch "
                f"(now {self.cfg.micro_batch}) or --max-response-length (now {self.cfg.max_response_length})"
            ) from e

    def _old_logprobs(self, samples: list[Sample], first: int):
        """Old log-probs and entropy before the updates, except for the first `first` rows (the first
        mini-batch): their old log-probs are taken from their own update forward pass (_keep_old), which
        runs before any optimizer step and so computes the very same numbers (with one mini-batch and
        one epoch, as on-policy GRPO, this pass disappears). Entries for those rows are None until then."""
        old_lp, ent = self._logprobs(samples[first:], entropy=True) if first < len(samples) else ([], [])
        return [None] * first + old_lp, [None] * first + ent

    @staticmethod
    def _keep_old(
        rows: list[int], samples: list[Sample], logp: torch.Tensor, entropy: torch.Tensor, old_lp: list, ent: list
    ) -> None:
        """Store a first-mini-batch forward's log-probs (detached) and entropy as the rows' old ones."""
        for j, i in enumerate(rows):
            n = len(samples[i].response_ids)
            old_lp[i] = logp[j, :n].detach().cpu()
            ent[i] = entropy[j, :n].cpu()

    @staticmethod
    def _pad_list(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
        out = torch.zeros(len(tensors), width)
        for i, t in enumerate(tensors):
            out[i, : t.shape[0]] = t
        return out

    def _advantages(self, kept: list[Group]) -> StepBatch:
        """The kept groups as rows with group-normalised advantages, split into mini-batches and shares."""
        cfg = self.cfg
        samples = [s for g in kept for s in g.samples]  # the global batch: the same on every process
        group_ids = [gi for gi, g in enumerate(kept) for _ in g.samples]
        adv = group_advantages(torch.tensor([s.reward for s in samples]), group_ids)
        # rows of each global mini-batch and this process's share of them (all of them with one process)
        plan = plan_minibatches([len(g.samples) for g in kept], cfg.mini_batch, self.dist.world, self.dist.rank)
        local = [i for _, rows in plan for i in rows]
        return StepBatch(samples, adv, plan, [samples[i] for i in local], {row: k for k, row in enumerate(local)})

    def _update(self, batch: StepBatch, old_lp: list, ent: list, ref_lp: list | None, step: int):
        """--epochs passes of one optimizer step per mini-batch. Returns (per-micro-batch stats, grad norms, lr)."""
        cfg = self.cfg
        stats_acc: dict[str, list[float]] = {"ppo_kl": [], "clipfrac": [], "clipfrac_lower": [], "kl_ref": []}
        grad_norms: list[float] = []
        first = self._updates
        for _epoch in range(cfg.epochs):
            for rows, local_rows in batch.plan:
                bad = self._accumulate(batch, rows, local_rows, old_lp, ent, ref_lp, stats_acc)
                # all processes stop together when any saw a non-finite loss (the flag rides the all-reduce)
                if self.dist.sync_grads(list(self.params.values()), bad is not None):
                    what = f"the loss is {bad}" if bad is not None else "the loss is not finite (on another process)"
                    raise TrainingDiverged(f"{what} at step {step}")
                norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
                if torch.isfinite(norm):
                    self.optimizer.step()
                    grad_norms.append(norm.item())
                else:  # verl skips the update when the grad norm is not finite
                    self.skipped += 1
                self._updates += 1
                self.progress.updated(self._updates - first)
                self.optimizer.zero_grad(set_to_none=True)
        # the writers' one check (finite, no dead row of A), before the adapter is saved or handed to a sampler:
        # a step that breaks it is rolled back like a NaN loss
        for name, p in self.params.items():
            problem = tensor_problem(name, p)
            if problem is not None:
                raise TrainingDiverged(f"after the updates of step {step}, {problem}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return stats_acc, grad_norms, lr

    def _accumulate(self, batch: StepBatch, rows, local_rows, old_lp, ent, ref_lp, stats_acc) -> float | None:
        """Backward of one global mini-batch's loss over this process's micro-batches (gradients accumulate).
        Returns the loss value when it was not finite (nothing more is accumulated then), else None."""
        cfg, samples, at = self.cfg, batch.samples, batch.at
        # the denominator is the whole global mini-batch's; gradients are summed over processes
        n_tokens = sum(len(samples[i].response_ids) for i in rows)
        denom = float(n_tokens if cfg.loss_agg == "token-mean" else len(rows))
        for u0 in range(0, len(local_rows), cfg.micro_batch):
            mi = local_rows[u0 : u0 + cfg.micro_batch]
            packed = pack([samples[i] for i in mi], self.pad)
            mask = packed["response_mask"].to(self.device)
            width = mask.shape[1]
            fresh = old_lp[at[mi[0]]] is None  # the first mini-batch: nothing has been updated yet
            logp, ent_mb = self._forward(packed, entropy=fresh)
            if fresh:
                self._keep_old([at[i] for i in mi], batch.mine, logp, ent_mb, old_lp, ent)
            old = self._pad_list([old_lp[at[i]] for i in mi], width).to(self.device)
            loss, st = policy_loss(
                logp,
                old,
                batch.adv[mi].to(self.device),
                mask,
                cfg.eps_low,
                cfg.eps_high,
                cfg.clip_c,
                loss_agg=cfg.loss_agg,
                denominator=denom,
            )
            for k in ("ppo_kl", "clipfrac", "clipfrac_lower"):
                stats_acc[k].append(st[k])
            if ref_lp is not None:
                ref = self._pad_list([ref_lp[at[i]] for i in mi], width).to(self.device)
                kl = kl_k3(logp, ref)
                loss = loss + cfg.kl_beta * aggregate(kl, mask, cfg.loss_agg, denom)
                stats_acc["kl_ref"].append(masked_mean(kl.detach(), mask).item())
            if not torch.isfinite(loss):
                return loss.item()
            loss.backward()
        return None

    def _step_metrics(self, step, seen, gen_batches, mine, old_lp, ent, updates, t0, t_gen) -> dict[str, Any]:
        """The step's metrics (metrics.py lists them); the paper's stability diagnostic KL(pi_new || pi_old)
        is measured here, on this step's response tokens after its updates. `updates` is _update's result."""
        stats_acc, grad_norms, lr = updates
        new_lp, _ = self._logprobs(mine)
        num = sum(kl_new_old_terms(n - o).sum().item() for n, o in zip(new_lp, old_lp))
        den = sum(o.numel() for o in old_lp)
        ent_sum = sum(e.sum().item() for e in ent)
        stats = self._reduce_means(stats_acc)
        if self.dist.enabled:  # token sums and counts of every process
            num, den, ent_sum = self.dist.sum_floats([num, den, ent_sum])
        den = max(1, den)
        elapsed = time.perf_counter() - t0
        all_samples = [s for g in seen for s in g.samples]
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in all_samples)
        m = {
            "step": step,
            "reward": mean([s.reward for s in all_samples]),
            "score": mean([s.score for s in all_samples]),
            "acc": mean([float(s.acc) for s in all_samples]),
            "kept_frac": len([g for g in seen if _varies(g)]) / max(1, len(seen)),
            "gen_batches": gen_batches,
            "ppo_kl": stats["ppo_kl"],
            "kl": num / den,
            "grad_norm": mean(grad_norms) if grad_norms else float("nan"),
            "clipfrac": stats["clipfrac"],
            "clipfrac_lower": stats["clipfrac_lower"],
            "entropy": ent_sum / den,
            "response_len": mean([len(s.response_ids) for s in all_samples]),
            "response_clip_ratio": mean([float(s.truncated) for s in all_samples]),
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
            "gen_time_s": t_gen,
            "skipped": self.skipped,
            "time_s": elapsed,
        }
        if self.cfg.kl_beta > 0:
            m["kl_ref"] = stats["kl_ref"]
        return m

    def _reduce_means(self, lists: dict[str, list[float]]) -> dict[str, float]:
        """Means of per-micro-batch statistics over every process's micro-batches."""
        if not self.dist.enabled:
            return {k: mean(v) for k, v in lists.items()}
        keys = list(lists)
        sums = self.dist.sum_floats([sum(lists[k]) for k in keys] + [len(lists[k]) for k in keys])
        return {k: (sums[i] / sums[len(keys) + i] if sums[len(keys) + i] else 0.0) for i, k in enumerate(keys)}


def mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


def _varies(group: Group) -> bool:
    from loraforge.rl.advantage import keep_group

    return keep_group(group.accs)
