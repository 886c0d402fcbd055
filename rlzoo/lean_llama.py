"""A lean decode step for transformers' Llama (the built-in policy's architecture): an optional fast path of the torch engine.

At hidden size 128 a transformers forward step is many small ops around few FLOPs: three q/k/v and two gate/up
matmuls per layer, a 4-D mask built per call, RMSNorm as five elementwise passes, the fused CPU attention kernel on
one query. Here the same weights run as one q|k|v and one gate|up matmul per layer (concatenated once per sampling
call), ``F.rms_norm``, a boolean mask built once per step, and a decode step's attention as two batched matmuls.
It computes the same logits as transformers' forward up to float rounding (``tests/test_lean_llama.py``: within
1e-5, and the same sampled tokens).

Measured on one CPU thread (the quick bench's 16 prompts x 8 samples): sampling 0.52 -> 0.44 s, and VinePPO's MC
rollouts 4.5 -> 3.1 s. The training forwards (log-probs, update, critic) keep transformers' forward: the same lean
forward there measured no faster (their time is in the matmuls; ``benchmarks/README.md``, "Speed").

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
    rows are 0s); position_ids [B, T]; ``cache`` a transformers ``Cache`` whose layers take ``update(k, v)``.
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
        k, v = cache.layers[i].update(k, v)  # [B, kv, S, hd]: the cache so far and these T tokens
        if T == 1:  # a decode step: two batched matmuls beat the fused CPU kernel (~3x at 128 rows x 4 heads x 70 keys)
            if kv_heads != heads:
                k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
            scores = (q @ k.transpose(-1, -2)) * attn.scaling  # [B, heads, 1, S]
            out = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=attn.scaling, enable_gqa=kv_heads != heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, heads * head_dim))  # out: [B, heads, T, hd]
        h = F.rms_norm(x, x.shape[-1:], layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        gate, up = F.linear(h, gate_up_weight).chunk(2, dim=-1)
        x = x + layer.mlp.down_proj(F.silu(gate) * up)
    last = F.rms_norm(x[:, -1], x.shape[-1:], body.norm.weight, body.norm.variance_epsilon)  # [B, H]
    return model.lm_head(last).float()  # [B, V]
