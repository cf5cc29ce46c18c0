"""Group-relative advantages (GRPO outcome advantage) and DAPO's dynamic-sampling filter.

Pure functions on tensors/lists, pinned by tests/rl/test_advantage.py with hand-computed numbers.
Both match verl (`compute_grpo_outcome_advantage`, the DAPO recipe's `filter_groups`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch


def group_advantages(rewards: torch.Tensor, group_ids: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) per group g of responses to one prompt.

    std is the UNBIASED standard deviation (torch.std, divides by G - 1), as verl and TRL use;
    a group of one response gets mean 0 and std 1 (so A = r / (1 + eps)), as verl does. Returns one
    scalar per response; the caller broadcasts it over the response tokens.
    """
    rewards = rewards.float()
    rows: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        rows[int(g)].append(i)
    out = torch.empty_like(rewards)
    for idx in rows.values():
        r = rewards[idx]
        if len(idx) == 1:
            mean, std = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean, std = r.mean(), r.std()  # unbiased
        out[idx] = (r - mean) / (std + eps)
    return out


def keep_group(accs: Sequence[float]) -> bool:
    """DAPO dynamic sampling: keep a group whose accuracies vary (population std > 0), or of one sample.

    A group where every response is right (or every one wrong) has zero advantage everywhere and
    would only dilute the token-mean; verl's recipe filters on the `acc` metric by default.
    """
    if len(accs) == 1:
        return True
    mean = sum(accs) / len(accs)
    return math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)) > 0


def kept_groups(accs: Sequence[float], group_ids: Sequence[int]) -> list[int]:
    """The group ids (in first-appearance order) that `keep_group` keeps."""
    by_group: dict[int, list[float]] = {}
    for a, g in zip(accs, group_ids):
        by_group.setdefault(int(g), []).append(float(a))
    return [g for g, a in by_group.items() if keep_group(a)]


def fill_batch(next_groups, target: int, max_gen_batches: int, dynamic: bool):
    """Draw generation batches until `target` groups are kept; the DAPO recipe's loop, as a pure function.

    `next_groups()` generates one batch and returns its groups, each a list of per-response accuracies
    (or any object `accs_of` below can read: a list of floats or an object with `.accs`).
    Without dynamic sampling the first batch is used whole. With it, groups failing `keep_group` are
    dropped, batches are drawn until at least `target` groups are kept, and the kept list is cut to
    `target` (verl truncates to train_batch_size * G rows, i.e. whole groups in order).
    Returns (kept groups, every group generated, number of generation batches).
    Raises GroupsExhausted (a RuntimeError carrying the groups seen) after `max_gen_batches` batches
    (0 = no limit) with too few kept; the trainer turns it into a message naming --max-gen-batches.
    """
    kept, seen, batches = [], [], 0
    while True:
        groups = next_groups()
        batches += 1
        seen.extend(groups)
        if not dynamic:
            return list(groups), seen, batches
        kept.extend(g for g in groups if keep_group(_accs_of(g)))
        if len(kept) >= target:
            return kept[:target], seen, batches
        if max_gen_batches > 0 and batches >= max_gen_batches:
            raise GroupsExhausted(
                kept,
                seen,
                batches,
                f"dynamic sampling kept {len(kept)} of the {target} groups needed after {batches} generation "
                f"batches ({len(seen)} groups drawn, the rest had all-equal accuracy)",
            )


class GroupsExhausted(RuntimeError):
    """Dynamic sampling drew its last allowed batch with too few varying groups."""

    def __init__(self, kept: list, seen: list, batches: int, message: str):
        super().__init__(message)
        self.kept, self.seen, self.batches = kept, seen, batches

    def outcome_counts(self) -> tuple[int, int]:
        """(groups where every response was right, groups where every one was wrong) among those seen."""
        same = [_accs_of(g) for g in self.seen if not keep_group(_accs_of(g))]
        right = sum(1 for a in same if a and all(x > 0 for x in a))
        return right, len(same) - right


def _accs_of(group):
    return group.accs if hasattr(group, "accs") else group
