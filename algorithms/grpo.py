"""GRPO (Shao et al. 2024) and Dr. GRPO (Liu et al. 2025): a group baseline from the other samples
of the same prompt; every token of a response gets the response's advantage."""

from __future__ import annotations

from dataclasses import dataclass

import gin
import torch

from rlzoo.algorithms import ESTIMATORS, Credit, Estimator


def group_mean_std(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, unbiased std and size of the row's group. scores, group_ids: [B] -> three [B]."""
    n_groups = int(group_ids.max()) + 1
    size = torch.zeros(n_groups).index_add_(0, group_ids, torch.ones_like(scores))
    total = torch.zeros(n_groups).index_add_(0, group_ids, scores)
    mean = total / size
    sq_dev = torch.zeros(n_groups).index_add_(0, group_ids, (scores - mean[group_ids]) ** 2)
    std = torch.sqrt(sq_dev / (size - 1).clamp(min=1))
    return mean[group_ids], std[group_ids], size[group_ids]


def group_all_equal(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per row, whether every score of the row's group is equal. scores, group_ids: [B] -> [B] bool.

    Compared exactly (max == min), not through the float32 mean and std: those of equal non-binary scores
    are off by rounding (eight 0.3s have mean 0.30000001), which the std division turns into advantages
    of 0.03-0.15 where the group carries no signal at all."""
    n_groups = int(group_ids.max()) + 1
    high = torch.zeros(n_groups).scatter_reduce(0, group_ids, scores, "amax", include_self=False)
    low = torch.zeros(n_groups).scatter_reduce(0, group_ids, scores, "amin", include_self=False)
    return (high == low)[group_ids]


def group_mean(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The baseline of every row: the mean score of its group. [B] -> [B]."""
    return group_mean_std(scores, group_ids)[0]


def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, eps: float, scale: bool) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), or r - mean_group if not ``scale``. [B] -> [B].

    A group of one has no peers to compare with: its advantage is 0 (its own reward is its baseline).
    An all-equal group gets exactly 0 too; the arithmetic of every other group is left as it was, so runs on
    binary rewards (whose equal groups already came out 0) reproduce bit for bit.
    """
    mean, std, _ = group_mean_std(scores, group_ids)
    centred = scores - mean
    adv = centred / (std + eps) if scale else centred
    return torch.where(group_all_equal(scores, group_ids), torch.zeros_like(adv), adv)


@ESTIMATORS.register("grpo")
@gin.configurable("grpo")
@dataclass
class GRPO(Estimator):
    group_size: int = 8  # samples per prompt
    eps: float = 1e-6  # added to the group std, so an all-equal group gets advantage 0 rather than 0/0

    def advantages(self, batch, ctx) -> Credit:
        scores = batch.token_rewards.sum(-1)  # [B]: the task reward (minus k1 KL if it is in the reward)
        adv = grpo_advantages(scores, batch.group_ids, self.eps, scale=True)  # [B]
        baseline = group_mean(scores, batch.group_ids)  # [B]: V̂ of every state of the response
        return Credit(advantages=adv[:, None] * batch.response_mask, values=baseline[:, None] * batch.response_mask)


@ESTIMATORS.register("dr_grpo")
@gin.configurable("dr_grpo")
@dataclass
class DrGRPO(Estimator):
    """GRPO without the std division (which up-weights near-uniform groups) and with a constant loss
    normaliser instead of the per-response length (which favours long wrong answers)."""

    group_size: int = 8  # samples per prompt
    loss_agg: str = "seq-mean-token-sum-norm"  # the constant normaliser is part of the method

    def advantages(self, batch, ctx) -> Credit:
        scores = batch.token_rewards.sum(-1)  # [B]
        adv = grpo_advantages(scores, batch.group_ids, 0.0, scale=False)  # [B]
        baseline = group_mean(scores, batch.group_ids)  # [B]
        return Credit(advantages=adv[:, None] * batch.response_mask, values=baseline[:, None] * batch.response_mask)
