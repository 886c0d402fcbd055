"""Estimators against closed forms: GAE vs a plain loop, group baselines per group, VinePPO's MC
values on a toy whose state values are known exactly."""


import pytest
import torch

from rlzoo.algorithms import ESTIMATORS, build_estimator
from rlzoo.algorithms.grpo import grpo_advantages
from rlzoo.algorithms.rloo import rloo_advantages
from rlzoo.algorithms.value_ppo import gae
from rlzoo.algorithms.vineppo import step_advantages
from rlzoo.engine import SamplingParams
from rlzoo.errors import UserError
from rlzoo.policy import build_char_tokenizer
from rlzoo.rollout import EstimatorContext, build_batch
from rlzoo.tasks import Problem
from toy import KnownPolicyEngine, StepTask, true_value

TOY_ALPHABET = "gb\nQ"


def test_gae_matches_a_plain_python_loop():
    torch.manual_seed(0)
    B, L = 5, 12
    values, rewards = torch.randn(B, L), torch.randn(B, L)
    mask = torch.zeros(B, L)
    spans = [(2, 12), (3, 9), (1, 2), (4, 11), (5, 12)]  # a response of one token included
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = 1
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)]:
        adv, ret = gae(rewards, values * mask, mask, gamma, lam)
        for b, (s, e) in enumerate(spans):
            running, expected = 0.0, {}
            for t in reversed(range(s, e)):
                next_v = values[b, t + 1].item() if t + 1 < e else 0.0
                delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
                running = delta + gamma * lam * running
                expected[t] = running
            for t in range(L):
                want = expected.get(t, 0.0)
                assert abs(adv[b, t].item() - want) < 1e-5
                if t in expected:
                    assert abs(ret[b, t].item() - (want + values[b, t].item())) < 1e-5


GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 3, 3])
SCORES = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0])


def _closed_form(fn):
    out = torch.zeros_like(SCORES)
    for g in GROUPS.unique():
        rows = (GROUPS == g).nonzero().squeeze(-1).tolist()
        r = [SCORES[i].item() for i in rows]
        for j, i in enumerate(rows):
            out[i] = fn(r, j)
    return out


def test_grpo_dr_grpo_and_rloo_match_their_per_group_closed_forms():
    eps = 1e-6

    def grpo(r, j):
        if len(r) == 1:
            return 0.0
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5
        return (r[j] - mean) / (std + eps)

    def dr_grpo(r, j):
        return r[j] - sum(r) / len(r)

    def rloo(r, j):
        return 0.0 if len(r) == 1 else r[j] - (sum(r) - r[j]) / (len(r) - 1)

    assert torch.allclose(grpo_advantages(SCORES, GROUPS, eps, scale=True), _closed_form(grpo), atol=1e-5)
    assert torch.allclose(grpo_advantages(SCORES, GROUPS, 0.0, scale=False), _closed_form(dr_grpo), atol=1e-6)
    assert torch.allclose(rloo_advantages(SCORES, GROUPS), _closed_form(rloo), atol=1e-6)
    # an all-equal group (group 1) and a group of one (group 2) get advantage exactly 0, never NaN
    for adv in (grpo_advantages(SCORES, GROUPS, eps, True), rloo_advantages(SCORES, GROUPS)):
        assert torch.all(adv[4:8] == 0) and torch.isfinite(adv).all()


def test_an_all_equal_group_of_graded_rewards_gets_exactly_zero_advantage():
    # float32 means and stds of equal non-binary rewards are off by rounding (eight 0.3s: mean 0.30000001), which the
    # std division used to turn into advantages of 0.03-0.15; mixed groups beside them keep their advantages.
    groups = torch.arange(6).repeat_interleave(8)  # [48]: 6 prompts x 8 samples
    scores = torch.cat([torch.full((8,), r) for r in (0.3, 0.7, 0.1, 1 / 3, 0.9)] + [torch.linspace(0, 0.7, 8)])
    for adv in (grpo_advantages(scores, groups, 1e-6, scale=True), grpo_advantages(scores, groups, 0.0, scale=False),
                rloo_advantages(scores, groups)):
        assert torch.all(adv[:40] == 0)
        assert torch.all(adv[40:] != 0)


def test_group_advantages_of_binary_rewards_are_bit_identical_to_the_plain_arithmetic():
    # Committed leaderboards ran on binary rewards: the all-equal check must not move a single bit of their advantages.
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(64).repeat_interleave(8)
    scores = (torch.rand(512, generator=gen) < torch.rand(64, generator=gen).repeat_interleave(8)).float()
    scores[:16] = 1.0  # two all-correct groups and ...
    scores[16:32] = 0.0  # ... two all-wrong ones
    n = torch.zeros(64).index_add_(0, groups, torch.ones(512))
    mean = (torch.zeros(64).index_add_(0, groups, scores) / n)[groups]
    std = torch.sqrt(torch.zeros(64).index_add_(0, groups, (scores - mean) ** 2) / (n - 1))[groups]
    assert torch.equal(grpo_advantages(scores, groups, 1e-6, scale=True), (scores - mean) / (std + 1e-6))
    assert torch.equal(grpo_advantages(scores, groups, 0.0, scale=False), scores - mean)
    assert torch.equal(rloo_advantages(scores, groups), scores - (mean * 8 - scores) / 7)


def test_every_builtin_strategy_is_registered_and_unknown_names_list_them():
    for name in ["ppo", "grpo", "dr_grpo", "rloo", "vineppo", "reinforce", "remax", "reinforce_pp"]:
        assert name in ESTIMATORS
    from rlzoo.errors import UserError

    with pytest.raises(UserError, match="known: .*grpo.*vineppo"):
        build_estimator("vinepp")


