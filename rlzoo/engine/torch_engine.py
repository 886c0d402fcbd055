"""The ``torch`` engine: a decode loop of its own on top of any transformers causal LM's forward.

    engine = TorchEngine(model, tokenizer, max_batch_size=256)
    completions = engine.generate(prompt_ids, SamplingParams(n=9, temperature=0.6))  # [P][9]

What makes it faster than ``model.generate()`` on rollout workloads:
- prefix sharing: identical prompts (e.g. VinePPO's K continuations of one state) are prefilled once
  and their KV cache rows are copied to each sample (the lean Llama step copies nothing: its samples
  attend over the one prefilled copy, ``lean_llama.SharedPrefixCache``);
- a row leaves the batch the step it finishes: running rows from the end of the batch move into
  the freed slots (copying as many cache rows as finished), so a batch of mixed-length completions
  costs the tokens it generates, not rows × the longest;
- rows are sorted by prompt length before being cut into chunks of ``max_batch_size``, so left
  padding stays small;
- the KV cache is preallocated per chunk and written in place (no per-step concatenation), and
  attention reads only the filled part of it;
- asked (``SamplingParams.logprobs``), it scores each token it samples with the logits it sampled it from
  (``ppo.token_logprobs``): the PPO ratio's old log-probs without a second forward over the batch.

Randomness: each request (prompt index i, sample j) gets a 64-bit key drawn from
``torch.Generator().manual_seed(params.seed)`` (index i counts from ``params.first_index``, so a
request split into parts samples as the whole would); the uniform number that picks its token at step t is
a counter-based hash (splitmix64) of (key, t), and the token is found by inverse-CDF sampling. So on
one machine the tokens of a request depend only on the seed, its position (i, j), its prompt and the
weights, not on the other prompts, on ``max_batch_size`` or on prompt deduplication, up to the last
bits of batched float arithmetic (which move a sample only when its uniform falls within ~1e-7 of
a CDF boundary). The model is put in eval mode for the call and its training mode restored after.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import replace
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rlzoo import lean_llama
from rlzoo.engine import ENGINES, Completion, EngineStats, SamplingParams, context_length, prompt_budgets
from rlzoo.errors import UserError
from rlzoo.ppo import token_logprobs


class _KVBuffer(DynamicLayer):
    """One layer's KV cache in preallocated buffers [B, heads, capacity, head_dim], written in place.

    Unlike transformers' StaticCache, attention reads only the filled part ``[:, :, :length]``, so a
    step costs the tokens so far, not the capacity; unlike DynamicCache, a step copies nothing.
    HF's mask code sees a dynamic layer of ``length`` tokens.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.k_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self.v_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.k_buffer[:, :, self.length : end] = key_states
        self.v_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.k_buffer[:, :, :end], self.v_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (repeats allowed: that is how one prefill fans out to n samples)."""
        if not self.is_initialized:
            return
        k_buffer = self.k_buffer.new_empty(len(indices), *self.k_buffer.shape[1:])
        v_buffer = self.v_buffer.new_empty(len(indices), *self.v_buffer.shape[1:])
        k_buffer[:, :, : self.length] = self.keys[indices]  # copy only the filled part
        v_buffer[:, :, : self.length] = self.values[indices]
        self._set_buffers(k_buffer, v_buffer)

    def drop_rows(self, holes: torch.Tensor, movers: torch.Tensor, batch: int) -> None:
        """Keep the first ``batch`` rows, after rows ``movers`` (all >= batch) have moved into rows
        ``holes`` (all < batch): dropping k rows copies at most k rows, however many stay."""
        filled = slice(0, self.length)
        self.k_buffer[holes, :, filled] = self.k_buffer[movers, :, filled]
        self.v_buffer[holes, :, filled] = self.v_buffer[movers, :, filled]
        self._set_buffers(self.k_buffer[:batch], self.v_buffer[:batch])

    def _set_buffers(self, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
        self.k_buffer, self.v_buffer = k_buffer, v_buffer
        self.keys, self.values = k_buffer[:, :, : self.length], v_buffer[:, :, : self.length]


_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """splitmix64(key + step·golden) as floats in [0, 1): one independent uniform per key and step.

    keys: [B] int64. Returns [B] float32 (24 random bits, exactly representable).
    """
    x = keys + _i64((step + 1) * _GOLDEN)  # int64 arithmetic wraps around, as splitmix64 wants
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return _shr(x, 40).float() * 2.0**-24


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None) -> torch.Tensor:
    """Tokens [B] from logits [B, V]: argmax if temperature == 0, else inverse-CDF sampling with uniforms u [B].

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p: a token is
    kept when the probability of the tokens ranked above it is below top_p (the first always is).
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        mass_above = probs.cumsum(-1) - probs  # [B, V] probability of the tokens ranked above each one
        probs = probs.masked_fill(mass_above >= top_p, 0.0)
    cdf = probs.cumsum(-1)  # [B, V]; the unnormalised CDF: u is scaled by its total instead
    picked = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1), right=True)  # [B, 1]
    picked = picked.clamp_(max=probs.shape[-1] - 1)
    return (picked if order is None else order.gather(-1, picked)).squeeze(-1)


