"""Monte-Carlo tokens vs value accuracy: fixed-K VinePPO against vineppo_adaptive settings, on one batch.

    python benchmarks/adaptive_mc_tradeoff.py         # ~2.5 min on 2 CPU cores

The built-in default policy (built on first use) on arith with benchmarks/quick.gin's task settings: 32 test
problems x 4 responses at the training sampler (T = 0.6, top-p 0.9); every step-boundary state is valued by
128 continuations (the "truth"), then by each estimator 3 times with fresh seeds. Value MAE is over the states
as responses visit them (95% interval: 1.96 standard errors over the 3 x states errors, which are not
independent across repeats: a rough interval); MC tokens are continuations' generated tokens per valuation.
The truth's own noise (standard error up to 0.044 at 128 samples) is inside every MAE alike.

Measured (torch 2.13.0 CPU; table and reading in benchmarks/README.md, "Adaptive Monte-Carlo budgets"):

    128 responses, 313 states (142 distinct), mean V 0.227, 40% of states with a true value of exactly 0 or 1
    vineppo           k=9                              MAE 0.0585 ± 0.0054  MC tokens 29393
    vineppo           k=6                              MAE 0.0656 ± 0.0057  MC tokens 19585
    vineppo           k=4                              MAE 0.0882 ± 0.0087  MC tokens 13075
    vineppo           k=2                              MAE 0.1141 ± 0.0108  MC tokens  6533
    vineppo_adaptive  k_first=3, budget=3              MAE 0.1001 ± 0.0090  MC tokens  9777
    vineppo_adaptive  k_first=3, budget=4.5            MAE 0.0932 ± 0.0080  MC tokens 14338
    vineppo_adaptive  k_first=4, budget=4.5            MAE 0.0813 ± 0.0076  MC tokens 14608
    vineppo_adaptive  k_first=5, budget=6              MAE 0.0691 ± 0.0062  MC tokens 19362
    vineppo_adaptive  k_first=3, budget=4.5, biased    MAE 0.0773 ± 0.0074  MC tokens 14277   (unbiased=False, se_threshold=0.1)

At half of K = 9's MC tokens no setting reaches its MAE (0.0585 ± 0.0054): adaptive settings sit on the fixed-K
curve (k_first=4, budget=4.5: 0.081 at 50% of the tokens, where K=4..6 interpolate to 0.083). Stopping on
agreement saves continuations only on states whose value is 0 or 1, and a pilot of 3 agrees by chance on a
state of value 0.2 half the time (0.8^3), so a value of 0 is then kept with no further draws.
"""

from __future__ import annotations

import collections
import importlib
import statistics
import time
from dataclasses import replace

import gin
import torch

from rlzoo.algorithms import ESTIMATORS, build_estimator
from rlzoo.engine import ENGINES, SamplingParams
from rlzoo.policy import default_policy_path, load_policy
from rlzoo.rollout import EstimatorContext, sample_groups
from rlzoo.tasks import get_task

SETTINGS = [("vineppo", {"k": 9}), ("vineppo", {"k": 6}), ("vineppo", {"k": 4}), ("vineppo", {"k": 2}),
            ("vineppo_adaptive", {"k_first": 3, "budget": 3}), ("vineppo_adaptive", {"k_first": 3, "budget": 4.5}),
            ("vineppo_adaptive", {"k_first": 4, "budget": 4.5}), ("vineppo_adaptive", {"k_first": 5, "budget": 6}),
            ("vineppo_adaptive", {"k_first": 3, "budget": 4.5, "unbiased": False, "se_threshold": 0.1})]


def main() -> None:
    ESTIMATORS.names()  # every configurable is registered before the preset binds it
    get_task("arith")
    importlib.import_module("rlzoo.train")  # train.* bindings

    gin.parse_config_files_and_bindings(["benchmarks/quick.gin"], [])
    path = default_policy_path()
    policy, tok = load_policy(str(path))
    task = get_task("arith")
    sampling = SamplingParams(n=4, temperature=0.6, top_p=0.9, max_new_tokens=task.max_new_tokens, stop=task.stop, seed=11)
    ctx = EstimatorContext(policy=policy, tokenizer=tok, engine=ENGINES.get("torch")(policy, tok, max_batch_size=256), task=task,
                           sampling=sampling, model_path=str(path), device=torch.device("cpu"), seed=0)
    batch = sample_groups(task.problems("test")[:32], ctx)
    where = [(b, s) for b in range(batch.size) for s in batch.step_starts[b]]
    t0 = time.time()
    truth = ctx.values_by_rollouts([batch.input_ids[b, :s].tolist() for b, s in where], [batch.problems[b] for b, _ in where],
                                   [int(batch.prompt_lens[b]) for b, _ in where], replace(sampling, n=128, seed=999), purpose="truth")
    print(f"{batch.size} responses, {len(where)} states, truth {time.time() - t0:.0f}s, mean V {truth.mean():.3f}, "
          f"exactly 0 or 1: {((truth == 0) | (truth == 1)).float().mean():.0%}")
    for name, kw in SETTINGS:
        errors, tokens = [], []
        for r in range(3):
            run = replace(ctx, sampling=replace(sampling, seed=100 + r), tokens=collections.Counter())
            credit = build_estimator(name, group_size=4, **kw).advantages(batch, run)
            tokens.append(run.tokens["mc"])
            errors += [abs(credit.values[b, s].item() - truth[i].item()) for i, (b, s) in enumerate(where)]
        mae, se = statistics.mean(errors), statistics.stdev(errors) / len(errors) ** 0.5
        print(f"{name:17s} {kw!s:60s} MAE {mae:.4f} ± {1.96 * se:.4f}  MC tokens {statistics.mean(tokens):.0f}", flush=True)


if __name__ == "__main__":
    main()
