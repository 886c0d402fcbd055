"""The speed paths against the plain ones on tiny real models: the torch engine's lean Llama decode step gives
transformers' logits (within 1e-5) and the same sampled tokens, also attending over one shared copy of each
prompt's prefill while rows leave the batch; other architectures keep transformers' forward;
micro-batches of rows of similar length cut to their longest row give the log-probs and the PPO update of one
padded batch (within float rounding); a short training run's metrics agree with the fast paths on and off."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.cache_utils import Cache

from rlzoo import lean_llama, ppo, runs
from rlzoo.engine import SamplingParams
from rlzoo.engine.torch_engine import TorchEngine, _KVBuffer
from test_engine import PROMPTS, char_tokenizer, encode, make_eos_follow, tiny_llama

LOGIT_ATOL = 1e-5  # lean vs transformers logits (values of order 1-10): float32 rounding of a different op order
METRIC_RTOL = 1e-4  # a 2-iteration run's float metrics, fast paths on vs off
PARAM_ATOL = 5e-6  # weights (of order 0.1) after 4 Adam steps at lr 1e-2 from gradients equal to float rounding (measured 1.6e-6)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _steps(engine, prompts, steps=4):
    """Prefill left-padded ``prompts`` and decode ``steps`` greedy tokens with ``engine``'s model call;
    returns each call's logits [U, V]."""
    forward = engine._model_call()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), engine.pad_token_id)
    mask = torch.zeros((len(prompts), width + steps), dtype=torch.long)
    for u, p in enumerate(prompts):
        ids[u, width - len(p):] = torch.tensor(p)
        mask[u, width - len(p):] = 1
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = Cache(layers=[_KVBuffer(width + steps) for _ in range(engine._num_layers())])
    with torch.inference_mode():
        out = [forward(ids, mask[:, :width], positions, cache)]
        nxt = positions[:, -1] + 1
        for step in range(steps - 1):
            out.append(forward(out[-1].argmax(-1)[:, None], mask[:, : width + step + 1], nxt[:, None], cache))
            nxt = nxt + 1
    return out


def test_lean_decode_gives_transformers_logits_and_the_same_samples(tokenizer):
    model = tiny_llama(tokenizer)  # grouped-query attention: 4 heads over 2 key/value heads
    engine = TorchEngine(model, tokenizer, max_batch_size=5)
    assert lean_llama.supports(model)
    prompts = encode(tokenizer, PROMPTS)  # mixed lengths: left padding in the prefill
    lean = _steps(engine, prompts)
    with lean_llama.disabled():
        assert not lean_llama.supports(model)
        plain = _steps(engine, prompts)
    for a, b in zip(lean, plain):
        assert a.shape == b.shape and torch.allclose(a, b, atol=LOGIT_ATOL, rtol=0)
    params = SamplingParams(n=6, temperature=0.8, top_p=0.9, max_new_tokens=12, seed=3)
    sampled = engine.generate(prompts, params)
    with lean_llama.disabled():
        reference = engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in sampled] == [[c.token_ids for c in g] for g in reference]
    assert len({tuple(c.token_ids) for g in sampled for c in g}) > len(PROMPTS)  # real sampling, not one answer


