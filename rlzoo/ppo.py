"""The PPO core: log-probs, losses, aggregation and the update epochs. Strategy-agnostic: it takes
per-token advantages from whichever estimator ran, and never asks which one.

Every per-token tensor is ``[B, L]`` aligned with the token it scores (see ``rlzoo.rollout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import gin
import torch
import torch.nn.functional as F

from rlzoo import distributed

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_MODES = ("k3-loss", "k1-reward", "none")


@gin.configurable("ppo")
@dataclass
class PPOConfig:
    clip_eps: float = 0.2  # ratio clip ε of the surrogate
    kl_coef: float = 1e-4  # β: weight of the KL to the frozen reference (0 disables the reference model)
    kl_mode: str = "k3-loss"  # "k3-loss" (k3 estimator in the loss), "k1-reward" (k1 subtracted from the reward), "none"
    kl_clamp: float = 10.0  # each token's k3 term is clamped to [-kl_clamp, kl_clamp], as the VinePPO reference does
    loss_agg: str = "token-mean"  # one of AGGREGATIONS
    loss_norm_tokens: int = 0  # constant per-sequence normaliser for seq-mean-token-sum-norm (0 = max_new_tokens)
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch's response tokens
    epochs: int = 2  # passes over each rollout batch
    minibatches: int = 4  # optimizer steps per epoch (the batch is split into this many minibatches)
    micro_batch_size: int = 64  # rows per forward/backward (gradient accumulation inside a minibatch)
    max_grad_norm: float = 1.0  # gradient clipping
    ratio_skip_threshold: float = 5.0  # a minibatch whose mean ratio exceeds this (or 1/this) is skipped and counted

    def __post_init__(self):
        from rlzoo.errors import UserError, check_ranges

        if self.loss_agg not in AGGREGATIONS:
            raise UserError(f"ppo.loss_agg = {self.loss_agg!r}; expected one of {', '.join(AGGREGATIONS)}")
        if self.kl_mode not in KL_MODES:
            raise UserError(f"ppo.kl_mode = {self.kl_mode!r}; expected one of {', '.join(KL_MODES)}")
        check_ranges(self, {"clip_eps": "> 0", "kl_coef": ">= 0", "kl_clamp": "> 0", "loss_norm_tokens": ">= 0", "epochs": ">= 1",
                            "minibatches": ">= 1", "micro_batch_size": ">= 1", "max_grad_norm": "> 0",
                            "ratio_skip_threshold": ">= 1"}, "ppo")


# ----------------------------------------------------------------------------- log-probs


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 logits of the distribution sampled at ``temperature`` (0, greedy, and 1 leave them as they are)."""
    logits = logits.float()
    return logits / temperature if temperature > 0 and temperature != 1.0 else logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-prob of ``tokens`` [...] under ``logits`` [..., V] at sampling temperature ``temperature``: the one
    definition of a token's log-prob, shared by ``forward_logprobs`` and the torch engine (which scores the
    tokens it samples, so that the loop need not run the policy again)."""
    logits = tempered(logits, temperature)
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def forward_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, with_entropy: bool = False):
    """Log-prob of each token under ``model`` at sampling temperature ``temperature``.

    Returns logprobs [B, L] (0 at position 0) and, if asked, entropy [B, L] of the distribution each
    token was drawn from. Dividing by the temperature makes the ratio compare the distributions the
    tokens were actually sampled from (as verl does).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # [B, L-1, V]
    logprobs = F.pad(token_logprobs(logits, input_ids[:, 1:], temperature), (1, 0))  # [B, L]
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        logits = tempered(logits, temperature)
        probs = torch.softmax(logits, dim=-1)
        entropy = F.pad(torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1), (1, 0))  # [B, L]
    return logprobs, entropy


def row_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] long: one past each row's last attended position (its length when right-padded; 0 for an empty row).
    attention_mask: [B, L]. Columns from a row's length on can be cut without changing any position it attends."""
    L = attention_mask.shape[1]
    ones = attention_mask.ne(0)
    return torch.where(ones.any(-1), L - ones.flip(-1).int().argmax(-1), 0)


# A forward call's fixed cost (Python, op dispatch, smaller matmuls) in token positions. Measured on one CPU thread
# with the built-in policy (a 64-row minibatch of the quick bench, forward + backward): 11 groups cut to their
# longest rows (C = 0) ran faster than 2 groups (C = 256) or one padded to the longest (C = inf): calls are cheap.
CALL_OVERHEAD_TOKENS = 32


