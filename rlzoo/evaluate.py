"""Evaluation: sample ``samples`` responses per problem of a split, grade them, report pass@1 and maj@k.

pass@1 is the mean reward over every sample of every problem (the expected accuracy of one sample);
maj@k takes, per problem, the answer most of its k samples commit to and grades it. One
``engine.generate`` call and one ``task.score`` call, so the training loop can call this as is.
"""

from __future__ import annotations

import time
from collections import Counter

from rlzoo.engine import SamplingParams, context_length
from rlzoo.tasks import encode_prompts


def evaluate(
    model,
    tokenizer,
    engine,
    task,
    split: str,
    samples: int = 16,
    temperature: float = 0.35,
    top_p: float = 0.9,
    max_problems: int | None = None,
    seed: int = 0,
    problems: list | None = None,
    max_new_tokens: int | None = None,
    first_index: int = 0,
    prompt_tokenization: str = "alone",
) -> dict:
    """Metrics of ``engine``'s policy on the first ``max_problems`` problems (all if None) of ``split``.

    ``problems``, if given, are evaluated instead of the split's (e.g. the fixed train subset; ``split``
    then only labels the result); ``max_new_tokens`` defaults to the task's budget. ``model`` is the policy the engine samples from: the engine is synced to it first. Returns
    ``{"pass@1", f"maj@{samples}", "n_problems", "samples", ..., "problems": [per-problem results]}``.
    ``first_index``: where ``problems`` start in a larger list split over processes (their samples
    are then the ones the whole list would get; see ``SamplingParams.first_index``).
    ``prompt_tokenization``: how prompts are tokenized (``rlzoo.tasks.encode_prompts``). A response gets at most
    what the model's context leaves after its prompt (callers drop problems with too little room beforehand:
    ``rlzoo.tasks.fit_to_context``).
    """
    started = time.time()
    problems = (task.problems(split) if problems is None else problems)[:max_problems]
    engine.sync_weights(model)
    prompts = encode_prompts(tokenizer, task, problems, prompt_tokenization)
    budget = max_new_tokens or task.max_new_tokens
    context = context_length(model)
    budgets = [budget if context is None else min(budget, context - len(p)) for p in prompts]
    params = SamplingParams(
        n=samples, temperature=temperature, top_p=top_p, max_new_tokens=budget, stop=task.stop, seed=seed,
        first_index=first_index,
    )
    completions = engine.generate(prompts, params, budgets=budgets)  # [num_problems][samples]
    texts = [c.text for group in completions for c in group]  # problem-major: problem i owns texts[i*k:(i+1)*k]
    rewards = task.score([p for p in problems for _ in range(samples)], texts)

    per_problem = []
    for i, problem in enumerate(problems):
        group_rewards = rewards[i * samples : (i + 1) * samples]
        answers = [task.extract_answer(t) for t in texts[i * samples : (i + 1) * samples]]
        votes = Counter(a for a in answers if a is not None)  # ties go to the answer seen first
        majority = votes.most_common(1)[0][0] if votes else None
        # Samples with the same extracted answer are graded alike, so the majority answer's grade is
        # the reward of any sample that gave it: no second grading pass.
        majority_reward = group_rewards[answers.index(majority)] if majority is not None else 0.0
        per_problem.append(
            {"id": problem.id, "pass@1": sum(group_rewards) / samples, "majority": majority, "maj_correct": majority_reward}
        )
    n = max(len(problems), 1)
    num_samples = max(len(texts), 1)
    return {
        "split": split,
        "n_problems": len(problems),
        "samples": samples,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "pass@1": sum(rewards) / num_samples,
        f"maj@{samples}": sum(p["maj_correct"] for p in per_problem) / n,
        "mean_response_tokens": sum(len(c.token_ids) for group in completions for c in group) / num_samples,
        "truncated": sum(c.finish_reason == "length" for group in completions for c in group) / num_samples,
        "seconds": time.time() - started,
        "problems": per_problem,
    }