# ----------------------------------------------------------------------------- VinePPO toy

def _toy_batch_and_ctx(seed, k):
    tokenizer = build_char_tokenizer(TOY_ALPHABET)
    task = StepTask()
    prompt_ids = [tokenizer("Q", add_special_tokens=True)["input_ids"]] * 2
    engine = KnownPolicyEngine(tokenizer, len(prompt_ids[0]))
    problems = [Problem(f"toy/{i}", "Q", "") for i in range(2)]
    completions = engine.generate(prompt_ids, SamplingParams(n=4, seed=seed))
    scores = task.score(None, [c.text for g in completions for c in g])
    batch = build_batch(tokenizer, task, problems, prompt_ids, completions, scores)
    ctx = EstimatorContext(policy=None, tokenizer=tokenizer, engine=engine, task=task,
                           sampling=SamplingParams(n=4, seed=seed + 1, max_new_tokens=6), model_path="",
                           device=torch.device("cpu"), seed=seed)
    return batch, ctx


def test_vineppo_mc_values_are_unbiased_and_advantages_are_value_differences():
    k, seeds = 16, 200
    errors_by_state: dict[str, list[float]] = {}
    for seed in range(seeds):
        batch, ctx = _toy_batch_and_ctx(seed, k)
        credit = build_estimator("vineppo", k=k, group_size=4).advantages(batch, ctx)
        for b in range(batch.size):
            starts = batch.step_starts[b]
            assert len(starts) == 3 and starts[0] == int(batch.prompt_lens[b])
            text = batch.response_texts[b]
            step_v = [credit.values[b, s].item() for s in starts]
            for t, v in enumerate(step_v):
                errors_by_state.setdefault(text[: 2 * t], []).append(v - true_value(text[: 2 * t]))
            # every token of step t carries A_t = V(s_{t+1}) - V(s_t), the last step R - V(s_last)
            expected = step_advantages(step_v, batch.scores[b].item())
            ends = starts[1:] + [int(batch.last_token_index()[b]) + 1]
            for s, e, a in zip(starts, ends, expected):
                assert torch.allclose(credit.advantages[b, s:e], torch.full((e - s,), a), atol=1e-6)
    for state, errs in errors_by_state.items():
        errs_t = torch.tensor(errs)
        p = true_value(state)
        standard_error = (p * (1 - p) / k / len(errs)) ** 0.5
        assert abs(errs_t.mean().item()) <= 3 * standard_error + 1e-9, (state, errs_t.mean().item(), standard_error)


def test_vineppo_values_identical_states_once_and_counts_mc_tokens():
    batch, ctx = _toy_batch_and_ctx(seed=3, k=5)
    calls = []
    original = ctx.engine.generate
    ctx.engine.generate = lambda prompts, params, budgets=None: calls.append(len(prompts)) or original(prompts, params, budgets)
    credit = build_estimator("vineppo", k=5, group_size=4).advantages(batch, ctx)
    states = {tuple(batch.input_ids[b, :s].tolist()) for b in range(batch.size) for s in batch.step_starts[b]}
    assert calls == [len(states)]  # the prompt-only state, shared by all 8 responses, rolled out once
    assert credit.stats["mc_states"] == 3 * batch.size and credit.stats["mc_unique_states"] == len(states)
    assert ctx.tokens["mc"] > 0 and ctx.tokens["policy"] == 0


def test_vineppo_caps_valued_steps():
    batch, ctx = _toy_batch_and_ctx(seed=4, k=5)
    credit = build_estimator("vineppo", k=5, group_size=4, max_valued_steps=1).advantages(batch, ctx)
    for b in range(batch.size):
        starts = batch.step_starts[b]
        # states past the cap take the final reward, so steps 1.. get advantage R - R = 0 ...
        assert torch.all(credit.advantages[b, starts[1]:] == 0)
        # ... and step 0 gets R - V(s_0)
        assert abs(credit.advantages[b, starts[0]].item() - (batch.scores[b].item() - credit.values[b, starts[0]].item())) < 1e-6


def test_the_critic_can_follow_the_policys_learning_rate_schedule(tiny_policy_path):
    """The reference trains its critic with the actor's schedule (value_ppo.critic_lr_schedule = "policy")."""
    import gin

    from rlzoo.algorithms import build_estimator
    from rlzoo.policy import load_policy
    from rlzoo.rollout import EstimatorContext

    policy, tokenizer = load_policy(str(tiny_policy_path))
    ctx = EstimatorContext(policy=policy, tokenizer=tokenizer, engine=None, task=None, sampling=SamplingParams(),
                           model_path=str(tiny_policy_path), device=torch.device("cpu"), seed=0)
    ctx.prepare("policy", policy, lr=1e-3, lr_lambda=lambda step: 0.25 if step == 0 else 0.5)
    gin.parse_config(["value_ppo.critic_lr_schedule = 'policy'", "value_ppo.critic_lr = 2e-3",
                      "value_ppo.critic_betas = (0.9, 0.999)", "value_ppo.critic_minibatches = 4", "ppo.minibatches = 4"])
    build_estimator("ppo").setup(ctx)
    group = ctx.trained["critic"].optimizer.param_groups[0]
    assert group["lr"] == 2e-3 * 0.25 and group["betas"] == (0.9, 0.999)  # the policy's schedule at step 0
    gin.parse_config(["ppo.minibatches = 8"])
    with pytest.raises(UserError, match="optimizer steps"):
        build_estimator("ppo").setup(ctx)
