"""VinePPO (Kazemnejad et al. 2024): unbiased Monte-Carlo values from the current policy.

Split each response into reasoning steps with the task's splitter. From every step-boundary state
s_t (prompt + the first t steps) draw K continuations with the training sampler's settings;
V̂(s_t) = their mean reward. With reward only at the end and γ = 1, step t's advantage is
A_t = V̂(s_{t+1}) - V̂(s_t), with V̂(s_m) := R for the final step, and every token of step t gets A_t.
States past ``max_valued_steps`` take the final reward as their value (as the reference code does
for GSM8K), so their steps get advantage 0. Identical states (e.g. the prompt-only state shared by
all responses of a prompt) are valued once; MC rollouts are never trained on.

A continuation gets what is left of the response's budget: ``max_new_tokens`` minus the response tokens
already in its state (per-state budgets in one engine call), so an MC rollout ends where the response it
values would have been cut, and V̂(s_t) estimates the return of the very episodes being trained; it never
runs past the model's context. The reference code (treetune's ``EfficientIIDExpander._compute_max_tokens``)
gives every continuation min(max_tokens, context - state tokens) instead, i.e. up to a full response budget
more from a late state; ``vineppo.continuation_budget = "reference"`` does that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gin
import torch

from rlzoo.algorithms import ESTIMATORS, Credit, Estimator
from rlzoo.engine import context_length
from rlzoo.errors import UserError
from rlzoo.rollout import first_occurrences, step_advantages
from rlzoo.seeds import Salt, substream


def step_credit(batch, step_values: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages and values [B, L] from the values of each response's valued step-boundary states: every
    token of step t gets A_t = V̂(s_{t+1}) - V̂(s_t) and V̂(s_t); states past the valued ones (``max_valued_steps``)
    take the final reward as their value. 0 outside the response mask."""
    advantages = torch.zeros_like(batch.response_mask)  # [B, L]
    token_values = torch.zeros_like(batch.response_mask)  # [B, L]: V̂ of the step each token is in
    final = batch.token_rewards.sum(-1).tolist()  # [B]
    last = batch.last_token_index().tolist()  # [B]
    for b in range(batch.size):
        starts = batch.step_starts[b]
        vals = step_values[b] + [final[b]] * (len(starts) - len(step_values[b]))  # capped states: V = R
        ends = starts[1:] + [last[b] + 1]
        for start, end, a, v in zip(starts, ends, step_advantages(vals, final[b]), vals):
            advantages[b, start:end] = a
            token_values[b, start:end] = v
    return advantages * batch.response_mask, token_values * batch.response_mask


def mc_state_values(states, problems, prompt_lens, rewards, ctx, params) -> torch.Tensor:  # [N]
    """V̂(s) = the mean reward of ``params.n`` continuations from each open state; a finished response (``rewards[i]``
    set) is worth its reward, as every rollout from it returns it."""
    values = torch.tensor([r if r is not None else 0.0 for r in rewards], dtype=torch.float32)  # [N]
    open_ = [i for i, r in enumerate(rewards) if r is None]
    if open_:
        values[open_] = ctx.values_by_rollouts([states[i] for i in open_], [problems[i] for i in open_],
                                               [prompt_lens[i] for i in open_], params, purpose="mc")
    return values


@ESTIMATORS.register("vineppo")
@gin.configurable("vineppo")
@dataclass
class VinePPO(Estimator):
    group_size: int = 8  # samples per prompt (the paper: 8)
    k: int = 9  # MC continuations per state (the paper: 9)
    max_valued_steps: int = 100  # states after this many steps take the final reward as their value
    continuation_budget: str = "remaining"  # MC continuation length: "remaining" response budget, or "reference": min(max_new_tokens, context - state)
    uses_rollouts: bool = True
    ranges = {**Estimator.ranges, "k": ">= 1", "max_valued_steps": ">= 0"}
    report_options = ("k",)

    def mc_params(self, ctx):
        """The sampler of the MC continuations: the training one, K per state, its own noise (not the rollouts')."""
        return replace(ctx.sampling, n=self.k, seed=substream(ctx.sampling.seed, Salt.MC))

    def state_values(self, states, problems, prompt_lens, ctx, rewards) -> torch.Tensor:  # [N]
        """V̂(s) = mean reward of K continuations; a finished response is worth its reward (every rollout from it returns it)."""
        return mc_state_values(states, problems, prompt_lens, rewards, ctx, self.mc_params(ctx))

    def __post_init__(self):
        super().__post_init__()
        if self.continuation_budget not in ("remaining", "reference"):
            raise UserError(f"vineppo.continuation_budget = {self.continuation_budget!r}; expected 'remaining' or 'reference'")

    def advantages(self, batch, ctx) -> Credit:
        # One state per valued step boundary of every response: (row, step index, token position).
        states, problems, prompt_lens, where = [], [], [], []
        for b in range(batch.size):
            for t, position in enumerate(batch.step_starts[b][: self.max_valued_steps]):
                states.append(batch.input_ids[b, :position].tolist())
                problems.append(batch.problems[b])
                prompt_lens.append(int(batch.prompt_lens[b]))
                where.append((b, t))
        mc_params = self.mc_params(ctx)
        budgets = None  # what is left of each response's budget (values_by_rollouts' default)
        if self.continuation_budget == "reference":
            context = context_length(ctx.policy) if ctx.policy is not None else None
            budgets = [min(mc_params.max_new_tokens, context - len(s)) if context else mc_params.max_new_tokens for s in states]
        values = ctx.values_by_rollouts(states, problems, prompt_lens, mc_params, purpose="mc", budgets=budgets).tolist()  # [N]

        step_values: list[list[float]] = [[] for _ in range(batch.size)]
        for (b, t), v in zip(where, values):
            step_values[b].append(v)
        advantages, token_values = step_credit(batch, step_values)
        return Credit(advantages=advantages, values=token_values,
                      stats={"mc_states": len(states), "mc_unique_states": len(first_occurrences(states)),
                             "mc_value_mean": sum(values) / max(len(values), 1)})
