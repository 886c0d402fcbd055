"""A lean decode step for transformers' Llama (the built-in policy's architecture): an optional fast path of the torch engine.

At hidden size 128 a transformers forward step is many small ops around few FLOPs: three q/k/v and two gate/up
matmuls per layer, a 4-D mask built per call, RMSNorm as five elementwise passes, the fused CPU attention kernel on
one query. Here the same weights run as one q|k|v and one gate|up matmul per layer (concatenated once per sampling
call), ``F.rms_norm``, a boolean mask built once per step, and a decode step's attention over one shared copy of
each prompt's prefill (``SharedPrefixCache``: the K samples of a prompt do not each copy and read its W keys).
It computes the same logits as transformers' forward up to float rounding (``tests/test_lean_llama.py``: within
1e-5, and the same sampled tokens).

Measured on one CPU thread (the quick bench's 16 prompts x 8 samples): sampling 0.52 -> 0.44 s, and VinePPO's MC
rollouts 4.5 -> 3.1 s; the shared prefix then took ``benchmarks/engine_bench.py``'s MC workload (148 states x 9)
2.7 -> 2.2 s and its 32 prompts x 8 samples 0.59 -> 0.49 s. The training forwards (log-probs, update, critic) keep
transformers' forward: the same lean forward there measured no faster (their time is in the matmuls;
``benchmarks/README.md``, "Speed").

``supports(model)`` says whether a model can take it: exactly a transformers ``LlamaForCausalLM`` (no subclass, no
wrapper) with SiLU, no MLP bias and standard attention; every other ``AutoModelForCausalLM`` keeps transformers' forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_enabled = True  # tests switch it off to compare with transformers' forward


@contextlib.contextmanager
def disabled():
    """Within: the torch engine samples through transformers' forward (to compare the two paths)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def supports(model) -> bool:
    """Whether ``model`` (exactly a transformers ``LlamaForCausalLM``, not a subclass or a wrapper) can run the lean step."""
    from transformers import LlamaForCausalLM

    if not _enabled or type(model) is not LlamaForCausalLM:
        return False
    config = model.config
    return (config.hidden_act == "silu" and getattr(config, "pretraining_tp", 1) == 1
            and not getattr(config, "mlp_bias", False)
            and all(type(layer.self_attn).__name__ == "LlamaAttention" for layer in model.model.layers))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ------------------------------------------------------------------------------------------ sampling (a KV cache)


