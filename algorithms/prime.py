"""PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards", arXiv 2502.01456): dense process
rewards from an implicit PRM trained online on outcome labels only.

The implicit PRM π_φ is a causal LM initialised from the policy checkpoint; π_ref is a frozen copy of that
checkpoint. Token t's process reward is r_t = β·log(π_φ(y_t | y_<t) / π_ref(y_t | y_<t)); the PRM's prediction that
a response is correct is sigmoid(β Σ_t log-ratio), trained by cross-entropy against the task reward (the outcome
label) on each iteration's rollouts (``update_critic``). Advantages combine the two sources with RLOO, as the paper:

    A_t^i = Σ_{s>=t} [r_s^i - mean_{j != i} r̄^j]  +  [R^i - mean_{j != i} R^j]

where r̄^j is response j's mean process reward per token (verl's ``masked_rloo``: the per-token baseline is the
other responses' mean token reward; our baseline is the exact leave-one-out one, verl's subtracts r_t itself
from the group sum instead), R the outcome reward, both within the prompt's group; the
process part is summed from t to the end (γ = 1). ``process_coef`` / ``outcome_coef`` weigh the two (verl: 5 / 5;
only their ratio matters after the loop's whitening). A group needs two samples at least (leave-one-out).

``Credit.values``: V̂(state before token t) = sigmoid(β Σ_{s<t} log-ratio), the implicit PRM's probability of
success from that prefix (its implicit Q of the last token taken; 0.5 at the prompt, where the sum is empty). The
same of any prefix is ``state_values`` (the credit audit ranks alternative next steps by it). Its credit is what it
learned (``learned``): the audit loads the PRM of a run's checkpoint (``prm/``) with π_ref = the model the run started
from (``load_learned``), or trains one by ``rlzoo train`` with the policy frozen.

Simplifies relative to the paper / verl recipe: no prompt filtering by accuracy (the paper keeps prompts with
0.2 <= accuracy <= 0.8); the PRM is updated *after* the advantages of the iteration are taken (verl's
``update: after``; the paper's default updates before scoring), one CE pass per batch; the PRM and its reference
score at temperature 1; no oversampling. The loop meters the frozen reference's forwards in the FLOPs of
``advantages`` beside the PRM's (every model an estimator holds counts); the audit's compute counts the PRM only
(``estimator.critic``: π_ref costs as much again).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gin
import torch
import torch.nn.functional as F

from rlzoo import distributed, runs
from rlzoo.algorithms import ESTIMATORS, Credit, Estimator
from rlzoo.algorithms.rloo import leave_one_out_mean, rloo_advantages
from rlzoo.errors import UserError
from rlzoo.ppo import batched_logprobs, forward_logprobs, minibatch_indices
from rlzoo.seeds import Salt, derive_seed


def prime_advantages(process_rewards: torch.Tensor, outcome: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor,
                     process_coef: float = 1.0, outcome_coef: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PRIME's RLOO combination. process_rewards, mask: [B, L] (rewards 0 off the mask); outcome, group_ids: [B].
    Returns advantages [B, L] (0 off the mask) and the process returns [B, L]."""
    per_token = (process_rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]: r̄^i
    baseline = leave_one_out_mean(per_token, group_ids)  # [B]: mean_{j != i} r̄^j
    shaped = (process_rewards - baseline[:, None]) * mask  # [B, L]
    process_returns = shaped.flip(-1).cumsum(-1).flip(-1) * mask  # [B, L]: summed from t to the end
    outcome_adv = rloo_advantages(outcome, group_ids)  # [B]
    return (process_coef * process_returns + outcome_coef * outcome_adv[:, None]) * mask, process_returns


