"""The strategies of issue 15 against the known-probability toy (``toy.py``): adaptive VinePPO's values
(unbiased where it claims to be, and the bias where it does not), SPO-chain's segments and probability mask,
PRIME's implicit process rewards and their training."""

import math
import random
from itertools import product

import torch

from rlzoo.algorithms import build_estimator
from rlzoo.algorithms.vineppo import step_advantages
from rlzoo.algorithms.vineppo_adaptive import gms_estimate
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