def _recorded_generate(engine, prompts, params, budgets=None):
    """``engine.generate``'s token ids, and per model call the logits [B, V] it returned and its cache's type."""
    calls, model_call = [], engine._model_call

    def recording():
        forward = model_call()

        def record(input_ids, attention_mask, position_ids, cache):
            logits = forward(input_ids, attention_mask, position_ids, cache)
            calls.append((logits.clone(), type(cache)))
            return logits

        return record

    engine._model_call = recording
    try:
        groups = engine.generate(prompts, params, budgets)
    finally:
        del engine._model_call
    return [[c.token_ids for c in g] for g in groups], calls


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefix_decode_gives_transformers_logits_as_rows_finish(tokenizer, temperature):
    """Each prompt's prefill is read once for all its rows: every decode step's logits match transformers' forward
    on per-row caches, while rows of mixed prompt lengths, repeated prompts and different budgets finish at
    different steps (and leave the batch)."""
    model = tiny_llama(tokenizer)  # grouped-query attention: 4 heads over 2 key/value heads
    make_eos_follow(model, tokenizer, "3")  # greedy completions end at different lengths too
    engine = TorchEngine(model, tokenizer, max_batch_size=12)
    prompts = encode(tokenizer, PROMPTS + ["17+25*3?\n"])  # "1+2?\n" and "17+25*3?\n" twice, the same budget
    budgets = [10, 10, 3, 10, 7, 1, 5, 10]
    params = SamplingParams(n=4, temperature=temperature, max_new_tokens=10, seed=5)
    tokens, calls = _recorded_generate(engine, prompts, params, budgets)
    with lean_llama.disabled():
        reference, reference_calls = _recorded_generate(engine, prompts, params, budgets)
    assert tokens == reference
    assert len(calls) == len(reference_calls)
    for (a, cache), (b, _) in zip(calls, reference_calls):
        assert a.shape == b.shape and torch.allclose(a, b, atol=LOGIT_ATOL, rtol=0)
    decode_batches = [len(a) for a, cache in calls if cache is lean_llama.SharedPrefixCache]
    assert decode_batches and any(b < a for a, b in zip(decode_batches, decode_batches[1:]))  # rows left mid-chunk
    lengths = {len(ids) for group in tokens for ids in group}
    assert len(lengths) >= 3 and min(lengths) < 10  # stopped at EOS or by budget at several steps


def test_other_architectures_keep_the_transformers_forward(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):  # a subclass may change the forward: not taken for plain Llama
        pass

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    assert not lean_llama.supports(gpt2) and not lean_llama.supports(MyLlama(tiny_llama(tokenizer).config))
    prompts = encode(tokenizer, PROMPTS[:3])
    out = TorchEngine(gpt2, tokenizer).generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=6))
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    ref = gpt2.generate(**batch, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1]:].tolist()
    for group, row in zip(out, ref):
        eos = tokenizer.eos_token_id
        assert group[0].token_ids == (row[: row.index(eos) + 1] if eos in row else row)


# ------------------------------------------------------------------------------ length buckets


def _right_padded(tokenizer, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, len(tokenizer), (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()  # [B, L] right-padded
    return ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def test_length_buckets_partition_the_rows_and_cut_padding():
    lengths = torch.tensor([5, 40, 7, 38, 6, 41, 39, 8, 5, 40])
    groups = ppo.length_buckets(lengths, max_rows=4, overhead_tokens=0)
    assert sorted(torch.cat(groups).tolist()) == list(range(10)) and all(len(g) <= 4 for g in groups)
    assert sum(len(g) * int(lengths[g].max()) for g in groups) < len(lengths) * int(lengths.max()) * 0.7
    assert len(ppo.length_buckets(lengths, max_rows=10, overhead_tokens=10**6)) == 1  # calls costlier than padding
    assert ppo.row_lengths(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])).tolist() == [2, 0, 3]


def test_bucketed_logprobs_equal_one_padded_forward(tokenizer):
    model = tiny_llama(tokenizer)
    ids, mask = _right_padded(tokenizer, [3, 17, 5, 16, 4, 18, 9])
    out = ppo.batched_logprobs(model, ids, mask, temperature=0.6, micro_batch_size=3)
    with torch.no_grad():
        padded, _ = ppo.forward_logprobs(model, ids, mask, 0.6)
    assert torch.allclose(out * mask, padded * mask, atol=1e-6)  # padding positions are never read
    assert ppo.plan_rows(ids, mask, 3).positions < ids.numel()


@pytest.fixture
def free_calls(monkeypatch):
    """Calls cost nothing in the row plans: the tiny rows of these tests (a few dozen positions) then take the
    buckets and the shared prompts, whose equivalence the tests check (at the default call costs they run whole)."""
    monkeypatch.setattr(ppo, "CALL_OVERHEAD_TOKENS", 0)
    monkeypatch.setattr(ppo, "CACHED_CALL_TOKENS", 0)


