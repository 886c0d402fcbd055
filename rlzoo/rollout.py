"""The rollout batch: what the loop samples and every estimator reads.

Layout: one row per sampled response, prompt and response concatenated and right-padded, so every
per-token tensor is ``[B, L]`` and indexed by the *token it scores*: ``logprobs[b, i]`` is
log p(input_ids[b, i] | input_ids[b, :i]); ``values[b, i]`` is V(input_ids[b, :i]), the state the
token was sampled from; ``advantages[b, i]`` is the credit token i receives. Position 0 is never a
response token, so "the state before token i" always exists.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rlzoo import distributed
from rlzoo.distributed import Trained
from rlzoo.engine import Completion, SamplingParams, context_length
from rlzoo.tasks import Problem, Task, encode_prompts


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] long: prompt + response, right-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, L] long: 1 on prompt and response tokens, 0 on padding
    response_mask: torch.Tensor  # [B, L] float32: 1 on response tokens (the ones the policy trains on)
    token_rewards: torch.Tensor  # [B, L] float32: task reward on each response's last token (minus a per-token KL if the KL is in the reward)
    scores: torch.Tensor  # [B] float32: task reward of each response, in [0, 1]
    group_ids: torch.Tensor  # [B] long: index of the prompt the response answers (GRPO / RLOO groups)
    prompt_lens: torch.Tensor  # [B] long: prompt tokens at the start of each row
    step_starts: list[list[int]]  # per row: token positions where each reasoning step starts (the first is the prompt length)
    problems: list[Problem]  # [B]
    response_texts: list[str]  # [B]
    finish_reasons: list[str]  # [B] "stop" or "length"
    old_logprobs: torch.Tensor | None = None  # [B, L] float32, under the sampling policy (the sampler's, or the loop recomputes them)
    ref_logprobs: torch.Tensor | None = None  # [B, L] float32, under the frozen reference (if β > 0)
    extra: dict = field(default_factory=dict)  # estimator scratch space (e.g. MC values for logging)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def response_lens(self) -> torch.Tensor:  # [B] long
        return self.response_mask.sum(-1).long()

    def last_token_index(self) -> torch.Tensor:  # [B] long: position of each response's last token
        return self.prompt_lens + self.response_lens() - 1

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """Rows ``rows`` of the batch (a minibatch), tensors and lists alike."""
        idx = rows.tolist()
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return RolloutBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            token_rewards=self.token_rewards[rows],
            scores=self.scores[rows],
            group_ids=self.group_ids[rows],
            prompt_lens=self.prompt_lens[rows],
            step_starts=[self.step_starts[i] for i in idx],
            problems=[self.problems[i] for i in idx],
            response_texts=[self.response_texts[i] for i in idx],
            finish_reasons=[self.finish_reasons[i] for i in idx],
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
        )


def step_token_starts(tokenizer, response_ids: list[int], char_starts: list[int], offset: int) -> list[int]:
    """Token positions (``offset`` + index in ``response_ids``) where the steps starting at
    ``char_starts`` of the decoded response begin: the first token whose first character lies in the step.
    A token belongs to the step its first character lies in, as the VinePPO reference assigns tokens
    (``_compute_token_advantages``: a token takes the advantage of the character at its start offset), so a
    token that straddles a boundary (``.\n`` ending one GSM8K line and starting the next step) belongs to the
    step it starts in, and the next step's state ends after it. A step in which no token starts (it lies
    inside one token) is merged into the step before it.
    Binary search on decoded prefix lengths: exact for any tokenizer, O(steps · log T) decodes."""
    decoded_len = {}

    def prefix_len(n: int) -> int:  # characters decoded from the first n tokens: token n starts at this character
        if n not in decoded_len:
            decoded_len[n] = len(tokenizer.decode(response_ids[:n], skip_special_tokens=True))
        return decoded_len[n]

    starts = []
    for c in char_starts:
        lo, hi = 0, len(response_ids)
        while lo < hi:  # smallest n with prefix_len(n) >= c: the first token starting at or after character c
            mid = (lo + hi) // 2
            if prefix_len(mid) >= c:
                hi = mid
            else:
                lo = mid + 1
        if lo < len(response_ids) and (not starts or offset + lo > starts[-1]):
            starts.append(offset + lo)
    return starts or [offset]


def build_batch(tokenizer, task: Task, problems: list[Problem], prompt_ids: list[list[int]],
                completions: list[list[Completion]], scores: list[float]) -> RolloutBatch:
    """Pack ``completions[p][j]`` (sample j of prompt p) into a right-padded RolloutBatch.
    ``scores`` are the task rewards in the same flattened order. Where every completion carries its tokens'
    log-probs (the sampler's, ``SamplingParams.logprobs``), they become ``old_logprobs``."""
    rows = [(p, c) for p, group in enumerate(completions) for c in group]
    lengths = [len(prompt_ids[p]) + len(c.token_ids) for p, c in rows]
    B, L = len(rows), max(lengths)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((B, L), pad, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    response_mask = torch.zeros((B, L), dtype=torch.float32)  # [B, L]
    token_rewards = torch.zeros((B, L), dtype=torch.float32)  # [B, L]
    scored = all(c.logprobs is not None for _, c in rows)
    old_logprobs = torch.zeros((B, L), dtype=torch.float32) if scored else None  # [B, L]
    step_starts = []
    for b, (p, c) in enumerate(rows):
        n_prompt, n_resp = len(prompt_ids[p]), len(c.token_ids)
        input_ids[b, : n_prompt + n_resp] = torch.tensor(prompt_ids[p] + c.token_ids)
        attention_mask[b, : n_prompt + n_resp] = 1
        response_mask[b, n_prompt : n_prompt + n_resp] = 1.0
        if n_resp:
            token_rewards[b, n_prompt + n_resp - 1] = scores[b]
            if scored:
                old_logprobs[b, n_prompt : n_prompt + n_resp] = torch.tensor(c.logprobs, dtype=torch.float32)
        step_starts.append(step_token_starts(tokenizer, c.token_ids, task.split_steps(c.text), n_prompt))
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        token_rewards=token_rewards,
        scores=torch.tensor(scores, dtype=torch.float32),
        group_ids=torch.tensor([p for p, _ in rows], dtype=torch.long),
        prompt_lens=torch.tensor([len(prompt_ids[p]) for p, _ in rows], dtype=torch.long),
        step_starts=step_starts,
        problems=[problems[p] for p, _ in rows],
        response_texts=[c.text for _, c in rows],
        finish_reasons=[c.finish_reason for _, c in rows],
        old_logprobs=old_logprobs,
    )


def remaining_budgets(states: list[list[int]], prompt_lens: list[int], max_new_tokens: int, context: int | None) -> list[int]:
    """Per state, the new tokens a continuation may take: the response budget ``max_new_tokens`` less the response
    tokens already in the state, and at most what the model's ``context`` leaves (None: no limit)."""
    budgets = [max_new_tokens - (len(s) - n) for s, n in zip(states, prompt_lens)]
    return budgets if context is None else [min(b, context - len(s)) for b, s in zip(budgets, states)]


def step_advantages(step_values: list[float], final_reward: float) -> list[float]:
    """A_t = V(s_{t+1}) - V(s_t) for steps t = 0..m-1, with V(s_m) = final reward (reward only at the end, γ = 1)."""
    nxt = step_values[1:] + [final_reward]
    return [b - a for a, b in zip(step_values, nxt)]


def first_occurrences(states: list[list[int]]) -> dict[tuple, int]:
    """Each distinct state (as a tuple) -> the index of its first occurrence in ``states``, in order of first
    appearance: what is rolled out or valued once for all its copies."""
    first: dict[tuple, int] = {}
    for i, s in enumerate(states):
        first.setdefault(tuple(s), i)
    return first


class Stopwatch:
    """Seconds spent per stage; ``with watch("generation"): ...`` adds to that stage. Spans nest: a span opened
    inside another (an estimator's rollouts inside "advantages") takes its seconds out of the outer one, so every
    second is counted once, in the innermost stage, whatever the stages are called."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self._open: list[list[float]] = []  # per open span: [start, seconds of the spans nested in it]

    @contextlib.contextmanager
    def __call__(self, stage: str):
        span = [time.perf_counter(), 0.0]
        self._open.append(span)
        try:
            yield
        finally:
            self._open.pop()
            elapsed = time.perf_counter() - span[0]
            self.seconds[stage] += elapsed - span[1]
            if self._open:
                self._open[-1][1] += elapsed


@dataclass
class EstimatorContext:
    """What an estimator may use besides the batch: the policy, the engine and the task's reward
    (for extra rollouts), the training sampler's settings, and counters the loop logs.

    Under data parallelism every rank holds the same (global) batch; ``values_by_rollouts`` splits
    its rollouts over ranks and ``prepare`` makes a module trainable the way the run trains the policy."""

    policy: Any  # the AutoModelForCausalLM being trained
    tokenizer: Any
    engine: Any  # rlzoo.engine.Engine
    task: Task
    sampling: SamplingParams  # the training sampler's settings (n = group size)
    model_path: str  # the checkpoint the policy started from (critics initialise from it)
    device: torch.device
    seed: int
    prompt_tokenization: str = "alone"  # how prompts become token ids (rlzoo.tasks.encode_prompts; train.prompt_tokenization)
    batch_rows: int = 0  # rows of every iteration's (global) rollout batch: prompts x group size
    share_prompts: bool = False  # forwards over a batch may run each distinct prompt once (the loop's ppo.share_prompts)
    iteration: int = 0
    watch: Stopwatch = field(default_factory=Stopwatch)
    tokens: Counter = field(default_factory=Counter)  # tokens generated by purpose: "policy", "mc", ... (all ranks)
    forward_tokens: Counter = field(default_factory=Counter)  # engine prefill + decode tokens of extra rollouts by purpose (all ranks)
    deepspeed_config: dict | None = None  # the run's DeepSpeed config (None: one process or DDP)
    trained: dict[str, Trained] = field(default_factory=dict)  # every trained module by name: the loop checkpoints them

    def prepare(self, name: str, module: torch.nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                max_grad_norm: float = 1.0, micro_batch_size: int = 1, lr_lambda=None) -> Trained:
        """Make ``module`` trainable by AdamW the way this run trains (one process, DDP or DeepSpeed
        ZeRO); the loop checkpoints and restores it under ``name``."""
        self.trained[name] = Trained(module, lr, betas, weight_decay, max_grad_norm, micro_batch_size, lr_lambda,
                                     self.deepspeed_config)
        return self.trained[name]

    def sampling_weights(self):
        """Context in which the engine may sample from the policy (ZeRO-3 gathers its weights)."""
        policy = self.trained.get("policy")
        return policy.full_weights() if policy is not None else contextlib.nullcontext()

    def values_by_rollouts(self, states: list[list[int]], problems: list[Problem], prompt_lens: list[int],
                           params: SamplingParams, purpose: str = "mc", budgets: list[int] | None = None) -> torch.Tensor:
        """Monte-Carlo value of each state: the mean task reward of ``params.n`` continuations.

        states[i] is a token prefix (prompt + the first tokens of a response) of problems[i], whose
        prompt is its first prompt_lens[i] tokens. A continuation gets what is left of its response's budget,
        ``params.max_new_tokens`` minus the response tokens already in the state (and never more than the
        model's context leaves), so that an MC rollout ends where the response it values would have: V(s) is
        the expected reward of the episode being trained. ``budgets`` overrides that, one per state.
        Identical states are rolled out once; the distinct
        states are split evenly over ranks (each rank rolls out and grades its part, with the random
        keys a single process would use) and their rewards gathered, so every rank returns the same
        values as one process would. Returns [N] float32. Time goes to stage ``purpose``; generated
        tokens (all ranks) to ``tokens[purpose]``, and the tokens the engine ran through the model
        (prefill + decode, padding included: the compute spent) to ``forward_tokens[purpose]``;
        these rollouts are never trained on.
        """
        if budgets is None:
            context = context_length(self.policy) if self.policy is not None else None  # (a test's engine may run no model)
            budgets = remaining_budgets(states, prompt_lens, params.max_new_tokens, context)
        with self.watch(purpose):
            forward_before = self.engine.stats.forward_tokens
            unique = first_occurrences(states)  # state -> index of its first occurrence
            keys = list(unique)
            mine = distributed.shard(len(keys))  # this rank's contiguous part of the distinct states
            completions = []  # [U_rank][n]
            if len(mine):
                with self.sampling_weights():
                    completions = self.engine.generate([list(k) for k in keys[mine.start : mine.stop]],
                                                       replace(params, first_index=mine.start, logprobs=False),  # never trained on
                                                       budgets=[budgets[unique[k]] for k in keys[mine.start : mine.stop]])
            texts, owners, generated = [], [], 0
            for key, group in zip(keys[mine.start : mine.stop], completions):
                i = unique[key]
                prefix_ids = list(key[prompt_lens[i]:])
                for c in group:
                    texts.append(self.tokenizer.decode(prefix_ids + c.token_ids, skip_special_tokens=True))
                    owners.append(i)
                    generated += len(c.token_ids)
            rewards = self.task.score([problems[i] for i in owners], texts)
            parts = distributed.gather_objects((rewards, generated, self.engine.stats.forward_tokens - forward_before))
            self.tokens[purpose] += sum(g for _, g, _ in parts)
            self.forward_tokens[purpose] += sum(f for _, _, f in parts)
            rewards = torch.tensor([r for part, _, _ in parts for r in part], dtype=torch.float32)
            value_of_unique = rewards.view(len(keys), params.n).mean(-1)  # [U]
            slot = {key: u for u, key in enumerate(keys)}
            return value_of_unique[torch.tensor([slot[tuple(s)] for s in states])]  # [N]


def sample_groups(problems: list[Problem], ctx: EstimatorContext) -> RolloutBatch:
    """The default sampling of an iteration (``Estimator.sample``): ``ctx.sampling.n`` independent responses to each
    prompt, graded, packed into a RolloutBatch that every rank holds whole. Each rank samples its part of the
    prompts (a prompt's group stays on one rank) with the keys one process would use; generation time goes to
    stage "generation", grading to "reward", generated tokens to ``ctx.tokens["policy"]``."""
    tokenizer, task = ctx.tokenizer, ctx.task
    prompt_ids = encode_prompts(tokenizer, task, problems, ctx.prompt_tokenization)
    # Each prompt's response budget: max_new_tokens, less only where the context is shorter (train.min_response_tokens).
    budgets = remaining_budgets(prompt_ids, list(map(len, prompt_ids)), ctx.sampling.max_new_tokens,
                                context_length(ctx.policy) if ctx.policy is not None else None)
    mine = distributed.shard(len(problems))
    with ctx.watch("generation"), ctx.sampling_weights():
        completions = ctx.engine.generate(prompt_ids[mine.start : mine.stop], replace(ctx.sampling, first_index=mine.start),
                                          budgets=budgets[mine.start : mine.stop])  # [P_rank][G]
    # Rewards (graded in worker processes for math-verify tasks); then every rank holds the whole batch.
    with ctx.watch("reward"):
        flat_problems = [p for p, group in zip(problems[mine.start : mine.stop], completions) for _ in group]
        scores = task.score(flat_problems, [c.text for group in completions for c in group])
        parts = distributed.gather_objects((completions, scores))  # ranks meet: every rank then holds the whole batch
        completions, scores = [g for part, _ in parts for g in part], [s for _, part in parts for s in part]  # [P][G], [P * G]
        batch = build_batch(tokenizer, task, problems, prompt_ids, completions, scores)
    ctx.tokens["policy"] += sum(len(c.token_ids) for group in completions for c in group)
    return batch
