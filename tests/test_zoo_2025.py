"""The strategies of issue 15 against the known-probability toy (``toy.py``): adaptive VinePPO's values
(unbiased where it claims to be, and the bias where it does not), SPO-chain's segments and probability mask,
PRIME's implicit process rewards and their training."""

import math
from itertools import product

import torch

from rlzoo.algorithms import build_estimator
from rlzoo.algorithms.vineppo_adaptive import gms_estimate
from rlzoo.rollout import step_advantages
from test_estimators import _toy_batch_and_ctx
from toy import true_value

# ----------------------------------------------------------------------------- vineppo_adaptive


def _plan_expectation(p: float, k_first: int, n: int, estimate) -> float:
    """E[estimate] under the plan: k_first draws, stop if they agree, else n draws in all; exact, by enumeration."""
    expected = 0.0
    for draws in product((0, 1), repeat=n):
        pilot = draws[:k_first]
        seen = pilot if len(set(pilot)) == 1 else draws
        if len(seen) < n and draws[k_first:] != (0,) * (n - k_first):  # a stopped path: count it once
            continue
        prob = math.prod(p if d else 1 - p for d in seen)
        expected += prob * estimate(len(seen), sum(seen))
    return expected


def test_gms_estimate_is_exactly_unbiased_where_the_plain_mean_of_a_stopped_plan_is_not():
    for p in (0.1, 0.3, 0.5, 0.8):
        for n in (3, 6, 8):
            gms = _plan_expectation(p, 3, n, lambda m, s: gms_estimate(m, s, 3))
            assert abs(gms - p) < 1e-12, (p, n, gms)
    mean = _plan_expectation(0.3, 3, 9, lambda m, s: s / m)
    assert abs(mean - 0.244) < 1e-3  # the bias the docstring quotes: agreeing pilots kept, mixed ones diluted
    assert abs(_plan_expectation(0.5, 3, 9, lambda m, s: s / m) - 0.5) < 1e-12  # by symmetry only


def _adaptive_errors(seeds, **kw):
    errors: dict[str, list[float]] = {}
    spent = []
    for seed in range(seeds):
        batch, ctx = _toy_batch_and_ctx(seed, 0)
        est = build_estimator("vineppo_adaptive", group_size=4, **kw)
        credit = est.advantages(batch, ctx)
        spent.append((credit.stats["mc_continuations"], credit.stats["mc_unique_states"], ctx.tokens["mc"]))
        for b in range(batch.size):
            starts, text = batch.step_starts[b], batch.response_texts[b]
            step_v = [credit.values[b, s].item() for s in starts]
            for t, v in enumerate(step_v):
                errors.setdefault(text[: 2 * t], []).append(v - true_value(text[: 2 * t]))
            ends = starts[1:] + [int(batch.last_token_index()[b]) + 1]
            for s, e, a in zip(starts, ends, step_advantages(step_v, batch.scores[b].item())):
                assert torch.allclose(credit.advantages[b, s:e], torch.full((e - s,), a), atol=1e-6)
    return errors, spent


def test_vineppo_adaptive_values_are_unbiased_and_spend_at_most_the_budget():
    errors, spent = _adaptive_errors(300, k_first=3, round_size=3, budget=4.5, k_max=12)
    for state, errs in errors.items():
        e = torch.tensor(errs, dtype=torch.float64)
        se = e.std().item() / len(e) ** 0.5
        assert abs(e.mean().item()) <= 3.5 * se + 1e-9, (state, e.mean().item(), se)
    assert all(c <= 4.5 * u for c, u, _ in spent)
    # the prompt-only state (V = 0.162) is mixed most of the time and gets more than the pilot; "b..." states settle at 3
    assert sum(c for c, _, _ in spent) > 3 * sum(u for _, u, _ in spent)


def test_vineppo_adaptive_plain_mean_with_early_stopping_is_biased_on_the_toy():
    # Most-uncertain-first allocation and the plain mean: the root state's (V = 0.162) estimate is pulled away.
    errors, _ = _adaptive_errors(300, k_first=3, round_size=3, budget=30, k_max=9, unbiased=False)
    root = torch.tensor(errors[""], dtype=torch.float64)
    se = root.std().item() / len(root) ** 0.5
    assert abs(root.mean().item()) > 3 * se, (root.mean().item(), se)