@ENGINES.register("torch")
class TorchEngine:
    """Samples from a transformers causal LM (the very module being trained) on its own device.

    ``share_prefixes``: prefill each distinct prompt once for all its samples (False, every sample
    prefills its own copy, only to measure what sharing saves).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 256, share_prefixes: bool = True):
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.share_prefixes = share_prefixes
        self.stats = EngineStats()
        eos = {tokenizer.eos_token_id} | set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
        self.eos_token_ids = sorted(i for i in eos if i is not None)
        self.pad_token_id = next((i for i in (tokenizer.pad_token_id, *self.eos_token_ids) if i is not None), 0)

    def sync_weights(self, model) -> None:
        """The engine runs ``model`` itself, so its current weights are already the ones sampled from."""
        self.model = model

    # ------------------------------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 budgets: Sequence[int] | None = None) -> list[list[Completion]]:
        """Completions [len(prompts)][params.n] of token-id prompts; prompt i gets at most ``budgets[i]`` new
        tokens (default: ``params.max_new_tokens`` each; see ``rlzoo.engine.prompt_budgets``)."""
        _check(params)
        prompts = [list(p) for p in prompts]
        budgets = prompt_budgets(params, len(prompts), budgets)
        vocab = self.model.get_input_embeddings().num_embeddings
        for i, p in enumerate(prompts):
            if not p:
                raise UserError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
            if min(p) < 0 or max(p) >= vocab:
                raise UserError(f"prompt {i} has a token id outside the model's vocabulary [0, {vocab})")
        limit = context_length(self.model)
        over = [i for i, (p, b) in enumerate(zip(prompts, budgets)) if limit is not None and len(p) + b > limit]
        if over:
            i = over[0]
            raise UserError(f"a prompt of {len(prompts[i])} tokens + max_new_tokens {budgets[i]} exceeds the model's "
                            f"context of {limit} positions; lower max_new_tokens or shorten the prompt")
        started = time.perf_counter()

        # Requests: one row per (prompt, sample), pointing at a unique prompt. Greedy rows are all alike,
        # so greedy decodes one row per unique prompt and copies it n times.
        unique: dict[tuple[tuple[int, ...], int], int] = {}  # (prompt, budget) -> its index
        prompt_to_unique = [unique.setdefault((tuple(p), b), len(unique)) for p, b in zip(prompts, budgets)]
        unique_prompts = [p for p, _ in unique]
        unique_budgets = [b for _, b in unique]
        generator = torch.Generator().manual_seed(params.seed)
        # [P, n] int64: the keys of prompts first_index .. first_index + P - 1 of the whole request
        keys = torch.randint(-(2**63), 2**63 - 1, (params.first_index + len(prompts), params.n), generator=generator)[params.first_index :]
        if params.temperature == 0:
            row_unique = list(range(len(unique_prompts)))
            row_keys = torch.zeros(len(row_unique), dtype=torch.long)
        else:
            row_unique = [u for u in prompt_to_unique for _ in range(params.n)]
            row_keys = keys.flatten()

        # Rows sorted by prompt length (so a chunk's prompts pad little), in chunks of max_batch_size.
        by_length = sorted(range(len(row_unique)), key=lambda r: (len(unique_prompts[row_unique[r]]), row_unique[r]))
        results: list[tuple | None] = [None] * len(row_unique)  # per row: (token ids, stopped, log-probs or None)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(by_length), self.max_batch_size):
                    rows = by_length[start : start + self.max_batch_size]
                    if self.share_prefixes:  # prefill each distinct prompt once, then copy its cache to its rows
                        prefill = list(dict.fromkeys(row_unique[r] for r in rows))
                        slot = {u: k for k, u in enumerate(prefill)}
                        expand = torch.tensor([slot[row_unique[r]] for r in rows])
                    else:  # every row prefills its own copy: only to measure what sharing saves
                        prefill, expand = [row_unique[r] for r in rows], torch.arange(len(rows))
                    limits = torch.tensor([unique_budgets[row_unique[r]] for r in rows])  # [B] each row's budget
                    outputs = self._decode([unique_prompts[u] for u in prefill], expand, row_keys[rows], limits, params)
                    for r, out in zip(rows, outputs):
                        results[r] = out
        finally:
            self.model.train(was_training)

        completions = [self._completion(*result, params.stop) for result in results]
        if params.temperature == 0:
            grouped = [[replace(completions[u], token_ids=list(completions[u].token_ids),
                                logprobs=None if completions[u].logprobs is None else list(completions[u].logprobs))
                        for _ in range(params.n)]
                       for u in prompt_to_unique]
        else:
            grouped = [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]
        self.stats.tokens_generated += sum(len(c.token_ids) for group in grouped for c in group)
        self.stats.seconds += time.perf_counter() - started
        return grouped

    # ------------------------------------------------------------------------------------ the decode loop

    def _decode(self, prompts: list[tuple[int, ...]], expand: torch.Tensor, keys: torch.Tensor, limits: torch.Tensor,
                params: SamplingParams) -> list[tuple[list[int], bool, list[float] | None]]:
        """Sample one continuation per row; row b continues ``prompts[expand[b]]`` with random key ``keys[b]``,
        for at most ``limits[b]`` tokens.

        Returns per row (generated token ids, whether it stopped on EOS / a stop string, their log-probs if
        ``params.logprobs`` else None).
        """
        device = next(self.model.parameters()).device
        forward = self._model_call()
        num_prompts, width = len(prompts), max(map(len, prompts))
        max_new = int(limits.max())  # the longest budget of the chunk sizes its buffers

        # Prefill the unique prompts, left-padded: every prompt ends at column width - 1.
        input_ids = torch.full((num_prompts, width), self.pad_token_id, dtype=torch.long)  # [U, W]
        attention_mask = torch.zeros((num_prompts, width + max_new), dtype=torch.long)  # [U, W + max_new]; grows into the right part
        for u, prompt in enumerate(prompts):
            input_ids[u, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[u, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # [U, W]; padding gets 0, it is masked anyway
        lean = lean_llama.supports(self.model)  # its decode steps read one shared copy of each prompt's cache
        cache = Cache(layers=[_KVBuffer(width if lean else width + max_new) for _ in range(self._num_layers())])
        logits = forward(input_ids, attention_mask[:, :width], position_ids, cache)  # [U, V]
        self.stats.forward_tokens += num_prompts * width
        self.stats.extra["prefill_tokens"] = self.stats.extra.get("prefill_tokens", 0) + num_prompts * width

        # Fan each prompt's cache out to its rows (the lean step reads it in place).
        expand = expand.to(device)
        if lean:
            cache = lean_llama.SharedPrefixCache([(layer.keys, layer.values) for layer in cache.layers],
                                                 attention_mask[:, :width], expand, max_new)
        else:
            cache.batch_select_indices(expand)
        logits, attention_mask = logits[expand], attention_mask[expand]
        next_position = position_ids[expand, -1] + 1  # [B] position of the token each row feeds next
        keys, limits = keys.to(device), limits.to(device)  # [B] int64, [B] long
        rows = torch.arange(len(expand), device=device)  # [B] which output row each batch row is
        generated = torch.empty((len(expand), max_new), dtype=torch.long, device=device)  # [B, max_new]
        scored = torch.zeros((len(expand), max_new if params.logprobs else 0), device=device)  # [B, max_new] log-probs, if asked
        end = torch.full((len(expand),), -1, dtype=torch.long, device=device)  # [B] step of the stopping token, -1 while running
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        results: list[tuple | None] = [None] * len(expand)

        def retire(batch_rows: torch.Tensor) -> None:
            """Move rows out of the batch into ``results`` (a row that never stopped ran to its budget)."""
            logprobs = scored[batch_rows].tolist() if params.logprobs else [None] * len(batch_rows)
            for row, tokens, stop_step, limit, lp in zip(rows[batch_rows].tolist(), generated[batch_rows].tolist(),
                                                         end[batch_rows].tolist(), limits[batch_rows].tolist(), logprobs):
                n = stop_step + 1 if stop_step >= 0 else limit
                results[row] = (tokens[:n], stop_step >= 0, None if lp is None else lp[:n])

        for step in range(max_new):
            u = uniforms(keys, step) if params.temperature > 0 else None  # [B]
            tokens = sample_tokens(logits, params.temperature, params.top_p, u)  # [B]
            generated[:, step] = tokens
            if params.logprobs:
                scored[:, step] = token_logprobs(logits, tokens, params.temperature)
            stopped = torch.isin(tokens, eos)  # [B]
            if params.stop:
                stopped |= self._stopped_by_strings(generated[:, : step + 1], params.stop)
            end = torch.where(stopped & (end < 0), step, end)
            finished = (end >= 0) | (limits <= step + 1)  # [B] stopped, or out of budget
            num_finished = int(finished.sum())
            if step == max_new - 1 or num_finished == len(rows):
                break
            if num_finished > 0:  # finished rows leave; running rows from the batch's tail move into their slots
                retire(finished.nonzero().squeeze(-1))
                running = len(rows) - num_finished
                holes = finished[:running].nonzero().squeeze(-1)  # finished rows in the part that stays
                movers = (~finished[running:]).nonzero().squeeze(-1) + running  # running rows in the part that goes
                for layer in [cache] if lean else cache.layers:
                    layer.drop_rows(holes, movers, running)
                order = torch.arange(running, device=device)  # [B'] where each remaining row comes from
                order[holes] = movers
                attention_mask, next_position, keys, rows = attention_mask[order], next_position[order], keys[order], rows[order]
                limits = limits[order]
                generated, scored, end, tokens = generated[order], scored[order], end[order], tokens[order]
            length = width + step + 1  # cache length once this step's token is in
            logits = forward(tokens[:, None], attention_mask[:, :length], next_position[:, None], cache)
            next_position += 1
            self.stats.forward_tokens += len(rows)
            self.stats.extra["decode_tokens"] = self.stats.extra.get("decode_tokens", 0) + len(rows)
        retire(torch.arange(len(rows), device=device))
        return results

    def _model_call(self):
        """forward(input_ids, attention_mask, position_ids, cache) -> logits [B, V] float32 of the last position.

        The built-in Llama architecture takes ``lean_llama.decode_logits`` (same logits up to float rounding).
        Otherwise asks for the last position's logits only where the model supports it (the LM head on a
        prompt's every position is wasted work); transformers 5 calls the cache argument ``cache``,
        older versions ``past_key_values``.
        """
        model = self.model
        if lean_llama.supports(model):  # the built-in architecture: a lean step (fused projections, no mask building)
            fused = lean_llama.fused_weights(model)
            return lambda input_ids, attention_mask, position_ids, cache: lean_llama.decode_logits(
                model, fused, input_ids, attention_mask, position_ids, cache)
        parameters = inspect.signature(model.forward).parameters
        cache_argument = "cache" if "cache" in parameters else "past_key_values"
        options = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

        def forward(input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{cache_argument: cache}, **options)
            return out.logits[:, -1].float()

        return forward

    # ------------------------------------------------------------------------------------------- helpers

    def _num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    def _stopped_by_strings(self, generated: torch.Tensor, stop: tuple[str, ...]) -> torch.Tensor:
        """[B] bool: whether the last token of each row of ``generated`` [B, t] completes a stop string.

        Decodes only the last few tokens of each row: a stop string of k UTF-8 bytes completed by the
        last token lies within the last k tokens (every token is at least one byte), and one token more
        keeps a word-start or a split character at the window's edge away from the match. (transformers'
        StopStringCriteria needs a tokenizer that can spell "abcdef", which the arith char vocabulary cannot.)
        """
        window = max(len(s.encode()) for s in stop) + 1
        texts = self.tokenizer.batch_decode(generated[:, -window:].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in text for s in stop) for text in texts], device=generated.device)

    def _completion(self, token_ids: list[int], stopped: bool, logprobs: list[float] | None, stop: tuple[str, ...]) -> Completion:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        return Completion(token_ids=token_ids, text=text[:cut] if cut >= 0 else text,
                          finish_reason="stop" if stopped else "length", logprobs=logprobs)


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _check(params: SamplingParams) -> None:
    if params.n < 1:
        raise UserError(f"n must be at least 1, got {params.n}")
    if params.temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.first_index < 0:
        raise UserError(f"first_index must be >= 0, got {params.first_index}")
    if params.max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
    if isinstance(params.stop, str) or any(not isinstance(s, str) or not s for s in params.stop):
        raise UserError(f"stop must be a tuple of non-empty strings, got {params.stop!r}")
