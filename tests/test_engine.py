"""The sampling engines on tiny real transformers models: greedy equals model.generate(), samples follow
the model's distribution, stops / EOS / length end completions as documented, seeds reproduce, and
finished rows stop costing forward tokens."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from rlzoo.engine import ENGINES, SamplingParams
from rlzoo.engine.torch_engine import TorchEngine, sample_tokens, uniforms
from rlzoo.errors import UserError

ALPHABET = "0123456789+-*=?#\n abc"


def char_tokenizer():
    """A character-level PreTrainedTokenizerFast (pad, BOS, EOS, then one token per character)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *ALPHABET])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    backend.add_special_tokens(["<pad>", "<s>", "</s>"])
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, init: float = 0.2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, initializer_range=init,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine its spin-waits
    can make every op 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer)


def encode(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


PROMPTS = ["1+2?\n", "17+25*3?\n", "9?\n", "1+2?\n", "42-7*2+1?\n", "5*5?\n", "ab c?\n"]  # mixed lengths, one duplicate


def make_eos_follow(model, tokenizer, char: str) -> None:
    """Whenever greedy decoding would pick ``char``, it picks EOS instead: EOS's output row is 1.5 × that char's
    (argmax logits are positive), so greedy completions end at different, deterministic lengths."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = 1.5 * head[tokenizer.convert_tokens_to_ids(char)]


def greedy_reference(model, tokenizer, prompts, max_new_tokens):
    """model.generate() on the left-padded batch: per prompt, the tokens up to and including EOS."""
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row for row in out]


# ------------------------------------------------------------------------------------------- greedy


def test_greedy_equals_generate_and_recomputed_prefixes(model, tokenizer):
    make_eos_follow(model, tokenizer, "3")
    prompts = encode(tokenizer, PROMPTS)
    engine = ENGINES.get("torch")(model, tokenizer, max_batch_size=3)  # fewer rows per chunk than prompts × n
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=14))
    reference = greedy_reference(model, tokenizer, prompts, 14)
    assert len(out) == len(prompts) and all(len(group) == 2 for group in out)
    reasons = set()
    for prompt, group, ref in zip(prompts, out, reference):
        assert group[0].token_ids == group[1].token_ids == ref
        reasons.add(group[0].finish_reason)
        # every token is the argmax of a fresh forward over prompt + the tokens before it (no cache, no padding)
        with torch.no_grad():
            full = torch.tensor([prompt + ref])
            logits = model(full).logits[0, len(prompt) - 1 : -1]  # [T, V] predicts each generated token
        assert logits.argmax(-1).tolist() == ref
    assert reasons == {"stop", "length"}  # both endings occur, so rows left the batch at different steps


def test_stopped_rows_leaving_the_batch_do_not_disturb_the_others(model, tokenizer):
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(n=3, temperature=0.9, max_new_tokens=16, seed=5)
    free = TorchEngine(model, tokenizer).generate(prompts, params)
    stops = ("*", "44")
    stopped = TorchEngine(model, tokenizer, max_batch_size=4).generate(
        prompts, SamplingParams(n=3, temperature=0.9, max_new_tokens=16, seed=5, stop=stops))
    num_stopped = 0
    for free_group, stop_group in zip(free, stopped):
        for a, b in zip(free_group, stop_group):
            # the stopped run is the free run cut right after the token that first completes a stop string
            assert a.token_ids[: len(b.token_ids)] == b.token_ids
            text = tokenizer.decode(b.token_ids, skip_special_tokens=True)
            if b.finish_reason == "stop" and b.token_ids[-1] == tokenizer.eos_token_id:
                assert not any(s in text for s in stops)
            elif b.finish_reason == "stop":
                num_stopped += 1
                assert text.endswith(stops) and not any(s in tokenizer.decode(b.token_ids[:-1], skip_special_tokens=True) for s in stops)
                assert b.text == text[: min(i for i in (text.find(s) for s in stops) if i >= 0)]
            else:
                assert len(b.token_ids) == 16 and b.text == text and not any(s in text for s in stops)
    assert num_stopped > 3


# ------------------------------------------------------------------------------------------ sampling


def test_sample_tokens_top_p_keeps_exactly_the_top_mass():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])  # ranked: 1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1)
    logits = probs.log().expand(20000, 4)
    u = (torch.arange(20000) + 0.5) / 20000  # an even grid: frequencies are exact up to 1/20000
    for top_p, kept in [(0.35, [1]), (0.65, [1, 3]), (0.75, [1, 3, 2]), (1.0, [1, 3, 2, 0])]:
        freq = torch.bincount(sample_tokens(logits, 1.0, top_p, u), minlength=4).float() / 20000
        expected = torch.zeros(4)
        expected[kept] = probs[kept] / probs[kept].sum()
        assert torch.allclose(freq, expected, atol=1e-3), (top_p, freq)
    assert sample_tokens(logits[:3], 0.0, 0.5, None).tolist() == [1, 1, 1]  # temperature 0: argmax


def test_uniforms_are_uniform_and_independent_per_key_and_step():
    keys = torch.randint(-(2**63), 2**63 - 1, (50000,), generator=torch.Generator().manual_seed(0))
    a, b = uniforms(keys, 0), uniforms(keys, 1)
    assert 0 <= a.min() and a.max() < 1
    assert scipy_stats.kstest(a.numpy(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 0.02
    assert torch.equal(uniforms(keys[:10], 3), uniforms(keys, 3)[:10])  # a key's stream ignores its batch


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_first_token_follows_the_model_distribution(tokenizer, temperature, top_p):
    model = tiny_llama(tokenizer, init=0.5)  # peaked logits, so temperature and top-p visibly matter
    prompt = encode(tokenizer, ["17+25*3?\n"])[0]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1).double()
    ranked, order = probs.sort(descending=True)
    kept = order[(ranked.cumsum(0) - ranked) < top_p]
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()

    n = 6000
    engine = TorchEngine(model, tokenizer, max_batch_size=n)
    out = engine.generate([prompt], SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=1, seed=3))
    counts = np.bincount([c.token_ids[0] for c in out[0]], minlength=len(probs))
    assert set(np.flatnonzero(counts)) <= set(kept.tolist())  # nothing outside the top-p set, ever
    big = expected.numpy() * n >= 5  # chi-square wants >= 5 expected per bin: pool the rare tokens
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected.numpy()[big], expected.numpy()[~big].sum()) * n
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    assert scipy_stats.chisquare(observed, wanted).pvalue > 1e-3
    assert engine.stats.extra["prefill_tokens"] == len(prompt)  # 6000 samples, one prefill


def test_same_seed_same_tokens_whatever_the_batching(model, tokenizer):
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=11)
    ids = lambda out: [[c.token_ids for c in group] for group in out]  # noqa: E731
    first = ids(TorchEngine(model, tokenizer, max_batch_size=256).generate(prompts, params))
    assert first == ids(TorchEngine(model, tokenizer, max_batch_size=256).generate(prompts, params))
    assert first == ids(TorchEngine(model, tokenizer, max_batch_size=5).generate(prompts, params))
    assert first == ids(TorchEngine(model, tokenizer, share_prefixes=False).generate(prompts, params))
    other_first = encode(tokenizer, ["777*7777?\n"]) + prompts[1:]  # the other prompts do not matter
    assert first[1:] == ids(TorchEngine(model, tokenizer).generate(other_first, params))[1:]
    assert first[3:] == ids(TorchEngine(model, tokenizer).generate(prompts[3:], replace(params, first_index=3)))  # a split request
    assert first[0] != first[3]  # a duplicated prompt still gets its own samples
    other = ids(TorchEngine(model, tokenizer).generate(prompts, replace(params, seed=12)))
    assert sum(a != b for group_a, group_b in zip(first, other) for a, b in zip(group_a, group_b)) >= 18  # of 21


# ------------------------------------------------------------------------------------ endings, text


def test_eos_stop_string_and_length_endings(model, tokenizer):
    make_eos_follow(model, tokenizer, "3")
    prompts = encode(tokenizer, PROMPTS)
    engine = TorchEngine(model, tokenizer)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=14))
    for group in out:
        c = group[0]
        if c.finish_reason == "stop":  # EOS: kept in the token ids, not in the text
            assert c.token_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in c.token_ids[:-1]
            assert c.text == tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
        else:
            assert len(c.token_ids) == 14 and tokenizer.eos_token_id not in c.token_ids
    # A two-character stop string taken from the middle of a completion ends it right there.
    long = next(g[0] for g in out if g[0].finish_reason == "length")
    index = out.index(next(g for g in out if g[0] is long))
    text = tokenizer.decode(long.token_ids)
    stop = text[5:7]
    first = text.find(stop)
    cut = engine.generate([prompts[index]], SamplingParams(temperature=0, max_new_tokens=14, stop=(stop, "never")))[0][0]
    assert cut.finish_reason == "stop" and cut.text == text[:first]
    assert cut.token_ids == long.token_ids[: first + len(stop)]  # the completing token is the last one
    one = engine.generate([prompts[index]], SamplingParams(temperature=0, max_new_tokens=1))[0][0]
    assert one.finish_reason == "length" and one.token_ids == long.token_ids[:1]


@pytest.mark.parametrize("lean", [True, False], ids=["lean-llama-step", "transformers-forward"])
@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_sampled_tokens_come_with_their_log_probs_under_the_model(model, tokenizer, lean, temperature):
    """What the loop trains with as the sampling policy's log-probs (train.old_logprobs = "sampler"): each token's
    log-prob at the sampling temperature (before top-p), as a forward over prompt + completion gives it."""
    from rlzoo import lean_llama
    from rlzoo.ppo import forward_logprobs

    make_eos_follow(model, tokenizer, "7")  # greedy rows end at different steps: rows leave the batch mid-way
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(n=3, temperature=temperature, top_p=0.9, max_new_tokens=10, seed=5, logprobs=True)
    with contextlib.nullcontext() if lean else lean_llama.disabled():
        groups = TorchEngine(model, tokenizer, max_batch_size=4).generate(prompts, params)
    assert {len(c.token_ids) for g in groups for c in g} != {10}  # some stopped early
    for prompt, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                expected = forward_logprobs(model, ids, torch.ones_like(ids), temperature)[0][0, len(prompt):]
            assert len(c.logprobs) == len(c.token_ids)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)
    unscored = TorchEngine(model, tokenizer).generate(prompts[:2], replace(params, logprobs=False))
    assert all(c.logprobs is None for g in unscored for c in g)


def test_finished_rows_leave_the_batch(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    with torch.no_grad():  # nearly uniform next tokens, EOS included: lengths spread over 1..max_new_tokens
        model.get_output_embeddings().weight.mul_(0.01)
    prompts = encode(tokenizer, ["12+34?\n", "56+78?\n"])  # same length: no padding in the prefill
    params = SamplingParams(n=32, temperature=1.0, max_new_tokens=40, seed=0)

    engine = TorchEngine(model, tokenizer)
    out = engine.generate(prompts, params)
    lengths = [len(c.token_ids) for group in out for c in group]
    assert min(lengths) < 10 and sum(n == 40 for n in lengths) < len(lengths) / 2  # mixed lengths
    # Each row feeds back every token but its last, then leaves; the prompts are prefilled once, not once per sample.
    assert engine.stats.extra["prefill_tokens"] == 2 * len(prompts[0])
    assert engine.stats.forward_tokens == 2 * len(prompts[0]) + sum(n - 1 for n in lengths)
    assert engine.stats.tokens_generated == sum(lengths)
    assert engine.stats.forward_tokens < 0.6 * 64 * 40  # far below every row running to the end


# --------------------------------------------------------------------------------------- interface


def test_training_mode_is_restored_and_sync_weights_switches_model(model, tokenizer):
    engine = TorchEngine(model, tokenizer)
    model.train()
    prompts = encode(tokenizer, ["1+2?\n"])
    before = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))[0][0].token_ids
    assert model.training
    other = tiny_llama(tokenizer, seed=7)
    engine.sync_weights(other)
    after = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))[0][0].token_ids
    assert after == greedy_reference(other, tokenizer, prompts, 8)[0] != before


@pytest.mark.parametrize("bad", [dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(max_new_tokens=0), dict(stop=("",)), dict(max_new_tokens=400)])
def test_bad_parameters_are_user_errors(model, tokenizer, bad):
    with pytest.raises(UserError):
        TorchEngine(model, tokenizer).generate(encode(tokenizer, ["1?\n"]), SamplingParams(**bad))


def test_bad_prompts_are_user_errors(model, tokenizer):
    engine = TorchEngine(model, tokenizer)
    with pytest.raises(UserError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(UserError, match="vocabulary"):
        engine.generate([[1, 999]], SamplingParams())


def test_vllm_engine_without_cuda_is_a_user_error(model, tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU tests below cover the vllm engine")
    with pytest.raises(UserError, match="CUDA"):
        ENGINES.get("vllm")(model, tokenizer)


# --------------------------------------------------------------------------------------------- vLLM


@pytest.mark.gpu
def test_vllm_engine_matches_torch_greedy_and_syncs_weights(tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    model = tiny_llama(tokenizer, hidden=128, layers=2).cuda()  # head_dim 32: what vLLM's attention kernels support
    make_eos_follow(model, tokenizer, "3")
    engine = ENGINES.get("vllm")(model, tokenizer, max_batch_size=32, gpu_memory_utilization=0.2)
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    torch_out = TorchEngine(model, tokenizer).generate(prompts, params)
    vllm_out = engine.generate(prompts, params)
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(torch_out, vllm_out))
    assert same >= len(prompts) - 1  # fp32 on both sides; allow one near-tie to flip
    assert all(b[0].finish_reason == a[0].finish_reason for a, b in zip(torch_out, vllm_out) if a[0].token_ids == b[0].token_ids)

    other = tiny_llama(tokenizer, seed=9, hidden=128, layers=2).cuda()
    engine.sync_weights(other)  # in place, and the prefix cache of the old weights is dropped
    torch_new = TorchEngine(other, tokenizer).generate(prompts, params)
    vllm_new = engine.generate(prompts, params)
    assert sum(a[0].token_ids == b[0].token_ids for a, b in zip(torch_new, vllm_new)) >= len(prompts) - 1
    assert sum(a[0].token_ids != b[0].token_ids for a, b in zip(vllm_out, vllm_new)) >= len(prompts) - 1

    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, stop=("=",), seed=1)
    sampled = engine.generate(prompts[:2], params)
    assert [[c.token_ids for c in g] for g in sampled] == [[c.token_ids for c in g] for g in engine.generate(prompts[:2], params)]
    for c in (c for g in sampled for c in g):
        assert "=" not in c.text
        assert c.finish_reason == "stop" or len(c.token_ids) == 12