@ESTIMATORS.register("prime")
@gin.configurable("prime")
@dataclass
class PRIME(Estimator):
    group_size: int = 4  # samples per prompt (the paper: 4); at least 2 for the leave-one-out baselines
    beta: float = 0.05  # β of the implicit reward β·log(π_φ/π_ref) (the paper: 0.05)
    prm_lr: float = 1e-6  # AdamW learning rate of the implicit PRM (the paper: 1e-6)
    prm_epochs: int = 1  # CE passes over each batch
    prm_minibatches: int = 1  # PRM optimizer steps per epoch
    micro_batch_size: int = 64  # rows per PRM forward/backward
    max_grad_norm: float = 10.0  # PRM gradient clipping (verl's PRIME recipe: 10)
    process_coef: float = 1.0  # weight of the implicit process-reward advantages
    outcome_coef: float = 1.0  # weight of the outcome-reward (RLOO) advantages
    ranges = {**Estimator.ranges, "group_size": ">= 2", "beta": "> 0", "prm_lr": ">= 0", "prm_epochs": ">= 1",
              "prm_minibatches": ">= 1", "micro_batch_size": ">= 1", "max_grad_norm": "> 0", "process_coef": ">= 0",
              "outcome_coef": ">= 0"}
    learned = True  # its credit is its implicit PRM, learned in training: an audit loads it (load_learned)
    reference = None  # π_ref, frozen (setup / load_learned)

    def setup(self, ctx) -> None:
        self.critic = _load_lm(ctx.model_path, ctx.device)
        # π_ref: the same checkpoint, frozen; held outside ``critic`` so it is neither trained nor checkpointed.
        self.reference = _load_lm(ctx.model_path, ctx.device).eval().requires_grad_(False)
        self.trainer = ctx.prepare("prm", self.critic, lr=self.prm_lr, betas=(0.9, 0.999),
                                   max_grad_norm=self.max_grad_norm, micro_batch_size=self.micro_batch_size)

    def _logprobs(self, model, batch, device) -> torch.Tensor:  # [B, L], each rank its rows
        ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
        return distributed.gather_rows(lambda rows: batched_logprobs(model, ids[rows.start : rows.stop], attn[rows.start : rows.stop],
                                                                     1.0, self.micro_batch_size), batch.size).float().cpu()

    def load_learned(self, checkpoint: Path, ctx) -> None:
        """The PRM of a checkpoint of a prime run (``prm/``, as the loop saves it) and its π_ref: the model the run
        started from (run.json's "model"), or, for a checkpoint outside a run folder, the checkpoint's own policy."""
        from rlzoo.policy import default_policy_path

        checkpoint = Path(checkpoint)
        if not (checkpoint / "prm" / "config.json").is_file():
            raise UserError(f"{checkpoint} holds no prm/ (DeepSpeed runs save prm.zero/, which cannot be read outside "
                            "training); give a prime run trained without --deepspeed")
        start = runs.read_run(checkpoint.parent.parent).get("model")
        reference = str(default_policy_path()) if start == "default" else start or str(checkpoint / "policy")
        self.critic = _load_lm(str(checkpoint / "prm"), ctx.device).eval()
        try:
            self.reference = _load_lm(reference, ctx.device).eval().requires_grad_(False)
        except (OSError, ValueError) as e:  # a run started from a relative path elsewhere, a hub id offline
            raise UserError(f"cannot load π_ref of {checkpoint}, the model its run started from ({reference!r}): "
                            f"{str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def state_values(self, states, problems, prompt_lens, ctx, rewards) -> torch.Tensor:  # [N]
        """The implicit PRM's V̂ of each state, as in ``Credit.values``: sigmoid(β Σ log π_φ/π_ref) over the state's
        response tokens (its implicit Q of the last token taken; 0.5 for the prompt alone). A finished response is
        valued by its whole sum, the PRM's prediction of its outcome (its reward is not looked at)."""
        out = []
        for i in range(0, len(states), self.micro_batch_size):
            part = states[i : i + self.micro_batch_size]
            ids = torch.zeros(len(part), max(map(len, part)), dtype=torch.long)  # [b, W] right-padded
            attn, response = torch.zeros_like(ids), torch.zeros(ids.shape)  # [b, W]; response tokens of each state
            for j, (s, n) in enumerate(zip(part, prompt_lens[i : i + len(part)])):
                ids[j, : len(s)], attn[j, : len(s)], response[j, n : len(s)] = torch.tensor(s), 1, 1.0
            ids, attn = ids.to(ctx.device), attn.to(ctx.device)
            log_ratio = (batched_logprobs(self.critic, ids, attn, 1.0, self.micro_batch_size)
                         - batched_logprobs(self.reference, ids, attn, 1.0, self.micro_batch_size)).float().cpu()  # [b, W]
            out.append(torch.sigmoid(self.beta * (log_ratio * response).sum(-1)))
        return torch.cat(out) if out else torch.zeros(0)

    def advantages(self, batch, ctx) -> Credit:
        if self.reference is None:
            raise RuntimeError("prime credits with its implicit PRM: call setup(ctx) (training) or load_learned (an audit) first")
        mask = batch.response_mask
        ref = self._logprobs(self.reference, batch, ctx.device)  # [B, L]
        batch.extra["prime_ref_logprobs"] = ref  # the PRM's update reuses them
        log_ratio = (self._logprobs(self.critic, batch, ctx.device) - ref) * mask  # [B, L]
        process_rewards = self.beta * log_ratio  # [B, L]
        outcome = batch.token_rewards.sum(-1)  # [B]
        advantages, process_returns = prime_advantages(process_rewards, outcome, mask, batch.group_ids,
                                                       self.process_coef, self.outcome_coef)
        prefix = torch.cumsum(process_rewards, -1) - process_rewards  # [B, L]: β Σ_{s<t} log-ratio
        values = torch.sigmoid(prefix) * mask
        predicted = process_rewards.sum(-1)  # [B]: the PRM's logit of "correct"
        return Credit(advantages=advantages, values=values,
                      stats={"process_reward_mean": (process_rewards.sum() / mask.sum().clamp(min=1)).item(),
                             "process_return_std": process_returns[mask > 0].std().item() if mask.sum() > 1 else 0.0,
                             "prm_accuracy": ((predicted > 0).float() == (batch.scores > 0.5).float()).float().mean().item()})

    def update_critic(self, batch, credit, ctx) -> dict[str, float]:
        """CE of sigmoid(β Σ_t log-ratio) against the outcome label, mean over each global minibatch's responses."""
        self.trainer.train()
        ref = batch.extra.get("prime_ref_logprobs")
        if ref is None:
            ref = self._logprobs(self.reference, batch, ctx.device)
        generator = torch.Generator().manual_seed(derive_seed(ctx.seed, ctx.iteration, Salt.PRM_MINIBATCHES))
        device, losses = ctx.device, []
        for rows in minibatch_indices(batch.size, self.prm_epochs, self.prm_minibatches, generator):
            micro_batches = distributed.split_rows(rows).split(self.micro_batch_size)
            total = 0.0
            for i, micro in enumerate(micro_batches):
                with self.trainer.accumulating(last=i == len(micro_batches) - 1):
                    mask = batch.response_mask[micro].to(device)
                    logprobs, _ = forward_logprobs(self.trainer, batch.input_ids[micro].to(device), batch.attention_mask[micro].to(device))
                    logit = self.beta * ((logprobs - ref[micro].to(device)) * mask).sum(-1)  # [b]
                    labels = batch.scores[micro].to(device)
                    loss = F.binary_cross_entropy_with_logits(logit, labels, reduction="sum") / len(rows)
                    total += loss.item()
                    if i == len(micro_batches) - 1:
                        (total,) = distributed.all_reduce([total])
                        if not torch.isfinite(torch.tensor(total)):
                            raise FloatingPointError(f"non-finite PRM loss ({total}): lower prime.prm_lr")
                    self.trainer.backward(loss)
            self.trainer.step()
            losses.append(total)
        return {"critic/loss": sum(losses) / max(len(losses), 1)}


def _load_lm(path: str, device) -> torch.nn.Module:
    """A causal LM from a folder or hub id, dropout off (the PRM and π_ref score, they do not sample)."""
    from transformers import AutoModelForCausalLM

    from rlzoo.policy import disable_dropout

    return disable_dropout(AutoModelForCausalLM.from_pretrained(path)).to(device)