def test_bucketed_ppo_update_equals_one_padded_micro_batch(tokenizer, monkeypatch, free_calls):
    from rlzoo.distributed import Trained
    from rlzoo.rollout import RolloutBatch

    ids, mask = _right_padded(tokenizer, [6, 30, 8, 28, 7, 31, 29, 9], seed=1)
    ids[4:, :3] = ids[:4, :3]  # 4 prompts of 2 samples each: the shared path runs each prompt's first 2 tokens once
    response = mask.float()
    response[:, :3] = 0  # a 3-token prompt
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(ids.shape, generator=g) * response

    def update(one_group: bool):
        model = tiny_llama(tokenizer)
        with torch.no_grad():
            old, _ = ppo.forward_logprobs(model, ids, mask, 1.0)
        batch = RolloutBatch(input_ids=ids, attention_mask=mask, response_mask=response, token_rewards=response * 0,
                             scores=torch.zeros(8), group_ids=torch.arange(8) % 4, prompt_lens=torch.full((8,), 3),
                             step_starts=[[3]] * 8, problems=[None] * 8, response_texts=[""] * 8, finish_reasons=["stop"] * 8,
                             old_logprobs=old, ref_logprobs=old - 0.01)
        if one_group:
            monkeypatch.setattr(ppo, "CALL_OVERHEAD_TOKENS", 10**6)  # one call however padded
        cfg = ppo.PPOConfig(epochs=2, minibatches=2, micro_batch_size=4, share_prompts=not one_group)
        stats = ppo.ppo_update(Trained(model, lr=1e-2), batch, advantages, cfg, 1.0, torch.Generator().manual_seed(0), 1)
        return model, stats

    bucketed, stats = update(False)
    padded, padded_stats = update(True)
    assert stats["ppo/positions"] < padded_stats["ppo/positions"] <= 2 * ids.numel()
    for (name, a), b in zip(bucketed.named_parameters(), padded.parameters()):
        assert torch.allclose(a, b, atol=PARAM_ATOL), name
    for key, value in stats.items():
        assert key == "ppo/positions" or math.isclose(value, padded_stats[key], rel_tol=1e-5, abs_tol=1e-7), key


# ------------------------------------------------------------------------------ shared prompts


