"""Signal-to-noise of the policy gradient: why RL on fresh problems does not learn at CPU scale.

Two independent rollout batches give two estimates g_A, g_B of the policy gradient (the first PPO
step's gradient: ratio 1, whitened advantages, token-mean). Their cosine estimates
|E g|^2 / (|E g|^2 + noise / batch), the fraction of a step that is signal: near 0, a step is mostly
noise and lowers the reward faster than its signal raises it, unless it is tiny. Pairs are drawn

- ``fresh``: A and B on disjoint problems (what an iteration on a large pool sees),
- ``same``: A and B on the same problems, sampled with different seeds (a small pool revisited),

at several numbers of prompts per batch. The cosine of the sign vectors is Adam's first-step
direction (m/sqrt(v) = sign(g) on a cold optimizer). Prints one table.

    python benchmarks/gradient_snr.py --prompts 16,64 --pairs 4        # ~3 min, 1 thread
"""

from __future__ import annotations

import argparse
import time

import torch

from rlzoo.algorithms import build_estimator
from rlzoo.engine import ENGINES, SamplingParams
from rlzoo.policy import load_policy
from rlzoo.ppo import aggregate, clipped_surrogate, forward_logprobs, masked_whiten
from rlzoo.rollout import build_batch
from rlzoo.tasks import get_task


def batch_gradient(policy, tokenizer, engine, task, estimator, problems, seed: int, temperature: float) -> torch.Tensor:
    """The flattened policy gradient [num_params] of one rollout batch of ``problems``."""
    prompt_ids = [tokenizer(task.prompt(p))["input_ids"] for p in problems]
    params = SamplingParams(n=estimator.group_size, temperature=temperature, top_p=0.9,
                            max_new_tokens=task.max_new_tokens, stop=task.stop, seed=seed)
    completions = engine.generate(prompt_ids, params)  # [P][G]
    scores = task.score([p for p, group in zip(problems, completions) for _ in group], [c.text for g in completions for c in g])
    batch = build_batch(tokenizer, task, problems, prompt_ids, completions, scores)
    mask = batch.response_mask  # [B, L]
    advantages = masked_whiten(estimator.advantages(batch, None).advantages, mask)  # [B, L]
    policy.zero_grad(set_to_none=True)
    logprobs, _ = forward_logprobs(policy, batch.input_ids, batch.attention_mask, temperature)  # [B, L]
    loss, _ = clipped_surrogate(logprobs, logprobs.detach(), advantages, clip_eps=0.2)
    aggregate(loss, mask, "token-mean", mask.sum().item()).backward()
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--algo", default="grpo", help="an estimator that needs neither a critic nor extra rollouts")
    parser.add_argument("--prompts", default="16,64", help="prompts per batch (comma-separated)")
    parser.add_argument("--pairs", type=int, default=4, help="independent (A, B) pairs per cell")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy, tokenizer = load_policy(args.model)
    policy.train()  # gradients; the built-in Llama has no dropout
    task = get_task("arith")
    estimator = build_estimator(args.algo)
    if estimator.uses_rollouts or estimator.critic is not None:
        raise SystemExit(f"--algo {args.algo}: pick an estimator without critic or extra rollouts (grpo, rloo, reinforce)")
    engine = ENGINES.get("torch")(policy, tokenizer, max_batch_size=512)
    pool = task.problems("train")
    print("| pairing | prompts x samples | pairs | cos(g_A, g_B) | cos(sign g_A, sign g_B) | mean norm of g | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for prompts in [int(x) for x in args.prompts.split(",")]:
        for pairing in ("fresh", "same"):
            started, cos, cos_sign, norms = time.time(), [], [], []
            for k in range(args.pairs):
                first = 2 * k * prompts
                a_problems = pool[first : first + prompts]
                b_problems = a_problems if pairing == "same" else pool[first + prompts : first + 2 * prompts]
                g_a = batch_gradient(policy, tokenizer, engine, task, estimator, a_problems, seed=2 * k, temperature=args.temperature)
                g_b = batch_gradient(policy, tokenizer, engine, task, estimator, b_problems, seed=2 * k + 1, temperature=args.temperature)
                cos.append(cosine(g_a, g_b))
                cos_sign.append(cosine(torch.sign(g_a), torch.sign(g_b)))
                norms += [g_a.norm().item(), g_b.norm().item()]
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            print(f"| {pairing} | {prompts} x {estimator.group_size} | {args.pairs} | {mean(cos):.3f} | {mean(cos_sign):.3f} "
                  f"| {mean(norms):.3f} | {time.time() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
