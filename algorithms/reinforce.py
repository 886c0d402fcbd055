"""Small baselines that prove the registry: REINFORCE (no baseline), ReMax (greedy-rollout baseline)
and REINFORCE++ (token-level returns, batch-normalised)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import gin
import torch

from rlzoo.algorithms import ESTIMATORS, Credit, Estimator
from rlzoo.ppo import masked_mean, masked_whiten


@ESTIMATORS.register("reinforce")
@gin.configurable("reinforce")
@dataclass
class Reinforce(Estimator):
    group_size: int = 8  # samples per prompt (8 for every method, as in the paper)

    def advantages(self, batch, ctx) -> Credit:
        # No baseline: V̂ = 0 for every state.
        return Credit(advantages=batch.token_rewards.sum(-1)[:, None] * batch.response_mask, values=torch.zeros_like(batch.response_mask))


@ESTIMATORS.register("remax")
@gin.configurable("remax")
@dataclass
class ReMax(Estimator):
    """Li et al. 2023: the baseline is the reward of the greedy response to the same prompt."""

    group_size: int = 8  # samples per prompt (8 for every method, as in the paper)
    uses_rollouts: bool = True

    def advantages(self, batch, ctx) -> Credit:
        prompts = [batch.input_ids[b, : batch.prompt_lens[b]].tolist() for b in range(batch.size)]
        greedy = replace(ctx.sampling, n=1, temperature=0.0)
        baseline = ctx.values_by_rollouts(prompts, batch.problems, batch.prompt_lens.tolist(), greedy, purpose="baseline")
        adv = batch.token_rewards.sum(-1) - baseline  # [B]
        return Credit(advantages=adv[:, None] * batch.response_mask, values=baseline[:, None] * batch.response_mask,
                      stats={"baseline_mean": baseline.mean().item()})


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted sum of the rewards from each token to the end of its response. [B, L] -> [B, L]."""
    r = token_rewards * mask
    return (r.flip(-1).cumsum(-1).flip(-1)) * mask


@ESTIMATORS.register("reinforce_pp")
@gin.configurable("reinforce_pp")
@dataclass
class ReinforcePP(Estimator):
    """Hu 2025: token-level returns (the k1 KL in the reward makes them differ per token), whitened
    over the whole batch instead of per prompt."""

    group_size: int = 8  # samples per prompt (8 for every method, as in the paper)

    def advantages(self, batch, ctx) -> Credit:
        returns = returns_to_go(batch.token_rewards, batch.response_mask)  # [B, L]
        # Whitening subtracts the batch's mean return: that mean is the baseline, V̂ of every state.
        baseline = masked_mean(returns, batch.response_mask)
        return Credit(advantages=masked_whiten(returns, batch.response_mask), returns=returns,
                      values=baseline * batch.response_mask)
