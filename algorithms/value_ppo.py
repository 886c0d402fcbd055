"""PPO with a value network (Schulman et al. 2017; Ouyang et al. 2022): a critic with the policy's
architecture, initialised from the same checkpoint plus a scalar head, and GAE(γ, λ) advantages.
The VinePPO paper's baseline: λ = γ = 1, value clipping 0.2."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gin
import torch
from torch import nn

from rlzoo import distributed
from rlzoo.algorithms import ESTIMATORS, Credit, Estimator
from rlzoo.errors import UserError
from rlzoo.ppo import (PPOConfig, forward_rows, masked_mean, micro_batch_rows, minibatch_indices, model_inputs, plan_rows, row_lengths,
                       training_forward, value_loss)
from rlzoo.seeds import Salt, derive_seed


class ValueModel(nn.Module):
    """The policy's transformer body (``AutoModel``: no LM head) and a scalar head.
    forward -> values [B, L] aligned with tokens: values[:, i] = V(input_ids[:, :i])."""

    def __init__(self, model_path: str):
        super().__init__()
        from transformers import AutoModel

        from rlzoo.policy import disable_dropout

        # Off as in the policy: values taken at rollout time (eval mode) and regressed in the update (train mode) are one function.
        self.body = disable_dropout(AutoModel.from_pretrained(model_path))
        self.head = nn.Linear(self.body.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # V = 0 everywhere at the start: the critic learns its scale
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None):
        """``position_ids`` and ``cache``: the rows continue sequences whose earlier keys and values the cache holds."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           **model_inputs(self.body, position_ids, cache)).last_hidden_state  # [B, L, H]
        v = self.head(hidden.float()).squeeze(-1)  # [B, L]: value of the prefix ending at each token
        return nn.functional.pad(v[:, :-1], (1, 0))  # shift: the state *before* token i


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each row's response tokens (contiguous in ``mask``).
    token_rewards, values, mask: [B, L]. Returns advantages, returns: [B, L], 0 outside the mask.
    The value after a response's last token is 0 (the episode ends)."""
    B, L = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B)
    running = torch.zeros(B)
    for t in reversed(range(L)):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = m * (delta + gamma * lam * running)
        advantages[:, t] = running
        next_value = m * values[:, t]
    return advantages, (advantages + values) * mask