def _grouped_rows(tokenizer):
    """Right-padded rows of 4 distinct prompts (4, 7, 4 and 5 tokens; 3, 2, 3 and 1 samples) with responses of
    0 to 20 tokens, and their prompt lengths [B]."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in (4, 7, 4, 5)]
    owners, responses = [0, 0, 0, 1, 1, 2, 2, 2, 3], [5, 20, 0, 12, 3, 9, 1, 17, 6]
    rows = [prompts[o] + torch.randint(3, len(tokenizer), (r,), generator=g).tolist() for o, r in zip(owners, responses)]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    prompt_lens = torch.tensor([len(prompts[o]) for o in owners])
    response = mask * (torch.arange(L)[None] >= prompt_lens[:, None])  # [B, L]
    return ids, mask, prompt_lens, response


def _gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompts_give_the_log_probs_and_gradients_of_whole_rows(arch, tokenizer, free_calls):
    from rlzoo.distributed import Trained

    model = tiny_llama(tokenizer) if arch == "llama" else _gpt2(tokenizer)
    ids, mask, prompt_lens, response = _grouped_rows(tokenizer)
    plan = ppo.plan_rows(ids, mask, 3, prompt_lens)
    assert plan.prefix_ids.shape == (3, 6) and plan.owner.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, -1]  # the last runs whole
    assert plan.positions < ppo.plan_rows(ids, mask, 3).positions  # each prompt's first P - 1 tokens once
    shared = ppo.batched_logprobs(model, ids, mask, 0.6, 3, prompt_lens)
    whole = ppo.batched_logprobs(model, ids, mask, 0.6, 3)
    assert torch.allclose(shared * response, whole * response, atol=1e-5, rtol=0)
    assert (shared[mask == 0] == 0).all() and all((shared[i, : plan.start[i]] == 0).all() for i in range(len(ids)))  # nor at a shared prompt

    trained = Trained(model.train(), lr=1e-3)
    advantages = torch.randn(ids.shape, generator=torch.Generator().manual_seed(4)) * response
    score = lambda i, m, pos, cache: ppo.forward_logprobs(model, i, m, 1.0, True, pos, cache)  # noqa: E731
    grads = []
    for lens in (prompt_lens, None):
        model.zero_grad()
        (logprobs, entropy), positions = ppo.training_forward(trained, score, ppo.policy_prefill(model), ids, mask, lens)
        ((logprobs * advantages).sum() + (entropy * response).sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_a_one_token_prompt_or_a_prompt_of_one_row_shares_nothing(tokenizer):
    ids, mask, prompt_lens, _ = _grouped_rows(tokenizer)
    plan = ppo.plan_rows(ids, mask, 8, prompt_lens.clamp(max=1))
    assert plan.prefix_ids is None and plan.start.tolist() == [0] * 9
    assert plan.positions == ppo.plan_rows(ids, mask, 8).positions
    distinct = ppo.plan_rows(ids[[0, 3, 5, 8]], mask[[0, 3, 5, 8]], 8, prompt_lens[[0, 3, 5, 8]])  # one row per prompt
    assert distinct.prefix_ids is None


def test_sharing_is_kept_only_where_it_costs_less_than_its_calls(tokenizer, monkeypatch):
    ids, mask, prompt_lens, _ = _grouped_rows(tokenizer)
    plain = ppo.plan_rows(ids, mask, 3)
    monkeypatch.setattr(ppo, "CACHED_CALL_TOKENS", 0)
    monkeypatch.setattr(ppo, "CALL_OVERHEAD_TOKENS", 0)
    shared = ppo.plan_rows(ids, mask, 3, prompt_lens)
    assert shared.prefix_ids is not None and shared.positions < plain.positions
    saved = plain.positions - shared.positions  # a prefill call and calls continuing the cache must cost less than this
    monkeypatch.setattr(ppo, "CACHED_CALL_TOKENS", saved)
    assert ppo.plan_rows(ids, mask, 3, prompt_lens).prefix_ids is None
    monkeypatch.setattr(ppo, "CACHED_CALL_TOKENS", 0)
    monkeypatch.setattr(ppo, "CALL_OVERHEAD_TOKENS", saved)
    assert ppo.plan_rows(ids, mask, 3, prompt_lens).prefix_ids is None


def test_the_critic_predicts_the_same_values_with_shared_prompts(tokenizer, tmp_path, free_calls):
    from rlzoo.algorithms.value_ppo import ValueModel, ValuePPO

    tiny_llama(tokenizer).save_pretrained(tmp_path)
    ids, mask, prompt_lens, response = _grouped_rows(tokenizer)
    estimator = ValuePPO(micro_batch_size=3)
    estimator.critic = ValueModel(str(tmp_path))
    torch.nn.init.normal_(estimator.critic.head.weight)  # a critic that is not 0 everywhere
    shared, whole = estimator.predict(ids, mask, prompt_lens), estimator.predict(ids, mask)
    assert shared.abs().sum() > 0 and torch.allclose(shared * response, whole * response, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ a short run


@pytest.mark.parametrize("algo", ["grpo", "vineppo", "ppo"])
def test_a_short_run_gives_the_same_metrics_with_the_fast_paths_on_and_off(algo, tiny_policy_path, tmp_path, monkeypatch, free_calls):
    from test_train import SMALL, _group_size, _train

    bindings = SMALL + [_group_size(algo, 4), "ppo.micro_batch_size = 8"]  # 8 prompts x 4: several micro-batches
    assert _train(tmp_path / "fast", algo, tiny_policy_path, bindings) == 0
    with lean_llama.disabled():  # one padded micro-batch per pass and the old log-probs recomputed: what the loop ran before
        monkeypatch.setattr(ppo, "length_buckets", lambda lengths, max_rows, overhead_tokens=None: list(torch.arange(len(lengths)).split(max_rows)))
        assert _train(tmp_path / "plain", algo, tiny_policy_path, bindings + ['train.old_logprobs = "recompute"', "ppo.share_prompts = False"]) == 0
    fast, plain = ([r for r in runs.read_jsonl(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"] for name in ("fast", "plain"))
    for a, b in zip(fast, plain):
        assert a["batch/real_tokens"] == b["batch/real_tokens"] and a["reward/mean"] == b["reward/mean"]  # the same samples
        assert a["flops/update"] < b["flops/update"]  # padding left out
        assert a["flops/logprobs"] < b["flops/logprobs"]  # the old log-probs came with the samples
        for key, value in a.items():
            if key.startswith(("time/", "flops/", "memory/")) or not isinstance(value, float):
                continue
            assert math.isclose(value, b[key], rel_tol=METRIC_RTOL, abs_tol=1e-6), (key, value, b[key])
