"""RLOO (Ahmadian et al. 2024): each response's baseline is the mean reward of the *other* samples
of its prompt, an unbiased baseline; every token gets the response's advantage."""

from __future__ import annotations

from dataclasses import dataclass

import gin
import torch

from rlzoo.algorithms import ESTIMATORS, Credit, Estimator
from rlzoo.algorithms.grpo import group_all_equal, group_mean_std


def leave_one_out_mean(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The baseline of every row: the mean score of the *other* rows of its group; a row alone is its own
    baseline (advantage 0). [B] -> [B]."""
    mean, _, size = group_mean_std(scores, group_ids)
    return torch.where(size > 1, (mean * size - scores) / (size - 1).clamp(min=1), scores)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """r_i - mean_{j != i} r_j within each group; 0 for a group of one and exactly 0 for an all-equal group
    (whose float32 leave-one-out mean of non-binary rewards is off by rounding). [B] -> [B]."""
    _, _, size = group_mean_std(scores, group_ids)
    no_signal = (size == 1) | group_all_equal(scores, group_ids)
    return torch.where(no_signal, torch.zeros_like(scores), scores - leave_one_out_mean(scores, group_ids))


@ESTIMATORS.register("rloo")
@gin.configurable("rloo")
@dataclass
class RLOO(Estimator):
    group_size: int = 8  # samples per prompt (k in the paper)

    def advantages(self, batch, ctx) -> Credit:
        scores = batch.token_rewards.sum(-1)  # [B]
        adv = rloo_advantages(scores, batch.group_ids)  # [B]
        baseline = leave_one_out_mean(scores, batch.group_ids)  # [B]: V̂ of every state of the response
        return Credit(advantages=adv[:, None] * batch.response_mask, values=baseline[:, None] * batch.response_mask)