def test_vineppo_adaptive_stops_agreeing_states_and_halves_mc_tokens_of_fixed_k9():
    batch, ctx = _toy_batch_and_ctx(5, 0)
    fixed = build_estimator("vineppo", k=9, group_size=4).advantages(batch, ctx)
    fixed_tokens = ctx.tokens["mc"]
    batch, ctx = _toy_batch_and_ctx(5, 0)
    credit = build_estimator("vineppo_adaptive", group_size=4).advantages(batch, ctx)
    assert credit.stats["mc_tokens"] == ctx.tokens["mc"] and ctx.tokens["mc"] <= fixed_tokens / 2
    assert credit.stats["mc_continuations"] <= 4.5 * credit.stats["mc_unique_states"]
    assert credit.stats["mc_unique_states"] == fixed.stats["mc_unique_states"]
    # a state after "b" is worth 0: its 3 pilots agree and it gets no more (its value is exactly 0)
    for b in range(batch.size):
        if batch.response_texts[b].startswith("b"):
            assert credit.values[b, batch.step_starts[b][1]].item() == 0.0


# ----------------------------------------------------------------------------- spo_chain

P_GOOD_STEPS = __import__("toy").P_GOOD


def _with_known_logprobs(batch):
    """The toy policy's log-prob of each response token: "g"/"b" at step t with P_GOOD[t] / 1 - P_GOOD[t]; newline
    and EOS are certain. Cutpoints (p < 0.95) are exactly the step's first token."""
    logprobs = torch.zeros_like(batch.response_mask)
    for b in range(batch.size):
        start = int(batch.prompt_lens[b])
        for i, c in enumerate(batch.response_texts[b]):
            if c in "gb":
                p = P_GOOD_STEPS[i // 2]
                logprobs[b, start + i] = math.log(p if c == "g" else 1 - p)
    batch.old_logprobs = logprobs
    return batch


def test_spo_chain_values_segment_boundaries_without_bias_and_credits_only_cutpoints():
    k, seeds, errors = 8, 150, {}
    for seed in range(seeds):
        batch, ctx = _toy_batch_and_ctx(seed, k)
        batch = _with_known_logprobs(batch)
        credit = build_estimator("spo_chain", k=k, group_size=4, prob_threshold=0.95, cutpoint_interval=1).advantages(batch, ctx)
        cut = (batch.old_logprobs.exp() < 0.95) & (batch.response_mask > 0)
        assert torch.equal(credit.loss_mask, cut.float())
        assert torch.all(credit.advantages[~cut] == 0)
        for b in range(batch.size):
            starts, text = batch.step_starts[b], batch.response_texts[b]  # one cutpoint per step: segments are steps
            v = [credit.values[b, s].item() for s in starts]
            for t, value in enumerate(v):
                errors.setdefault(text[: 2 * t], []).append(value - true_value(text[: 2 * t]))
            for s, a in zip(starts, step_advantages(v, batch.scores[b].item())):
                assert abs(credit.advantages[b, s].item() - a) < 1e-6  # A_k = V(s_{k+1}) - V(s_k) on the cutpoint
                assert credit.values[b, s + 1].item() == credit.values[b, s].item()  # the newline is in the same segment
    for state, errs in errors.items():
        p = true_value(state)
        se = (p * (1 - p) / k / len(errs)) ** 0.5
        assert abs(sum(errs) / len(errs)) <= 3 * se + 1e-9, (state, sum(errs) / len(errs), se)


def test_spo_chain_groups_cutpoints_into_segments_and_skips_confident_tokens():
    batch, ctx = _with_known_logprobs(_toy_batch_and_ctx(7, 4)[0]), _toy_batch_and_ctx(7, 4)[1]
    credit = build_estimator("spo_chain", k=4, group_size=4, prob_threshold=0.95, cutpoint_interval=2).advantages(batch, ctx)
    assert credit.stats["mc_states"] == 2 * batch.size  # boundaries before steps 0 and 2
    for b in range(batch.size):
        s0, s1, s2 = batch.step_starts[b]
        v0, v2 = credit.values[b, s0].item(), credit.values[b, s2].item()
        assert credit.values[b, s1].item() == v0  # step 1 is in segment 0
        assert abs(credit.advantages[b, s0].item() - (v2 - v0)) < 1e-6 and abs(credit.advantages[b, s1].item() - (v2 - v0)) < 1e-6
        assert abs(credit.advantages[b, s2].item() - (batch.scores[b].item() - v2)) < 1e-6
    # at the paper's threshold 0.9, step 0's "g" (p = 0.9) is confident: not a cutpoint, and gets no credit
    batch, ctx = _with_known_logprobs(_toy_batch_and_ctx(7, 4)[0]), _toy_batch_and_ctx(7, 4)[1]
    credit = build_estimator("spo_chain", k=4, group_size=4, cutpoint_interval=1).advantages(batch, ctx)
    for b in range(batch.size):
        s0 = batch.step_starts[b][0]
        if batch.response_texts[b][0] == "g":
            assert credit.loss_mask[b, s0] == 0 and credit.advantages[b, s0] == 0
            assert credit.values[b, s0].item() == credit.values[b, batch.step_starts[b][1]].item()  # V̂ of the first boundary


# ----------------------------------------------------------------------------- prime


def test_prime_advantages_match_the_papers_formula_by_a_plain_loop():
    from rlzoo.algorithms.prime import prime_advantages

    gen = torch.Generator().manual_seed(0)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    B, L = len(groups), 9
    mask = torch.zeros(B, L)
    spans = [(2, 9), (2, 5), (3, 8), (1, 4), (2, 9), (4, 6), (1, 9)]
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = 1
    rewards = torch.randn(B, L, generator=gen) * mask
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    adv, _ = prime_advantages(rewards, outcome, mask, groups, process_coef=0.7, outcome_coef=1.3)
    for b, (s, e) in enumerate(spans):
        others = [j for j in range(B) if groups[j] == groups[b] and j != b]
        r_bar = sum(rewards[j, spans[j][0] : spans[j][1]].mean().item() for j in others) / len(others)
        o_base = sum(outcome[j].item() for j in others) / len(others)
        for t in range(L):
            want = 0.0
            if s <= t < e:
                want = 0.7 * sum(rewards[b, u].item() - r_bar for u in range(t, e)) + 1.3 * (outcome[b].item() - o_base)
            assert abs(adv[b, t].item() - want) < 1e-5, (b, t)


def _toy_prm_setup(tmp_path, seed=0):
    """PRIME on the toy: an implicit PRM from a tiny random Llama over the toy's characters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    batch, ctx = _toy_batch_and_ctx(seed, 0)
    tok = ctx.tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "toy-policy")
    ctx.model_path = str(tmp_path / "toy-policy")
    return ctx


def test_prime_implicit_prm_learns_the_toys_outcomes_and_credits_the_wrong_step(tmp_path):
    ctx = _toy_prm_setup(tmp_path)
    prime = build_estimator("prime", group_size=4, beta=0.5, prm_lr=3e-3, prm_minibatches=1)
    prime.setup(ctx)
    assert "prm" in ctx.trained
    first = None
    for it in range(40):
        batch, _ = _toy_batch_and_ctx(1000 + it, 0)
        ctx.iteration = it
        credit = prime.advantages(batch, ctx)
        if first is None:  # φ = ref at the start: no process reward, only the outcome's RLOO advantage, V̂ = 0.5
            assert torch.all(credit.values[batch.response_mask > 0] == 0.5)
            from rlzoo.algorithms.rloo import rloo_advantages

            rloo = rloo_advantages(batch.scores, batch.group_ids)[:, None] * batch.response_mask
            assert torch.allclose(credit.advantages, rloo, atol=1e-6)
        stats = prime.update_critic(batch, credit, ctx)
        first = first if first is not None else stats["critic/loss"]
    assert stats["critic/loss"] < 0.7 * first, (first, stats["critic/loss"])
    # Credit on held-out toy responses: the token "b" (the step that loses the reward) gets a lower process
    # reward than a "g" at the same step, and the PRM's V̂ after it is lower.
    b_rewards, g_rewards, after_b, after_g = [], [], [], []
    for seed in range(5000, 5010):
        batch, _ = _toy_batch_and_ctx(seed, 0)
        credit = prime.advantages(batch, ctx)
        ref = batch.extra["prime_ref_logprobs"]
        log_ratio = prime._logprobs(prime.critic, batch, ctx.device) - ref
        for b in range(batch.size):
            for t, s in enumerate(batch.step_starts[b]):
                char = batch.response_texts[b][2 * t]
                (b_rewards if char == "b" else g_rewards).append(log_ratio[b, s].item())
                if s + 2 < batch.input_ids.shape[1] and batch.response_mask[b, s + 2] > 0:
                    (after_b if char == "b" else after_g).append(credit.values[b, s + 2].item())
    mean = lambda x: sum(x) / len(x)  # noqa: E731
    assert mean(b_rewards) < mean(g_rewards)
    assert mean(after_b) < mean(after_g)


def test_prime_needs_two_samples_per_prompt():
    import pytest

    from rlzoo.errors import UserError

    with pytest.raises(UserError, match="group_size"):
        build_estimator("prime", group_size=1)


# ----------------------------------------------------------------------------- spo_tree


class SegmentingEngine(__import__("toy").KnownPolicyEngine):
    """The toy policy, stopping at ``max_new_tokens`` ("length") as a real engine does: SPO-tree cuts segments so."""

    def generate(self, prompts, params, budgets=None):
        out = super().generate(prompts, params)
        for group, budget in zip(out, budgets or [params.max_new_tokens] * len(out)):
            for j, c in enumerate(group):
                if len(c.token_ids) > budget:
                    ids = c.token_ids[:budget]
                    group[j] = type(c)(ids, self.tokenizer.decode(ids, skip_special_tokens=True), "length")
        return out


def _tree_batch(seed, branch_factors=(3, 3, 3), engine=None, policy=None):
    from rlzoo.engine import SamplingParams
    from rlzoo.tasks import Problem

    _, ctx = _toy_batch_and_ctx(seed, 0)
    ctx.engine, ctx.policy = (engine or SegmentingEngine)(ctx.tokenizer, ctx.engine.prompt_len), policy
    ctx.sampling = SamplingParams(n=1, seed=seed, max_new_tokens=8)
    est = build_estimator("spo_tree", branch_factors=branch_factors, segment_tokens=2)  # one toy step per segment
    batch = est.sample([Problem(f"toy/{i}", "Q", "") for i in range(2)], ctx)
    return est, batch, ctx


def test_spo_tree_samples_a_tree_of_segments_and_counts_shared_tokens_once():
    est, batch, ctx = _tree_batch(0)
    assert est.group_size == 27 and batch.group_ids.tolist() == sorted(batch.group_ids.tolist())
    paths = batch.extra["tree_paths"]
    for b, path in enumerate(paths):
        text = batch.response_texts[b]
        assert batch.scores[b].item() == float(text == "g\ng\ng\n")
        assert len(path) - 1 == len(text) // 2  # one segment per step, and a "b" ends nothing early: 3 segments
        # siblings share their prefix tokens exactly
        for c, other in enumerate(paths):
            if other[:2] == path[:2]:
                s = int(batch.prompt_lens[b])
                assert torch.equal(batch.input_ids[b, : s + 2], batch.input_ids[c, : s + 2])
    assert batch.size == 2 * 27
    assert ctx.tokens["policy"] == 2 * (3 * 2 + 9 * 2 + 27 * 3)  # segments generated once, the last with its EOS


def test_spo_tree_node_values_are_unbiased_and_advantages_are_child_minus_parent():
    errors: dict[str, list[float]] = {}
    for seed in range(150):
        est, batch, ctx = _tree_batch(seed)
        credit = est.advantages(batch, ctx)
        values = est.node_values(batch.extra["tree_paths"], batch.scores.tolist())
        seen, valued = set(), set()
        for b, path in enumerate(batch.extra["tree_paths"]):
            s0, text = int(batch.prompt_lens[b]), batch.response_texts[b]
            for d in range(1, len(path)):
                s = s0 + 2 * (d - 1)
                a = values[path[: d + 1]] - values[path[:d]]
                assert abs(credit.advantages[b, s].item() - a) < 1e-6 and abs(credit.advantages[b, s + 1].item() - a) < 1e-6
                assert abs(credit.values[b, s].item() - values[path[:d]]) < 1e-6
                first = path[: d + 1] not in seen
                seen.add(path[: d + 1])
                assert credit.loss_mask[b, s].item() == float(first and a != 0)  # each edge once, zero-advantage ones dropped
                if path[:d] not in valued:
                    valued.add(path[:d])
                    # a parent is an internal node: the mean of a subtree of rollouts from its state
                    errors.setdefault(text[: 2 * (d - 1)], []).append(values[path[:d]] - true_value(text[: 2 * (d - 1)]))
    assert set(errors) >= {"", "g\n", "b\n", "g\ng\n"}
    for state, errs in errors.items():
        e = torch.tensor(errs, dtype=torch.float64)
        se = e.std().item() / len(e) ** 0.5
        assert abs(e.mean().item()) <= 3.5 * se + 1e-9, (state, e.mean().item(), se)


def test_spo_chain_takes_token_probabilities_from_the_policy_when_the_batch_has_none(tiny_policy_path):
    # The audit hands estimators batches without old log-probs: SPO-chain then asks the policy, at the sampler's temperature.
    import gin

    from rlzoo.engine import ENGINES, SamplingParams
    from rlzoo.policy import load_policy
    from rlzoo.ppo import batched_logprobs
    from rlzoo.rollout import EstimatorContext, sample_groups
    from rlzoo.tasks import get_task
    from conftest import TINY_ARITH

    gin.parse_config(TINY_ARITH)
    policy, tok = load_policy(str(tiny_policy_path))
    task = get_task("arith")
    ctx = EstimatorContext(policy=policy, tokenizer=tok, engine=ENGINES.get("torch")(policy, tok, max_batch_size=64), task=task,
                           sampling=SamplingParams(n=2, temperature=0.6, top_p=0.9, max_new_tokens=task.max_new_tokens,
                                                   stop=task.stop, seed=3),
                           model_path=str(tiny_policy_path), device=torch.device("cpu"), seed=0)
    batch = sample_groups(task.problems("train")[:4], ctx)
    assert batch.old_logprobs is None and ctx.tokens["policy"] > 0
    est = build_estimator("spo_chain", k=2, group_size=2, cutpoint_interval=1)
    without = est.advantages(batch, ctx)
    batch.old_logprobs = batched_logprobs(policy, batch.input_ids, batch.attention_mask, 0.6, 64)
    with_ = est.advantages(batch, ctx)
    assert torch.equal(without.loss_mask, with_.loss_mask) and without.loss_mask.sum() > 0
    assert torch.equal(without.advantages, with_.advantages)


def test_spo_tree_keeps_every_response_within_its_budget_and_the_models_context():
    """As the default sampling: prompts by encode_prompts, each response within max_new_tokens and never past the
    model's context; every segment asks the engine for no more than what is left of its response's budget."""
    from types import SimpleNamespace

    from rlzoo.tasks import Problem, encode_prompts

    _, batch_ctx = _toy_batch_and_ctx(0, 0)
    prompt_len = len(encode_prompts(batch_ctx.tokenizer, batch_ctx.task, [Problem("toy/0", "Q", "")])[0])
    asked = []

    class Recording(SegmentingEngine):
        def generate(self, prompts, params, budgets=None):
            asked.extend(zip(map(len, prompts), budgets))
            return super().generate(prompts, params, budgets)

    for context, longest in ((None, 7), (prompt_len + 5, 5)):  # the toy's responses: 6 tokens and EOS
        est, batch, ctx = _tree_batch(1, engine=Recording, policy=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context)))
        assert batch.prompt_lens.tolist() == [prompt_len] * batch.size
        assert int(batch.response_lens().max()) == longest and batch.size == 2 * 27  # segments of 2, 2 and the rest
        assert all(n + b <= (context or 10**9) and n - prompt_len + b <= 8 for n, b in asked)
        asked.clear()