def fused_weights(model) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Per layer: the q|k|v weight, its bias (or None) and the gate|up weight, concatenated once for a
    sampling call (the weights do not change while it samples)."""
    fused = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        bias = None if attn.q_proj.bias is None else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        fused.append((torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), bias,
                      torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])))
    return fused


def decode_logits(model, fused, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  cache) -> torch.Tensor:
    """One step of the torch engine's decode loop: the float32 logits [B, V] of the last of ``input_ids`` [B, T].

    attention_mask [B, S] covers the cache once these T tokens are in (S = cached + T; left padding and finished
    rows are 0s); position_ids [B, T]; ``cache`` a transformers ``Cache`` whose layers take ``update(k, v)``, or
    for a decode step (T = 1) a ``SharedPrefixCache``, which keeps its own mask (attention_mask is then not read).
    Query t sees key s when s is attended and s <= S - T + t; every query also sees itself, so that a padding
    query (all of whose keys are padding) stays finite: its output is never read by a real query.
    """
    body = model.model
    config = body.config
    B, T = input_ids.shape
    S = attention_mask.shape[1]
    x = body.embed_tokens(input_ids)  # [B, T, H]
    cos, sin = body.rotary_emb(x, position_ids)  # [B, T, head_dim] each
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, head_dim]
    visible = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    if T > 1:
        keys, queries = torch.arange(S, device=x.device), torch.arange(S - T, S, device=x.device)
        visible = (visible & (keys[None, :] <= queries[:, None])) | (keys[None, :] == queries[:, None])  # [B, 1, T, S]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i, (layer, (qkv_weight, qkv_bias, gate_up_weight)) in enumerate(zip(body.layers, fused)):
        attn = layer.self_attn
        head_dim = attn.head_dim
        h = F.rms_norm(x, x.shape[-1:], layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        qkv = F.linear(h, qkv_weight, qkv_bias).view(B, T, heads + 2 * kv_heads, head_dim).transpose(1, 2)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)  # [B, heads | kv, T, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if isinstance(cache, SharedPrefixCache):  # a decode step over one shared copy of each prompt's prefill
            out = cache.attend(i, q, k, v, attn.scaling)
        else:
            k, v = cache.layers[i].update(k, v)  # [B, kv, S, hd]: the cache so far and these T tokens
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=attn.scaling, enable_gqa=kv_heads != heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, heads * head_dim))  # out: [B, heads, T, hd]
        h = F.rms_norm(x, x.shape[-1:], layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        gate, up = F.linear(h, gate_up_weight).chunk(2, dim=-1)
        x = x + layer.mlp.down_proj(F.silu(gate) * up)
    last = F.rms_norm(x[:, -1], x.shape[-1:], body.norm.weight, body.norm.variance_epsilon)  # [B, H]
    return model.lm_head(last).float()  # [B, V]


class SharedPrefixCache:
    """The decode-time KV cache of the torch engine's lean path: one shared copy of each prompt's prefill, and per
    row only the tokens it generates.

    ``prefix`` holds per layer the prefill's keys and values [U, kv_heads, W, head_dim] of the U distinct prompts
    (left-padded to width W; ``prefix_mask`` [U, W] is 0 on padding); row b continues prompt ``prompt_of[b]``.
    Rather than copying a prompt's W keys to each of its rows, a step places the rows' queries in a grid
    [U, kv_heads, slots x group, head_dim] (row b at its prompt and its slot: its rank among the prompt's rows at
    fan-out; the slots of finished rows stay empty) and multiplies each prompt's keys and values once with all its
    rows' queries. The generated tokens, all visible to their row, take per-row products over a time-major buffer
    [max_new, B, kv_heads, head_dim]; one softmax runs over a row's prefix and generated scores together.
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], prefix_mask: torch.Tensor,
                 prompt_of: torch.Tensor, max_new: int):
        self.prefix = prefix
        U, kv_heads, W, _ = prefix[0][0].shape
        self.bias = torch.zeros(U, 1, 1, W, dtype=prefix[0][0].dtype, device=prefix_mask.device)
        self.bias.masked_fill_(prefix_mask[:, None, None, :] == 0, float("-inf"))  # [U, 1, 1, W]: hides padding
        counts = torch.bincount(prompt_of, minlength=U)
        order = torch.argsort(prompt_of, stable=True)
        slot_of = torch.empty_like(prompt_of)  # [B] rank of each row among its prompt's rows
        slot_of[order] = torch.arange(len(prompt_of), device=prompt_of.device) - (counts.cumsum(0) - counts)[prompt_of[order]]
        self.slots = int(counts.max())
        # [B, kv] each row's grid cell per key/value head, as a flat index into [U, kv, slots]: one index_select or
        # index_copy_ moves rows in and out of the grid (advanced indexing over two dimensions is ~4x slower)
        heads = torch.arange(kv_heads, device=prompt_of.device)
        self.cell = (prompt_of[:, None] * kv_heads + heads) * self.slots + slot_of[:, None]
        # [max_new, B, kv, hd]: time first, so that a step reads its rows' generated keys as one dense block
        self.suffix = [tuple(x.new_empty(max_new, len(prompt_of), kv_heads, x.shape[3]) for x in layer) for layer in prefix]
        self.length = 0  # tokens in the suffix buffers before this step

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        """The attention output [B, heads, 1, hd] of a decode step's queries q [B, heads, 1, hd]; this token's keys and
        values k, v [B, kv_heads, 1, hd] join the suffix (the step's length moves on after the last layer)."""
        prefix_k, prefix_v = self.prefix[layer]  # [U, kv, W, hd]
        suffix_k, suffix_v = self.suffix[layer]  # [max_new, B, kv, hd]
        t = self.length
        suffix_k[t], suffix_v[t] = k[:, :, 0], v[:, :, 0]
        suffix_k, suffix_v = suffix_k[: t + 1, :, :, None], suffix_v[: t + 1, :, :, None]  # [t + 1, B, kv, 1, hd]
        B, heads, _, hd = q.shape
        U, kv_heads, W, _ = prefix_k.shape
        group = heads // kv_heads  # grouped-query attention: query head h reads key/value head h // group
        q = (q * scaling).view(B, kv_heads, group, hd)
        cell = self.cell.flatten()
        grid = q.new_zeros(U * kv_heads * self.slots, group, hd).index_copy_(0, cell, q.flatten(0, 1))
        prefix_scores = grid.view(U, kv_heads, self.slots * group, hd) @ prefix_k.transpose(-1, -2) + self.bias
        prefix_scores = prefix_scores.view(-1, group, W).index_select(0, cell).view(B, kv_heads, group, W)
        # the suffix as products and sums over its dense [t + 1, B, kv] block (B x kv bmms measured ~1% slower)
        suffix_scores = (q * suffix_k).sum(-1)  # [t + 1, B, kv, group]
        probs = torch.softmax(torch.cat([prefix_scores, suffix_scores.permute(1, 2, 3, 0)], dim=-1), dim=-1)
        grid = probs.new_zeros(U * kv_heads * self.slots, group, W).index_copy_(0, cell, probs[..., :W].flatten(0, 1))
        prefix_out = grid.view(U, kv_heads, self.slots * group, W) @ prefix_v  # [U, kv, slots x group, hd]
        prefix_out = prefix_out.view(-1, group, hd).index_select(0, cell).view(B, kv_heads, group, hd)
        out = prefix_out + (probs[..., W:].permute(3, 0, 1, 2)[..., None] * suffix_v).sum(0)  # [B, kv, group, hd]
        if layer == len(self.prefix) - 1:
            self.length += 1
        return out.view(B, heads, 1, hd)

    def drop_rows(self, holes: torch.Tensor, movers: torch.Tensor, batch: int) -> None:
        """As ``_KVBuffer.drop_rows``: rows ``movers`` move into rows ``holes`` and the first ``batch`` rows stay;
        only the tokens a row generated are copied, and its grid cells move with it."""
        for k, v in self.suffix:
            k[: self.length, holes] = k[: self.length, movers]
            v[: self.length, holes] = v[: self.length, movers]
        self.suffix = [(k[:, :batch], v[:, :batch]) for k, v in self.suffix]
        self.cell[holes] = self.cell[movers]
        self.cell = self.cell[:batch]
