"""SPO-chain (Guo et al. 2025, "Segment Policy Optimization", arXiv 2505.23564): Monte-Carlo credit per segment,
where segments are cut at the tokens the policy was unsure of.

1. Cutpoints: response tokens whose probability under the sampling policy is below ``prob_threshold`` (0.9).
2. Segments: a boundary before every ``cutpoint_interval``-th cutpoint, starting with the first (the paper's
   "int5": 5 cutpoints per segment); segment k runs from boundary k to boundary k + 1, the last to the end.
3. Values: V̂(boundary state) = mean reward of ``k`` continuations (``ctx.values_by_rollouts``, as VinePPO);
   the state after the last token is worth the reward R.
4. Segment advantage A_k = V̂(s_{k+1}) - V̂(s_k) on every token of segment k; tokens before the first boundary
   (all confident, p >= threshold) get 0, as in the reference code.
5. Probability mask (the paper's default for the chain form, ``use_prob_mask``): only the cutpoint tokens
   (p < threshold) are trained on: ``Credit.loss_mask`` restricts the policy loss, KL term, its normaliser and
   the advantage whitening to them, as the reference restricts its action mask. A response without a cutpoint
   trains on nothing.

Token probabilities are ``batch.old_logprobs`` (the loop's log-probs under the sampling policy, at the sampling
temperature) when present, else computed here with ``ctx.policy`` at the same temperature.
``Credit.values``: tokens of segment k carry V̂(s_k) (those before the first boundary V̂(s_0): the policy passes
them with probability >= 0.9 each); a response without a cutpoint carries R.

Simplifies relative to the paper and its code (AIFrameResearch/SPO): the threshold and interval are fixed per run
(no schedule); boundaries sit before the low-probability token (the reference's ``cutpoint - 1``) and identical
states are valued once; the number of valued boundaries per response is capped by ``max_segments`` (the
reference values all; extra boundaries beyond the cap are merged into the last segment).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gin
import torch

from rlzoo.algorithms import ESTIMATORS, Credit, Estimator
from rlzoo.algorithms.vineppo import mc_state_values
from rlzoo.rollout import first_occurrences
from rlzoo.seeds import Salt, substream


def sampling_logprobs(batch, ctx) -> torch.Tensor:
    """Log-prob of each token under the sampling policy [B, L]: the batch's if the loop filled them, else the policy's."""
    if batch.old_logprobs is not None:
        return batch.old_logprobs.float().cpu()
    from rlzoo.ppo import batched_logprobs

    return batched_logprobs(ctx.policy, batch.input_ids.to(ctx.device), batch.attention_mask.to(ctx.device),
                            ctx.sampling.temperature, 64).float().cpu()


def segment_boundaries(low_prob: list[int], interval: int, max_segments: int) -> list[int]:
    """Token positions where segments start: every ``interval``-th low-probability position from the first,
    at most ``max_segments`` of them."""
    return low_prob[::interval][:max_segments]


@ESTIMATORS.register("spo_chain")
@gin.configurable("spo_chain")
@dataclass
class SPOChain(Estimator):
    group_size: int = 8  # samples per prompt (the paper follows VinePPO: 8)
    k: int = 9  # MC continuations per segment boundary (the paper: 9)
    prob_threshold: float = 0.9  # a token with probability below this is a cutpoint (the paper: 0.9)
    cutpoint_interval: int = 5  # cutpoints per segment (the paper's GSM8K setting "int5")
    max_segments: int = 100  # boundaries valued per response at most
    prob_mask: bool = True  # train only on cutpoint tokens (the paper's probability mask)
    uses_rollouts: bool = True
    ranges = {**Estimator.ranges, "k": ">= 1", "prob_threshold": "in (0, 1]", "cutpoint_interval": ">= 1",
              "max_segments": ">= 1"}
    report_options = ("k", "cutpoint_interval")

    def mc_params(self, ctx):
        """The sampler of the MC continuations: the training one, K per state, its own noise (not the rollouts')."""
        return replace(ctx.sampling, n=self.k, seed=substream(ctx.sampling.seed, Salt.MC))

    def state_values(self, states, problems, prompt_lens, ctx, rewards) -> torch.Tensor:  # [N]
        """V̂(s) = mean reward of K continuations, as at a segment boundary (any state can start a segment); a
        finished response is worth its reward."""
        return mc_state_values(states, problems, prompt_lens, rewards, ctx, self.mc_params(ctx))

    def advantages(self, batch, ctx) -> Credit:
        low = (sampling_logprobs(batch, ctx).exp() < self.prob_threshold) & (batch.response_mask > 0)  # [B, L] cutpoints
        bounds = [segment_boundaries(low[b].nonzero().squeeze(-1).tolist(), self.cutpoint_interval, self.max_segments)
                  for b in range(batch.size)]
        states, problems, prompt_lens = [], [], []
        for b in range(batch.size):
            for position in bounds[b]:
                states.append(batch.input_ids[b, :position].tolist())
                problems.append(batch.problems[b])
                prompt_lens.append(int(batch.prompt_lens[b]))
        values = ctx.values_by_rollouts(states, problems, prompt_lens, self.mc_params(ctx), purpose="mc").tolist() if states else []

        advantages = torch.zeros_like(batch.response_mask)  # [B, L]
        token_values = torch.zeros_like(batch.response_mask)  # [B, L]: V̂ of the segment each token is in
        final = batch.token_rewards.sum(-1).tolist()  # [B]
        last = batch.last_token_index().tolist()  # [B]
        i = 0
        for b in range(batch.size):
            start, end = int(batch.prompt_lens[b]), last[b] + 1
            vals = values[i : i + len(bounds[b])]
            i += len(bounds[b])
            if not vals:
                token_values[b, start:end] = final[b]
                continue
            token_values[b, start : bounds[b][0]] = vals[0]
            for s, e, v, nxt in zip(bounds[b], bounds[b][1:] + [end], vals, vals[1:] + [final[b]]):
                advantages[b, s:e] = nxt - v
                token_values[b, s:e] = v
        loss_mask = low.float() if self.prob_mask else None
        advantages *= batch.response_mask if loss_mask is None else loss_mask
        n_low = low.sum().item()
        return Credit(advantages=advantages, values=token_values * batch.response_mask, loss_mask=loss_mask,
                      stats={"mc_states": len(states), "mc_unique_states": len(first_occurrences(states)),
                             "segments_mean": len(states) / max(batch.size, 1),
                             "cutpoint_frac": n_low / max(batch.response_mask.sum().item(), 1)})
