"""The PPO core: log-probs, losses, aggregation and the update epochs. Strategy-agnostic: it takes
per-token advantages from whichever estimator ran, and never asks which one.

Every per-token tensor is ``[B, L]`` aligned with the token it scores (see ``rlzoo.rollout``).
"""

from __future__ import annotations

import inspect
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
    share_prompts: bool = True  # training and scoring forwards run each distinct prompt once per micro-batch (a KV cache its rows attend to); False runs every row whole

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


def model_inputs(model, position_ids: torch.Tensor | None = None, cache=None) -> dict:
    """Keyword arguments of a transformers forward for explicit ``position_ids`` and a KV ``cache`` (read, and
    filled in place with this call's keys and values): recent transformers releases name the cache argument
    ``cache`` (5.25 does), earlier ones ``past_key_values`` (5.0 does)."""
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    if cache is not None:
        parameters = inspect.signature(getattr(model, "module", model).forward).parameters  # a Trained: its plain module
        kwargs |= {"cache" if "cache" in parameters else "past_key_values": cache, "use_cache": True}
    return kwargs


def forward_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, with_entropy: bool = False,
                     position_ids: torch.Tensor | None = None, cache=None):
    """Log-prob of each token under ``model`` at sampling temperature ``temperature``.

    Returns logprobs [B, L] (0 at position 0) and, if asked, entropy [B, L] of the distribution each
    token was drawn from. Dividing by the temperature makes the ratio compare the distributions the
    tokens were actually sampled from (as verl does). ``position_ids`` and ``cache``: the rows continue
    sequences whose earlier keys and values the cache holds (``forward_rows``).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   **model_inputs(model, position_ids, cache)).logits[:, :-1]  # [B, L-1, V]
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
# with the built-in policy: a forward + backward of transformers' Llama costs ~5 ms however small its input, and
# ~0.07 ms per position beyond it. On a quick-bench batch (the update's 64-row and the critic's 32-row minibatches,
# forward + backward, best of 3): C = 0 (a call per distinct length) 1.08 / 1.33 s, 32: 0.85 / 0.93 s, 64: 0.83 /
# 0.90 s, 128: 0.82 / 0.92 s, 256: 0.90 / 0.96 s (policy / critic). A call continuing a KV cache of shared prompts
# (``forward_rows``) costs more (the cache gathered per layer, a mask over the prompt): counting it 32 positions
# more keeps sharing where it pays (the update's minibatches: 0.79 vs 0.82 s) and not where it does not (the
# critic's, ~2 rows per prompt: 0.94 s shared vs 0.92 s whole; with the extra cost it runs them whole).
CALL_OVERHEAD_TOKENS = 64
CACHED_CALL_TOKENS = 32


def length_buckets(lengths: torch.Tensor, max_rows: int, overhead_tokens: int | None = None) -> list[torch.Tensor]:
    """Split rows into micro-batches of at most ``max_rows`` rows of similar length, each to be cut to its longest row.

    Rows padded to the longest of the batch run its padding through every matmul; sorted by length and cut
    into contiguous groups, a group runs only to its own longest row. The groups minimise the positions run
    (rows x longest row, summed) plus ``overhead_tokens`` per group (default ``CALL_OVERHEAD_TOKENS``; dynamic
    programming over the sorted rows).
    lengths: [n] long. Returns the groups' indices into ``lengths``, in order of length.
    """
    overhead_tokens = CALL_OVERHEAD_TOKENS if overhead_tokens is None else overhead_tokens
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


@dataclass
class RowPlan:
    """How ``forward_rows`` runs rows [b, L]: length buckets, and each distinct prompt's positions once.

    Every row runs its own positions from ``start`` on (its suffix); positions before ``start`` are its prompt's
    first P - 1 tokens, run once per distinct prompt (``prefix_ids`` [U, P], right-padded, ``prefix_mask``) into
    a KV cache that the row's suffix attends to. The prompt's last token stays in the suffix: its output scores
    the response's first token. A row that shares no prompt has ``start`` 0 and ``owner`` -1 and runs whole in
    calls without a cache. Without sharing, ``start`` is 0 everywhere and there are no prefixes.
    """

    start: torch.Tensor  # [b] long: first position each row runs itself
    suffix_lens: torch.Tensor  # [b] long: positions each row runs itself (its length - start)
    buckets: list[torch.Tensor]  # row indices of each call, rows of similar suffix length (``length_buckets``)
    owner: torch.Tensor | None = None  # [b] long: the row's prompt in prefix_ids (-1: none)
    prefix_ids: torch.Tensor | None = None  # [U, P] long
    prefix_mask: torch.Tensor | None = None  # [U, P] long

    @property
    def positions(self) -> int:
        """Token positions run through the model (each call's rows x its longest suffix, padding included)."""
        shared = 0 if self.prefix_ids is None else self.prefix_ids.numel()
        return shared + sum(len(rows) * max(int(self.suffix_lens[rows].max()), 1) for rows in self.buckets)

    @property
    def cost(self) -> int:
        """Positions run plus each call's fixed cost (``CALL_OVERHEAD_TOKENS``; the prefill is a call too)."""
        cached = sum(int(self.start[rows[0]]) > 0 for rows in self.buckets)
        calls = len(self.buckets) + (self.prefix_ids is not None)
        return self.positions + CALL_OVERHEAD_TOKENS * calls + CACHED_CALL_TOKENS * cached


def plan_rows(input_ids, attention_mask, max_rows: int, prompt_lens: torch.Tensor | None = None) -> RowPlan:
    """Plan ``forward_rows`` for right-padded rows ``input_ids``/``attention_mask`` [b, L]; ``prompt_lens`` [b]
    (None: no sharing) are the prompt tokens at the start of each row. Rows whose first P - 1 tokens are equal
    (compared by content: whichever strategy grouped them) share them; a prompt of one row runs whole in its row.
    The plan with sharing is kept only if it costs less than the plain one (``RowPlan.cost``: prompts padded to
    the longest cost positions too, and every call its fixed cost)."""
    lengths = row_lengths(attention_mask).cpu()  # [b]
    zero = torch.zeros_like(lengths)
    plain = RowPlan(start=zero, suffix_lens=lengths, buckets=length_buckets(lengths, max_rows))
    if prompt_lens is None or not len(lengths):
        return plain
    start = torch.minimum(prompt_lens.cpu() - 1, lengths - 1).clamp(min=0)  # [b] the prompt's last token stays in the row
    rows = input_ids.cpu().tolist()
    prefixes = [tuple(row[:n]) for row, n in zip(rows, start.tolist())]
    counts: dict[tuple, int] = {}
    for prefix in prefixes:
        counts[prefix] = counts.get(prefix, 0) + 1
    shared = torch.tensor([n > 0 and counts[prefix] > 1 for prefix, n in zip(prefixes, start.tolist())])  # [b]
    if not shared.any():
        return plain
    start = torch.where(shared, start, zero)
    suffix_lens = lengths - start
    buckets = []
    for part in (shared.nonzero().squeeze(1), (~shared).nonzero().squeeze(1)):  # a call either continues prompts or not
        buckets += [part[group] for group in length_buckets(suffix_lens[part], max_rows)] if len(part) else []
    prompts: dict[tuple, int] = {}
    owner = torch.tensor([prompts.setdefault(prefix, len(prompts)) if s else -1 for prefix, s in zip(prefixes, shared.tolist())])
    prefix_ids = torch.zeros(len(prompts), int(start.max()), dtype=torch.long)  # [U, P]; padding is masked
    prefix_mask = torch.zeros_like(prefix_ids)  # [U, P]
    for prompt, u in prompts.items():
        prefix_ids[u, : len(prompt)], prefix_mask[u, : len(prompt)] = torch.tensor(prompt), 1
    plan = RowPlan(start=start, suffix_lens=suffix_lens, buckets=buckets, owner=owner, prefix_ids=prefix_ids, prefix_mask=prefix_mask)
    return plan if plan.cost < plain.cost else plain


def forward_rows(fn, prefill, input_ids, attention_mask, plan: RowPlan):
    """Per-token outputs of ``fn`` over rows [b, L] run as ``plan`` says, in the rows' layout [b, W] (W: the
    longest row), 0 where no row's own position ran (its shared prompt, padding). With autograd on, one backward
    through the result reaches every call (the shared prefixes included).

    fn(input_ids [n, S], attention_mask [n, P + S], position_ids [n, S] | None, cache | None) -> a tensor or a tuple
    of tensors (or None) [n, S] aligned with input_ids (column 0, a row's first own position, is never read: it
    scores no response token). prefill(input_ids [U, P], attention_mask [U, P], cache) runs the shared prompts
    into ``cache``.
    """
    from transformers.cache_utils import DynamicCache

    device = input_ids.device
    b = len(plan.start)
    W = max(int((plan.start + plan.suffix_lens).max()), 1) if b else 1
    kv = None
    if plan.prefix_ids is not None:
        cache = DynamicCache()
        prefix_mask = plan.prefix_mask.to(device)  # [U, P]
        prefill(plan.prefix_ids.to(device), prefix_mask, cache)
        kv = [(layer.keys, layer.values) for layer in cache.layers]  # [U, heads, P, head_dim] per layer
    placed, outputs = [], None
    for rows in plan.buckets:
        S = max(int(plan.suffix_lens[rows].max()), 1)
        cols = plan.start[rows, None] + torch.arange(S)  # [n, S] position of each column of the call
        own = torch.arange(S) < plan.suffix_lens[rows, None]  # [n, S] the row's own positions (the rest is padding)
        rows_d, cols_d, own_d = rows.to(device), cols.to(device), own.to(device)
        at = cols_d.clamp(max=input_ids.shape[1] - 1)
        ids, own_mask = input_ids[rows_d].gather(1, at), attention_mask[rows_d].gather(1, at) * own_d  # [n, S]
        if kv is None or int(plan.start[rows[0]]) == 0:  # rows that share no prompt (``plan_rows``)
            out = fn(ids, own_mask, None, None)
        else:
            owner = plan.owner[rows].to(device)
            cache = DynamicCache()
            for i, (k, v) in enumerate(kv):
                cache.update(k[owner], v[owner], i)
            mask = torch.cat([prefix_mask[owner], own_mask], 1)  # [n, P + S]
            out = fn(ids, mask, cols_d, cache)
        out = out if isinstance(out, tuple) else (out,)
        placed.append((rows_d[:, None].expand(-1, S)[own_d], cols_d[own_d], [None if o is None else o[own_d] for o in out]))
        outputs = [None if o is None else o.new_zeros(b, W) for o in out] if outputs is None else outputs
    if outputs is None:
        return None
    rows_at = torch.cat([r for r, _, _ in placed])
    cols_at = torch.cat([c for _, c, _ in placed])
    result = []
    for j, zeros in enumerate(outputs):
        result.append(None if zeros is None else zeros.index_put((rows_at, cols_at), torch.cat([v[j] for _, _, v in placed])))
    return tuple(result) if len(result) > 1 else result[0]


def policy_prefill(model):
    """``prefill`` for ``forward_rows`` through a causal LM: its logits are not needed (the last one where the
    model can skip the LM head on the rest: a prompt's vocabulary-sized logits are wasted work)."""
    parameters = inspect.signature(getattr(model, "module", model).forward).parameters
    last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return lambda ids, mask, cache: model(input_ids=ids, attention_mask=mask, **model_inputs(model, None, cache), **last)


@torch.no_grad()
def batched_logprobs(model, input_ids, attention_mask, temperature: float, micro_batch_size: int,
                     prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
    """``forward_logprobs`` in calls of at most ``micro_batch_size`` rows of similar length, each distinct prompt
    run once if ``prompt_lens`` [b] is given (``plan_rows``), without gradients: old and reference log-probs [B, L]
    (read on response tokens only; 0 on a shared prompt's tokens and past a row's end)."""
    was_training = model.training
    model.eval()
    plan = plan_rows(input_ids, attention_mask, micro_batch_size, prompt_lens)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)  # [B, L]
    logprobs = forward_rows(lambda ids, mask, pos, cache: forward_logprobs(model, ids, mask, temperature, False, pos, cache)[0],
                            policy_prefill(model), input_ids, attention_mask, plan)
    if logprobs is not None:
        out[:, : logprobs.shape[1]] = logprobs.float()
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


def micro_batch_rows(rows: torch.Tensor, group_ids: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    """This rank's rows of a minibatch as micro-batches of at most ``micro_batch_size`` rows (one backward each),
    the rows of a prompt together (``group_ids`` [B]: a micro-batch runs each distinct prompt once). The count
    depends on the row count only: under data parallelism every rank runs as many as the others."""
    return list(rows[torch.argsort(group_ids[rows], stable=True)].split(micro_batch_size))


def training_forward(trained, fn, prefill, input_ids, attention_mask, prompt_lens: torch.Tensor | None):
    """``fn``'s per-token outputs [m, W] over one micro-batch's rows [m, L] through ``trained`` (a
    ``distributed.Trained``), and the positions run. One process: length buckets and, if ``prompt_lens`` is
    given, each distinct prompt once (``plan_rows``); several forwards then feed the micro-batch's one backward.
    Under DDP or DeepSpeed a backward follows exactly one forward: the rows run in one call cut to the longest."""
    if trained.direct:
        plan = plan_rows(input_ids, attention_mask, len(input_ids), prompt_lens)
        return forward_rows(fn, prefill, input_ids, attention_mask, plan), plan.positions
    width = max(int(row_lengths(attention_mask).max()), 1)
    return fn(input_ids[:, :width], attention_mask[:, :width], None, None), len(input_ids) * width


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
    share, prompt_lens = cfg.share_prompts, batch.prompt_lens.to(batch.input_ids.device)
    score = lambda ids, mask, pos, cache: forward_logprobs(policy, ids, mask, temperature, True, pos, cache)  # noqa: E731
    prefill = policy_prefill(policy)
    for rows in minibatch_indices(batch.size, cfg.epochs, cfg.minibatches, generator):
        mask_mb = batch.response_mask[rows]  # [b, L] the global minibatch
        denom = max(mask_mb.sum().item(), 1.0) if cfg.loss_agg == "token-mean" else float(len(rows))  # a masked-out minibatch: 0 loss
        tokens_mb = mask_mb.sum().clamp(min=1).item()
        stats = dict.fromkeys(summed, 0.0)
        micro_batches = micro_batch_rows(distributed.split_rows(rows), batch.group_ids, cfg.micro_batch_size)  # this rank's rows
        skip = False
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            width = max(int(lengths[micro].max()), 1)  # the micro-batch's longest row: the columns after it are padding
            with policy.accumulating(last):
                mask = batch.response_mask[micro, :width]
                (logprobs, entropy), n = training_forward(policy, score, prefill, batch.input_ids[micro, :width],
                                                          batch.attention_mask[micro, :width], prompt_lens[micro] if share else None)
                positions += n
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