def length_buckets(lengths: torch.Tensor, max_rows: int, overhead_tokens: int = CALL_OVERHEAD_TOKENS) -> list[torch.Tensor]:
    """Split rows into micro-batches of at most ``max_rows`` rows of similar length, each to be cut to its longest row.

    Rows padded to the longest of the batch run its padding through every matmul; sorted by length and cut
    into contiguous groups, a group runs only to its own longest row. The groups minimise the positions run
    (rows x longest row, summed) plus ``overhead_tokens`` per group (dynamic programming over the sorted rows).
    lengths: [n] long. Returns the groups' indices into ``lengths``, in order of length.
    """
    order = torch.sort(lengths, stable=True).indices
    sorted_lengths = lengths[order].tolist()
    n = len(sorted_lengths)
    best = [0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * longest + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def positions_run(attention_mask: torch.Tensor, micro_batch_size: int) -> int:
    """Token positions ``batched_logprobs`` runs through the model for rows ``attention_mask`` [B, L]: each
    micro-batch's rows x its longest row (the FLOPs estimate counts them, padding included)."""
    lengths = row_lengths(attention_mask)
    return sum(len(rows) * max(int(lengths[rows].max()), 1) for rows in length_buckets(lengths, micro_batch_size))


@torch.no_grad()
def batched_logprobs(model, input_ids, attention_mask, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """``forward_logprobs`` in micro-batches of rows of similar length, each cut to its longest row, without
    gradients: old and reference log-probs [B, L] (read on response tokens only; 0 past a micro-batch's longest row)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)  # [B, L]
    lengths = row_lengths(attention_mask)
    for rows in length_buckets(lengths, micro_batch_size):
        rows = rows.to(input_ids.device)
        width = max(int(lengths[rows].max()), 1)
        out[rows, :width] = forward_logprobs(model, input_ids[rows, :width], attention_mask[rows, :width], temperature)[0].float()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- losses


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shift and scale ``x`` to mean 0, std 1 over masked entries; 0 outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, denom: float, norm_tokens: int = 1) -> torch.Tensor:
    """Reduce a per-token loss [b, L] of one micro-batch to a scalar that sums, over the micro-batches
    of a minibatch, to the minibatch's aggregate. ``denom`` is the minibatch's token count
    (token-mean) or sequence count (the seq-* modes), so gradient accumulation is exact."""
    if mode == "token-mean":
        return (loss * mask).sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [b]
        return per_seq.sum() / denom
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: a constant normaliser, no length bias
        return (loss * mask).sum() / (denom * norm_tokens)
    raise ValueError(mode)


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token policy loss [b, L] and the ratio [b, L]. The max of the two terms removes the
    incentive to move the ratio beyond [1 - ε, 1 + ε] in the direction the advantage favours."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), ratio


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref): exp(r) - r - 1 with r = log π_ref - log π; >= 0, unbiased."""
    log_ratio = ref_logprobs - logprobs
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -clamp, clamp)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(π || π_ref): log π - log π_ref."""
    return logprobs - ref_logprobs


def value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """Clipped value loss 0.5·max((V - R)², (clip(V, V_old ± c) - R)²), per token [b, L]."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


# ----------------------------------------------------------------------------- update


def minibatch_indices(batch_size: int, epochs: int, minibatches: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of each minibatch, ``epochs`` shuffled passes split into ``minibatches`` parts.
    Under data parallelism every rank draws the same (global) minibatches from the same generator
    and processes its own part of each (``distributed.split_rows``)."""
    per = math.ceil(batch_size / minibatches)
    for _ in range(epochs):
        perm = torch.randperm(batch_size, generator=generator)
        for start in range(0, batch_size, per):
            yield perm[start : start + per]


def micro_batch_rows(rows: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    """This rank's rows of a minibatch as micro-batches (each to be cut to its longest row). One process groups
    rows of similar length (``length_buckets``); under data parallelism every rank must run as many
    micro-batches as the others, so each keeps the plain split of its rows by ``micro_batch_size``."""
    if distributed.world_size() > 1:
        return list(rows.split(micro_batch_size))
    return [rows[group] for group in length_buckets(lengths[rows], micro_batch_size)]


def ppo_update(policy, batch, advantages, cfg: PPOConfig, temperature: float, generator: torch.Generator,
               norm_tokens: int) -> dict[str, float]:
    """PPO epochs over one rollout batch: clipped surrogate (+ k3 KL), minibatches, accumulation,
    gradient clipping; minibatches whose mean ratio explodes are skipped. Returns logged statistics.

    policy: a ``distributed.Trained``. batch: the global batch (every rank holds all of it); each rank
    runs its rows of every global minibatch, with losses normalised by the global minibatch, so the
    reduced gradient is the one-process gradient. advantages: [B, L] float32, 0 outside ``batch.response_mask``.
    """
    policy.train()
    use_k3 = cfg.kl_mode == "k3-loss" and cfg.kl_coef > 0 and batch.ref_logprobs is not None
    totals = {"loss/policy": 0.0, "loss/kl": 0.0, "ppo/clip_frac": 0.0, "ppo/approx_kl_old": 0.0, "ppo/entropy": 0.0,
              "ppo/ratio_mean": 0.0, "ppo/grad_norm": 0.0}
    summed = [k for k in totals if k != "ppo/grad_norm"] + ["nonfinite"]  # per-rank sums, all-reduced per minibatch
    steps = skipped = positions = 0  # positions: token positions this rank ran forward and backward
    lengths = row_lengths(batch.attention_mask)  # [B]
    for rows in minibatch_indices(batch.size, cfg.epochs, cfg.minibatches, generator):
        mask_mb = batch.response_mask[rows]  # [b, L] the global minibatch
        denom = max(mask_mb.sum().item(), 1.0) if cfg.loss_agg == "token-mean" else float(len(rows))  # a masked-out minibatch: 0 loss
        tokens_mb = mask_mb.sum().clamp(min=1).item()
        stats = dict.fromkeys(summed, 0.0)
        micro_batches = micro_batch_rows(distributed.split_rows(rows), lengths, cfg.micro_batch_size)  # this rank's rows
        skip = False
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            width = max(int(lengths[micro].max()), 1)  # the micro-batch's longest row: the columns after it are padding
            positions += len(micro) * width
            with policy.accumulating(last):
                mask = batch.response_mask[micro, :width]
                logprobs, entropy = forward_logprobs(policy, batch.input_ids[micro, :width], batch.attention_mask[micro, :width],
                                                     temperature, with_entropy=True)
                old = batch.old_logprobs[micro, :width]
                pg_loss, ratio = clipped_surrogate(logprobs, old, advantages[micro, :width], cfg.clip_eps)
                loss = aggregate(pg_loss, mask, cfg.loss_agg, denom, norm_tokens)
                if use_k3:
                    kl = kl_k3(logprobs, batch.ref_logprobs[micro, :width], cfg.kl_clamp)
                    kl_loss = aggregate(kl, mask, cfg.loss_agg, denom, norm_tokens)
                    loss = loss + cfg.kl_coef * kl_loss
                    stats["loss/kl"] += kl_loss.item()
                with torch.no_grad():
                    w = lambda x: ((x * mask).sum() / tokens_mb).item()  # noqa: E731  token-weighted over the global minibatch
                    stats["nonfinite"] += float(not torch.isfinite(loss))
                    stats["loss/policy"] += loss.item()
                    stats["ppo/clip_frac"] += w(((ratio - 1.0).abs() > cfg.clip_eps).float())
                    stats["ppo/approx_kl_old"] += w(0.5 * (logprobs - old) ** 2)
                    stats["ppo/entropy"] += w(entropy)
                    stats["ppo/ratio_mean"] += w(ratio)
                if last:  # every rank sees the global minibatch's statistics and decides alike
                    stats = dict(zip(summed, distributed.all_reduce([stats[k] for k in summed])))
                    if stats["nonfinite"]:
                        raise FloatingPointError(f"non-finite policy loss ({stats['loss/policy']}) in the PPO update: "
                                                 "lower train.lr or raise ppo.kl_coef")
                    r = stats["ppo/ratio_mean"]
                    skip = not (1.0 / cfg.ratio_skip_threshold <= r <= cfg.ratio_skip_threshold)
                policy.backward(loss, drop=skip)
        grad_norm = policy.step(drop=skip)
        if skip:
            skipped += 1
            continue
        stats["ppo/grad_norm"] = grad_norm
        steps += 1
        for k in totals:
            totals[k] += stats[k]
    out = {k: v / max(steps, 1) for k, v in totals.items()}
    out["ppo/optimizer_steps"] = steps
    out["ppo/skipped_minibatches"] = skipped
    out["ppo/positions"] = positions  # this rank's; the loop's FLOPs estimate of the update sums it over ranks
    out["lr"] = policy.lr()
    return out
