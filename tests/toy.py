"""A toy with exactly known state values, shared by the estimator and audit tests: responses are 3
lines, each "g" (a correct step) or "b"; the answer is right iff every step is. A stochastic policy
with known per-step success probabilities sits behind the engine interface, so V(state) is exact."""

import random

from rlzoo.engine import Completion, EngineStats
from rlzoo.tasks import Task

P_GOOD = [0.9, 0.6, 0.3]  # probability that step t is correct


class StepTask(Task):
    """Reward 1 iff the response is "g\\ng\\ng\\n"; steps are its lines."""

    name = "toy-steps"
    max_new_tokens = 6

    def score(self, problems, completions):
        return [float(c == "g\ng\ng\n") for c in completions]

    def split_steps(self, completion):
        return list(range(0, len(completion), 2)) if completion else []


class KnownPolicyEngine:
    """Continues any prefix line by line, "g" with probability P_GOOD[step]."""

    def __init__(self, tokenizer, prompt_len):
        self.tokenizer, self.prompt_len, self.stats = tokenizer, prompt_len, EngineStats()

    def generate(self, prompts, params, budgets=None):  # a line is 2 tokens: the toy never runs out of budget
        rng = random.Random(params.seed)
        out = []
        for prompt in prompts:
            done = (len(prompt) - self.prompt_len) // 2
            group = []
            for _ in range(params.n):
                text = "".join("g\n" if rng.random() < P_GOOD[t] else "b\n" for t in range(done, 3))
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                group.append(Completion(ids, text, "stop"))
                self.stats.tokens_generated += len(ids)
            out.append(group)
        return out

    def sync_weights(self, model):
        pass


def true_value(response_prefix: str) -> float:
    """V(prompt + prefix): 0 after any "b", else the product of the remaining steps' success probabilities."""
    steps = response_prefix.splitlines()
    if "b" in steps:
        return 0.0
    value = 1.0
    for p in P_GOOD[len(steps):]:
        value *= p
    return value
