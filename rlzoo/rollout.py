"""The rollout batch: what the loop samples and every estimator reads.

Layout: one row per sampled response, prompt and response concatenated and right-padded, so every
per-token tensor is ``[B, L]`` and indexed by the *token it scores*: ``logprobs[b, i]`` is
log p(input_ids[b, i] | input_ids[b, :i]); ``values[b, i]`` is V(input_ids[b, :i]), the state the
token was sampled from; ``advantages[b, i]`` is the credit token i receives. Position 0 is never a
response token, so "the state before token i" always exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlzoo.tasks import Problem


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] long: prompt + response, right-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, L] long: 1 on prompt and response tokens, 0 on padding
    response_mask: torch.Tensor  # [B, L] float32: 1 on response tokens (the ones the policy trains on)
    token_rewards: torch.Tensor  # [B, L] float32: task reward on each response's last token (minus a per-token KL if the KL is in the reward)
    scores: torch.Tensor  # [B] float32: task reward of each response, in [0, 1]
    group_ids: torch.Tensor  # [B] long: index of the prompt the response answers (GRPO / RLOO groups)
    prompt_lens: torch.Tensor  # [B] long: prompt tokens at the start of each row
    step_starts: list[list[int]]  # per row: token positions where each reasoning step starts (the first is the prompt length)
    problems: list[Problem]  # [B]
    response_texts: list[str]  # [B]
    finish_reasons: list[str]  # [B] "stop" or "length"
    old_logprobs: torch.Tensor | None = None  # [B, L] float32, under the sampling policy (PPO core fills it)
    ref_logprobs: torch.Tensor | None = None  # [B, L] float32, under the frozen reference (if β > 0)
    extra: dict = field(default_factory=dict)  # estimator scratch space (e.g. MC values for logging)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def response_lens(self) -> torch.Tensor:  # [B] long
        return self.response_mask.sum(-1).long()

    def last_token_index(self) -> torch.Tensor:  # [B] long: position of each response's last token
        return self.prompt_lens + self.response_lens() - 1

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """Rows ``rows`` of the batch (a minibatch), tensors and lists alike."""
        idx = rows.tolist()
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return RolloutBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            token_rewards=self.token_rewards[rows],
            scores=self.scores[rows],
            group_ids=self.group_ids[rows],
            prompt_lens=self.prompt_lens[rows],
            step_starts=[self.step_starts[i] for i in idx],
            problems=[self.problems[i] for i in idx],
            response_texts=[self.response_texts[i] for i in idx],
            finish_reasons=[self.finish_reasons[i] for i in idx],
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
        )