@ESTIMATORS.register("ppo")
@gin.configurable("value_ppo")
@dataclass
class ValuePPO(Estimator):
    group_size: int = 8  # samples per prompt (the paper samples 8 per prompt for every method)
    gamma: float = 1.0  # discount
    lam: float = 1.0  # GAE λ
    value_clip: float = 0.2  # new values stay within ± this of the values at rollout time
    critic_lr: float = 1e-4  # AdamW learning rate of the critic
    critic_lr_schedule: str = "constant"  # "constant", or "policy": the policy's warm-up and decay, step for step (the reference's; needs the policy's optimizer steps per iteration)
    critic_betas: tuple = (0.9, 0.95)  # AdamW betas of the critic
    critic_epochs: int = 2  # passes over each batch for the critic
    critic_minibatches: int = 4  # critic optimizer steps per epoch
    micro_batch_size: int = 64  # rows per critic forward/backward
    max_grad_norm: float = 1.0  # critic gradient clipping
    ranges = {**Estimator.ranges, "gamma": "in [0, 1]", "lam": "in [0, 1]", "value_clip": "> 0", "critic_lr": ">= 0",
              "critic_epochs": ">= 1", "critic_minibatches": ">= 1", "micro_batch_size": ">= 1", "max_grad_norm": "> 0"}
    learned = True  # its credit is its critic, learned in training

    def __post_init__(self):
        super().__post_init__()
        if self.critic_lr_schedule not in ("constant", "policy"):
            raise UserError(f"value_ppo.critic_lr_schedule = {self.critic_lr_schedule!r}; expected 'constant' or 'policy'")

    def setup(self, ctx) -> None:
        world = distributed.world_size()
        if world > 1 and ctx.batch_rows % (self.critic_minibatches * world):  # every rank must run as many micro-batches
            raise UserError(f"value_ppo.critic_minibatches = {self.critic_minibatches} does not split the {ctx.batch_rows} rows "
                            f"of an iteration evenly over {world} processes; pick a divisor of {ctx.batch_rows // world}")
        schedule = None
        if self.critic_lr_schedule == "policy":  # the policy's lr_lambda counts the policy's optimizer steps
            ppo_cfg = PPOConfig()
            if (self.critic_epochs, self.critic_minibatches) != (ppo_cfg.epochs, ppo_cfg.minibatches):
                raise UserError(f"value_ppo.critic_lr_schedule = 'policy' needs the critic to take the policy's optimizer steps: "
                                f"value_ppo.critic_epochs x critic_minibatches = {self.critic_epochs} x {self.critic_minibatches}, "
                                f"ppo.epochs x minibatches = {ppo_cfg.epochs} x {ppo_cfg.minibatches}")
            schedule = ctx.trained["policy"].lr_lambda
        self.critic = ValueModel(ctx.model_path).to(ctx.device)
        self.trainer = ctx.prepare("critic", self.critic, lr=self.critic_lr, betas=tuple(self.critic_betas),
                                   max_grad_norm=self.max_grad_norm, micro_batch_size=self.micro_batch_size,
                                   lr_lambda=schedule)

    @torch.no_grad()
    def predict(self, input_ids, attention_mask, prompt_lens: torch.Tensor | None = None) -> torch.Tensor:  # [B, L]
        """Values of every row, each rank predicting its part of the rows; ``prompt_lens`` [B]: each distinct
        prompt run once (``ppo.plan_rows``)."""
        self.critic.eval()

        def part(rows: range) -> torch.Tensor:
            ids, attn = input_ids[rows.start : rows.stop], attention_mask[rows.start : rows.stop]
            out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)  # [b, L], 0 off the rows' own positions (never read)
            plan = plan_rows(ids, attn, self.micro_batch_size, None if prompt_lens is None else prompt_lens[rows.start : rows.stop])
            values = forward_rows(self.critic, lambda i, m, cache: self.critic(i, m, None, cache), ids, attn, plan)  # [b, W]
            if values is not None:
                out[:, : values.shape[1]] = values.float()
            return out

        return distributed.gather_rows(part, input_ids.shape[0])

    def advantages(self, batch, ctx) -> Credit:
        mask = batch.response_mask
        values = self.predict(batch.input_ids.to(ctx.device), batch.attention_mask.to(ctx.device),
                              batch.prompt_lens if ctx.share_prompts else None) * mask  # [B, L]
        advantages, returns = gae(batch.token_rewards, values, mask, self.gamma, self.lam)
        residual_var = masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask)
        returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        explained_variance = 1.0 - (residual_var / returns_var.clamp(min=1e-8)).item()
        return Credit(advantages=advantages, returns=returns, values=values,
                      stats={"explained_variance": explained_variance, "value_mean": masked_mean(values, mask).item()})

    def load_learned(self, checkpoint: Path, ctx) -> None:
        """The critic of a checkpoint of a ppo run: the checkpoint's policy body and the scalar head, as trained."""
        from safetensors.torch import load_file

        if not (checkpoint / "critic.safetensors").is_file():
            raise UserError(f"{checkpoint} holds no critic.safetensors (DeepSpeed runs save critic.zero/, which cannot be "
                            "read outside training); give a ppo run trained without --deepspeed")
        critic = ValueModel(str(checkpoint / "policy"))
        critic.load_state_dict(load_file(str(checkpoint / "critic.safetensors")))
        self.critic = critic.to(ctx.device).eval()

    @torch.no_grad()
    def state_values(self, states, problems, prompt_lens, ctx, rewards) -> torch.Tensor:  # [N]
        """The critic's V̂ of each state: its value at position len(state), the state before the token that would
        follow (as it is trained). A finished response is valued just before its final token, where the critic is
        trained to predict the reward (as the reference code asks the critic at the end of a step's text)."""
        states = [s[:-1] if r is not None else s for s, r in zip(states, rewards)]
        self.critic.eval()
        out = []
        for i in range(0, len(states), self.micro_batch_size):
            part = states[i : i + self.micro_batch_size]
            lengths = torch.tensor([len(s) for s in part])  # [b]
            ids = torch.zeros(len(part), int(lengths.max()) + 1, dtype=torch.long)  # [b, W + 1]: one slot past the longest
            mask = torch.zeros_like(ids)  # [b, W + 1]
            for j, s in enumerate(part):
                ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
            values = self.critic(ids.to(ctx.device), mask.to(ctx.device)).float().cpu()  # [b, W + 1]: values[:, n] = V(ids[:, :n])
            out.append(values[torch.arange(len(part)), lengths])
        return torch.cat(out) if out else torch.zeros(0)

    def update_critic(self, batch, credit, ctx) -> dict[str, float]:
        """Clipped value loss, token-mean over each global minibatch; each rank runs its rows of it."""
        self.trainer.train()
        # The iteration strides by 7 here, not derive_seed's 10_007: the seed this critic has always drawn with.
        generator = torch.Generator().manual_seed(derive_seed(ctx.seed, 0, Salt.CRITIC_MINIBATCHES + 7 * ctx.iteration))
        device, losses = ctx.device, []
        lengths = row_lengths(batch.attention_mask)  # [B]
        prefill = lambda i, m, cache: self.trainer(i, m, None, cache)  # noqa: E731
        for rows in minibatch_indices(batch.size, self.critic_epochs, self.critic_minibatches, generator):
            n_tokens = batch.response_mask[rows].sum().clamp(min=1).to(device)  # of the global minibatch
            micro_batches = micro_batch_rows(distributed.split_rows(rows), batch.group_ids, self.micro_batch_size)
            total = nonfinite = 0.0
            for i, micro in enumerate(micro_batches):
                width = max(int(lengths[micro].max()), 1)  # the columns after the longest row are padding
                with self.trainer.accumulating(last=i == len(micro_batches) - 1):
                    mask = batch.response_mask[micro, :width].to(device)
                    values, _ = training_forward(self.trainer, self.trainer, prefill, batch.input_ids[micro, :width].to(device),
                                                 batch.attention_mask[micro, :width].to(device),
                                                 batch.prompt_lens[micro] if ctx.share_prompts else None)
                    per_token = value_loss(values, credit.values[micro, :width].to(device), credit.returns[micro, :width].to(device),
                                           mask, self.value_clip)
                    loss = (per_token * mask).sum() / n_tokens
                    total, nonfinite = total + loss.item(), nonfinite + float(not torch.isfinite(loss))
                    if i == len(micro_batches) - 1:  # all ranks decide alike
                        total, nonfinite = distributed.all_reduce([total, nonfinite])
                        if nonfinite:
                            raise FloatingPointError(f"non-finite critic loss ({total}): lower value_ppo.critic_lr")
                    self.trainer.backward(loss)
            self.trainer.step()
            losses.append(total)
        return {"critic/loss": sum(losses) / max(len(losses), 1)}
