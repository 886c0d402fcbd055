"""Credit audit: how accurately each strategy assigns credit, measured against Monte-Carlo ground truth.

    rlzoo audit --algos A,B,... --task arith [--policy MODEL_OR_RUN] [--critic RUN] [--set NAME.OPTION=VALUE]

The VinePPO paper's analysis of credit itself (Kazemnejad et al. 2024), for any policy, task and registered
strategy. The audit knows no strategy by name: it reads what each one declares through the estimator contract
(``rlzoo.algorithms``); its options (say the number of Monte-Carlo continuations) are gin bindings, as in training.

1. Responses: G samples per held-out problem (the first ``problems`` of the test split; G the largest
   group size among the strategies) at the training sampler (``train.temperature`` / ``train.top_p``: 0.6 / 0.9).
   Every step boundary of every response is a state s_t = prompt + its first t steps (``build_batch`` /
   ``step_token_starts``, the task's splitter).
2. Truth: V(s) = mean reward of ``truth_samples`` continuations (256), from ``values_by_rollouts``
   (identical states rolled out once, prefixes shared in the engine). Standard error sqrt(p(1-p)/(n-1)):
   exact for 0/1 rewards, an upper bound for rewards in [0, 1].
3. Each strategy's credit for the same responses, from its own estimator (``estimator.advantages``): its
   ``Credit.values`` (V̂ of the state before each token: a critic's prediction, a Monte-Carlo estimate with the
   strategy's own seed, or a group baseline, the same for every state of a response) and the advantages it
   trains with. A strategy that is ``learned`` (a critic) is loaded from a checkpoint of one of its runs
   (``--critic RUN``), or from a run trained here by ``rlzoo.train`` with the policy frozen.
4. Alternatives: from every distinct state, ``alternatives`` continuations at the training sampler, each
   cut at its first step boundary past the state: the distinct results are that state's alternative next
   states (as the reference code, ``action_ranking_analyzer.py``, dedupes next actions). A continuation
   that ends the response within that step gives a finished response, worth its reward R to the truth.
   A strategy values alternatives by ``estimator.state_values`` (told which are finished, and their reward);
   one that has none (a group baseline) values every alternative of a state by the state's own value.

Metrics, each with a 95% confidence interval from a percentile bootstrap over problems (clusters: the
states of one problem are correlated; 2000 resamples):
- value MAE: mean |V̂(s) - V(s)| over states (a state as often as responses visit it); the same by step
  index t along the chain;
- sign agreement: per step, does the strategy's advantage have the true advantage's sign? A strategy's
  step advantage is the mean over the step's tokens of the per-token advantage it trains with (before the
  loop's optional whitening). True: A_t = V(s_{t+1}) - V(s_t), last step R - V(s_last). Steps whose true
  advantage is 0 are skipped; a predicted 0 scores 0.5;
- ranking accuracy: for every pair of a state's alternative next states, is the order of the strategy's
  values the truth's? Pairs tied in truth are skipped; a tie in prediction scores 0.5 (so a strategy that
  cannot tell states apart scores exactly 0.5). The reference code counts every tie as wrong instead;
- compute each strategy spent on the responses' credit: tokens generated, forward tokens (token positions
  run through a model: prefill + decode for rollouts, the unpadded rows for a critic), forward passes
  (sequences: continuations sampled, or critic rows), seconds.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rlzoo import reporting, runs
from rlzoo.reporting import bootstrap_ci, ci_text  # noqa: F401  bootstrap_ci: the audit's intervals
from rlzoo.algorithms import ESTIMATORS, Estimator, build_estimator
from rlzoo.engine import SamplingParams, context_length
from rlzoo.errors import UserError
from rlzoo.rollout import (EstimatorContext, RolloutBatch, build_batch, first_occurrences, remaining_budgets, step_advantages,
                           step_token_starts)
from rlzoo.seeds import Salt, derive_seed
from rlzoo.tasks import Problem, Task, encode_prompts, fit_to_context

CONFIDENCE = reporting.CONFIDENCE
MC_CHUNK = 64  # distinct states per Monte-Carlo engine call: bounds the completions held in memory at once
PLOTS = ("mae_by_step", "ranking_accuracy")


@dataclass
class AuditConfig:
    algos: tuple[str, ...] = ()  # strategies whose credit is audited (registered estimator names)
    problems: int = 64  # held-out problems: the first N of the task's test split
    truth_samples: int = 256  # continuations per state for the ground-truth V(s) (the paper: 256)
    alternatives: int = 5  # next steps drawn from every state for the ranking metric
    temperature: float = 0.6  # sampler of responses, continuations and alternatives (the training one)
    top_p: float = 0.9  # its nucleus mass
    max_new_tokens: int = 0  # response budget in tokens (0: the task's; `rlzoo audit` sets train.max_new_tokens when bound)
    seed: int = 0  # every random draw of the audit derives from it
    resamples: int = 2000  # bootstrap resamples behind every confidence interval


# ----------------------------------------------------------------------------------------- metrics


def absolute_errors(predicted, truth) -> np.ndarray:
    return np.abs(np.asarray(predicted, dtype=float) - np.asarray(truth, dtype=float))


def sign_agreement(predicted, truth) -> tuple[np.ndarray, np.ndarray]:
    """Per step: 1 if the predicted advantage has the true one's sign, 0.5 if it is 0, 0 if opposite.
    Steps whose true advantage is 0 have no sign to agree with. Returns (scores of kept steps, kept mask)."""
    p, t = np.sign(np.asarray(predicted, dtype=float)), np.sign(np.asarray(truth, dtype=float))
    keep = t != 0
    scores = np.where(p == 0, 0.5, (p == t).astype(float))
    return scores[keep], keep


def pairwise_ranking(predicted, truth) -> list[float]:
    """One score per pair of alternatives not tied in truth: 1 if the predicted values order it as the
    truth does, 0.5 if they tie, 0 if they reverse it."""
    scores = []
    for i, j in itertools.combinations(range(len(truth)), 2):
        true_order = np.sign(truth[i] - truth[j])
        if true_order == 0:
            continue
        predicted_order = np.sign(predicted[i] - predicted[j])
        scores.append(0.5 if predicted_order == 0 else float(predicted_order == true_order))
    return scores


def binomial_se(values, n: int) -> np.ndarray:
    """Standard error of a mean of n rewards in [0, 1] with mean p: sqrt(p(1-p)/(n-1)) (exact for 0/1)."""
    p = np.asarray(values, dtype=float)
    return np.sqrt(p * (1 - p) / max(n - 1, 1))


# ---------------------------------------------------------------------------------- value sources


def mc_values(ctx: EstimatorContext, states: list[list[int]], problems: list[Problem], prompt_lens: list[int],
              params: SamplingParams, purpose: str, log=None) -> torch.Tensor:
    """``ctx.values_by_rollouts`` over the distinct states in chunks, each chunk with its own seed (the
    engine's random keys follow a request's position, so two calls with one seed would share noise). [N]."""
    first = first_occurrences(states)  # distinct state -> index of its first occurrence
    distinct = list(first)
    values = torch.zeros(len(distinct))  # [U]
    started = time.perf_counter()
    for c in range(0, len(distinct), MC_CHUNK):
        owners = [first[s] for s in distinct[c : c + MC_CHUNK]]
        values[c : c + len(owners)] = ctx.values_by_rollouts(
            [states[i] for i in owners], [problems[i] for i in owners], [prompt_lens[i] for i in owners],
            replace(params, seed=derive_seed(params.seed, 0, c)), purpose=purpose)  # the chunk's offset as its salt
        if log:
            log(f"{purpose}: {c + len(owners)}/{len(distinct)} states x {params.n} continuations, {time.perf_counter() - started:.0f}s")
    slot = {s: u for u, s in enumerate(distinct)}
    return values[torch.tensor([slot[tuple(s)] for s in states], dtype=torch.long)]


class CountingEngine:
    """The engine, counting the sequences it samples (an estimator's forward passes); everything else passes through."""

    def __init__(self, engine):
        self.engine, self.sequences = engine, 0

    def generate(self, prompts, params, budgets=None):
        self.sequences += len(prompts) * params.n
        return self.engine.generate(prompts, params, budgets=budgets)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class RowMeter:
    """Rows scored and unpadded token positions run through a module (a critic) called as (input_ids,
    attention_mask, position_ids, cache), counted by a forward pre-hook. Shared prompts (``ppo.forward_rows``): a
    prefill into an empty cache counts its positions, not its rows; a call continuing a cache counts its own
    positions (its attention mask also covers the cached prompt)."""

    def __init__(self, module):
        self.rows = self.tokens = 0
        self.handle = module.register_forward_pre_hook(self._count, with_kwargs=True) if isinstance(module, torch.nn.Module) else None

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)  # [b, L]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)  # [b, L]
        cache = kwargs.get("cache", args[3] if len(args) > 3 else None)
        if isinstance(ids, torch.Tensor):
            self.rows += 0 if cache is not None and cache.get_seq_length() == 0 else ids.shape[0]
            self.tokens += int(mask[:, -ids.shape[1]:].sum()) if isinstance(mask, torch.Tensor) else ids.numel()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def next_step(tokenizer, task: Task, state: list[int], prompt_len: int, continuation: list[int]) -> tuple[list[int], bool]:
    """The state one step after ``state`` along ``continuation``: cut at the first step boundary past the
    state (False), or the whole response when the continuation ends it first (True: finished)."""
    sequence = list(state) + list(continuation)
    response = sequence[prompt_len:]
    text = tokenizer.decode(response, skip_special_tokens=True)
    starts = step_token_starts(tokenizer, response, task.split_steps(text), prompt_len)
    cut = next((s for s in starts if s > len(state)), None)
    return (sequence, True) if cut is None else (sequence[:cut], False)


def draw_alternatives(engine, tokenizer, task: Task, states: list[list[int]], prompt_lens: list[int], sources: list[int],
                      params: SamplingParams, context: int | None = None) -> tuple[list[int], list[list[int]], list[bool]]:
    """From each state ``states[i]`` for i in ``sources``, ``params.n`` continuations cut after one step. Returns,
    per distinct result of each source: the source (state index), its tokens, and whether the response finished."""
    # Each alternative gets what is left of its response's budget, as an MC continuation does (never past the context).
    budgets = remaining_budgets([states[i] for i in sources], [prompt_lens[i] for i in sources], params.max_new_tokens, context)
    completions = engine.generate([states[i] for i in sources], params, budgets=budgets)  # [len(sources)][n]
    alt_source, alt_tokens, alt_finished = [], [], []
    for i, group in zip(sources, completions):
        distinct: dict[tuple, None] = {}  # (tokens, finished) in the order drawn
        for c in group:
            tokens, finished = next_step(tokenizer, task, states[i], prompt_lens[i], c.token_ids)
            distinct.setdefault((tuple(tokens), finished), None)
        for tokens, finished in distinct:
            alt_source.append(i)
            alt_tokens.append(list(tokens))
            alt_finished.append(finished)
    return alt_source, alt_tokens, alt_finished


def step_means(token_values: torch.Tensor, batch: RolloutBatch) -> list[list[float]]:
    """Per response, the mean of ``token_values`` [B, L] over each step's tokens."""
    last = batch.last_token_index().tolist()
    out = []
    for b, starts in enumerate(batch.step_starts):
        ends = starts[1:] + [last[b] + 1]
        out.append([token_values[b, s:e].mean().item() if e > s else 0.0 for s, e in zip(starts, ends)])
    return out


# ----------------------------------------------------------------------------------- the audit


def audit(policy, tokenizer, engine, task: Task, problems: list[Problem], cfg: AuditConfig,
          estimators: dict[str, Estimator] | None = None, checkpoints: dict[str, Path] | None = None,
          device: torch.device = torch.device("cpu"), log=None) -> dict:
    """Measure each strategy's credit on responses to ``problems`` against Monte-Carlo truth (module doc).
    ``estimators``: by name (default: ``cfg.algos``, built as gin configures them); ``checkpoints``: the checkpoint
    each ``learned`` one loads (``load_learned``). Returns the results (audit.json)."""
    log = log or (lambda message: None)
    estimators = estimators if estimators is not None else {a: build_estimator(a) for a in cfg.algos}
    checkpoints = checkpoints or {}
    group = max(e.group_size for e in estimators.values())  # responses per problem, shared by every strategy
    budget = cfg.max_new_tokens or task.max_new_tokens  # tokens of one response
    sampler = SamplingParams(n=group, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=budget, stop=task.stop)
    seed = lambda salt: derive_seed(cfg.seed, 0, salt)  # noqa: E731  one seed per purpose
    counted = CountingEngine(engine)
    ctx = EstimatorContext(policy=policy, tokenizer=tokenizer, engine=counted, task=task,
                           sampling=replace(sampler, seed=seed(Salt.AUDIT_ESTIMATORS)), model_path="", device=device, seed=cfg.seed)
    for name, estimator in estimators.items():
        if estimator.learned:
            if name not in checkpoints:
                raise UserError(f"{name!r} credits with what it learned in training: give a checkpoint of one of its runs")
            estimator.load_learned(checkpoints[name], ctx)

    # 1. Responses; every step boundary of every response is a state (row b, step t, tokens). Problems whose prompt
    #    leaves the model too little room for a response are dropped first, as in training (rlzoo.tasks.fit_to_context).
    context = context_length(policy) if policy is not None else None  # (a toy audit runs no model)
    problems, dropped = fit_to_context(tokenizer, task, problems, context, budget)
    if not problems:
        raise UserError(f"no {task.name} problem leaves the model room for a {budget}-token response ({len(dropped)} dropped): "
                        "lower train.max_new_tokens")
    prompt_ids = encode_prompts(tokenizer, task, problems)
    completions = engine.generate(prompt_ids, replace(sampler, seed=seed(Salt.AUDIT_RESPONSES)))  # [P][G]
    scores = task.score([p for p, g in zip(problems, completions) for _ in g], [c.text for g in completions for c in g])
    batch = build_batch(tokenizer, task, problems, prompt_ids, completions, scores)
    rows = [b for b in range(batch.size) for _ in batch.step_starts[b]]  # [S]
    steps = [t for b in range(batch.size) for t in range(len(batch.step_starts[b]))]  # [S]
    positions = [batch.step_starts[b][t] for b, t in zip(rows, steps)]  # [S] token position of each state's next token
    states = [batch.input_ids[b, :p].tolist() for b, p in zip(rows, positions)]  # [S]
    state_problems = [batch.problems[b] for b in rows]
    state_prompt_lens = [int(batch.prompt_lens[b]) for b in rows]
    clusters = batch.group_ids[rows].numpy()  # [S] problem of each state
    distinct_states = first_occurrences(states)
    log(f"{batch.size} responses to {len(problems)} problems (mean reward {batch.scores.mean():.3f}), "
        f"{len(states)} states ({len(distinct_states)} distinct)")

    # 2. Alternatives: from every distinct state, cfg.alternatives continuations cut after one step.
    sources = list(distinct_states.values())  # index of each distinct state's first occurrence
    alt_source, alt_tokens, alt_finished = draw_alternatives(engine, tokenizer, task, states, state_prompt_lens, sources,
                                                             replace(sampler, n=cfg.alternatives, seed=seed(Salt.AUDIT_ALTERNATIVES)),
                                                             context)
    alt_problems = [state_problems[i] for i in alt_source]
    alt_prompt_lens = [state_prompt_lens[i] for i in alt_source]
    ends = [a for a, f in enumerate(alt_finished) if f]  # finished responses: their value is their reward
    opened = [a for a, f in enumerate(alt_finished) if not f]  # states whose value must be estimated
    alt_reward = np.full(len(alt_tokens), np.nan)  # [A]
    if ends:
        texts = [tokenizer.decode(alt_tokens[a][alt_prompt_lens[a]:], skip_special_tokens=True) for a in ends]
        alt_reward[ends] = task.score([alt_problems[a] for a in ends], texts)
    log(f"{len(alt_tokens)} distinct alternative next states from {len(sources)} states ({len(ends)} finish the response)")

    # 3. Truth: one MC pass over the response states and the open alternatives (shared states once).
    forward_before, t0 = engine.stats.forward_tokens, time.perf_counter()
    truth_all = mc_values(ctx, states + [alt_tokens[a] for a in opened], state_problems + [alt_problems[a] for a in opened],
                          state_prompt_lens + [alt_prompt_lens[a] for a in opened],
                          replace(sampler, n=cfg.truth_samples, seed=seed(Salt.AUDIT_TRUTH)), purpose="truth", log=log).numpy()
    distinct_truth = len(first_occurrences(states + [alt_tokens[a] for a in opened]))
    truth_compute = {"tokens_generated": int(ctx.tokens["truth"]), "forward_tokens": int(engine.stats.forward_tokens - forward_before),
                     "forward_passes": distinct_truth * cfg.truth_samples, "seconds": time.perf_counter() - t0}
    truth = truth_all[: len(states)]  # [S]
    truth_se = binomial_se(truth, cfg.truth_samples)  # [S]
    alt_truth = alt_reward.copy()  # [A]
    alt_truth[opened] = truth_all[len(states):]
    final = batch.scores.tolist()
    first_state = np.cumsum([0] + [len(s) for s in batch.step_starts])  # row b's states: first_state[b] : first_state[b + 1]
    true_adv = np.concatenate([step_advantages(truth[first_state[b] : first_state[b + 1]].tolist(), final[b])
                               for b in range(batch.size)])  # [S]

    # 4. Each strategy's credit for the responses (what it would train with), and its values of the alternatives.
    #    Its own draws for the alternatives get their own seed: not the noise of its credit for the responses.
    values_ctx = replace(ctx, seed=seed(Salt.AUDIT_STATE_VALUES), sampling=replace(sampler, seed=seed(Salt.AUDIT_STATE_VALUES)))
    alt_rewards = [float(alt_reward[a]) if f else None for a, f in enumerate(alt_finished)]
    results = {}
    for name, estimator in estimators.items():
        tokens_before, forward_before, sequences_before = sum(ctx.tokens.values()), engine.stats.forward_tokens, counted.sequences
        meter = RowMeter(estimator.critic)
        t0 = time.perf_counter()
        credit = estimator.advantages(batch, ctx)
        seconds = time.perf_counter() - t0
        meter.close()
        if credit.values is None:
            raise UserError(f"cannot audit {name!r}: its Credit carries no values (V̂ of the state before each token)")
        compute = {"tokens_generated": int(sum(ctx.tokens.values()) - tokens_before),
                   "forward_tokens": int(engine.stats.forward_tokens - forward_before) + meter.tokens,
                   "forward_passes": counted.sequences - sequences_before + meter.rows, "seconds": seconds}
        adv = np.array([a for row in step_means(credit.advantages.cpu(), batch) for a in row])  # [S] per step
        values = credit.values.cpu()[rows, positions].numpy()  # [S] V̂(s_t)
        alt_values = estimator.state_values(alt_tokens, alt_problems, alt_prompt_lens, values_ctx, alt_rewards)
        # None: it values a state only through its response, so every alternative of a state gets the state's value
        alt_values = values[alt_source] if alt_values is None else alt_values.cpu().numpy()  # [A]
        options = {f: getattr(estimator, f) for f in estimator.report_options}
        results[name] = {"values": values, "advantages": adv, "alt_values": alt_values, "compute": compute, "options": options}
        log(f"{name}: credit in {seconds:.1f}s")

    # 5. Metrics with bootstrap intervals over problems.
    ci = lambda scores, where: bootstrap_ci(scores, where, cfg.resamples, seed=cfg.seed)  # noqa: E731
    alternatives_of: dict[int, list[int]] = {}  # source state -> its alternatives
    for a, i in enumerate(alt_source):
        alternatives_of.setdefault(i, []).append(a)
    pair_sources = list(alternatives_of.values())
    strategies = {}
    for name, r in results.items():
        errors = absolute_errors(r["values"], truth)
        signs, kept = sign_agreement(r["advantages"], true_adv)
        pair_scores, pair_clusters = [], []
        for alts in pair_sources:
            s = pairwise_ranking(r["alt_values"][alts], alt_truth[alts])
            pair_scores += s
            pair_clusters += [clusters[alt_source[alts[0]]]] * len(s)
        strategies[name] = {
            "value_mae": ci(errors, clusters),
            "mae_by_step": {str(t): ci(errors[np.array(steps) == t], clusters[np.array(steps) == t]) for t in sorted(set(steps))},
            "sign_agreement": ci(signs, clusters[kept]),
            "ranking_accuracy": ci(pair_scores, pair_clusters),
            "compute": r["compute"],
            "options": r["options"],
        }
    steps_arr = np.array(steps)
    pairs = sum(len(pairwise_ranking(alt_truth[a], alt_truth[a])) for a in pair_sources)  # pairs not tied in truth
    return {
        "task": task.name,
        "settings": asdict(cfg) | {"algos": list(estimators), "group_size": group, "max_new_tokens": budget,
                                         "dropped_problems": len(dropped)},
        "responses": {"problems": len(problems), "responses": batch.size, "mean_reward": float(batch.scores.mean()),
                      "states": len(states), "distinct_states": len(distinct_states),
                      "mean_steps": len(states) / batch.size, "truncated": sum(r == "length" for r in batch.finish_reasons)},
        "truth": {"samples": cfg.truth_samples, "mean_se": float(truth_se.mean()), "max_se": float(truth_se.max()),
                  "mean_se_by_step": {str(t): float(truth_se[steps_arr == t].mean()) for t in sorted(set(steps))},
                  "true_advantage_zero_steps": int((true_adv == 0).sum()), "compute": truth_compute},
        "ranking": {"source_states": len(sources), "alternatives_per_state": cfg.alternatives, "distinct_alternatives": len(alt_tokens),
                    "finished_alternatives": len(ends), "pairs_not_tied_in_truth": pairs},
        "strategies": strategies,
        "ci_method": f"{CONFIDENCE:.0%} percentile bootstrap over problems ({cfg.resamples} resamples)",
        "response_texts": batch.response_texts,
        "per_state": {"problem": clusters.tolist(), "response": rows, "step": steps, "truth": truth.tolist(), "truth_se": truth_se.tolist(),
                      "true_advantage": true_adv.tolist(),
                      **{f"{n}/value": r["values"].tolist() for n, r in results.items()},
                      **{f"{n}/advantage": r["advantages"].tolist() for n, r in results.items()}},
    }


# ------------------------------------------------------------------------- inputs: policy, critic


def policy_to_load(policy: str, task: str) -> str:
    """What ``load_policy`` loads for ``--policy``, after checking that it was made for ``task``: a run
    folder gives its latest checkpoint's policy; the built-in default and rlzoo-built folders record their
    task; any other model (a hub id, a foreign folder) is taken as task-agnostic."""
    from rlzoo.policy import pretrain_config
    from rlzoo.train import latest_checkpoint

    path = Path(policy).expanduser()
    if (path / "run.json").is_file():
        run_task = runs.read_run(path).get("task")
        if run_task != task:
            raise UserError(f"--policy {policy} is a run on task {run_task!r}, not {task!r}; pass --task {run_task} or a policy for {task}")
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise UserError(f"--policy {policy} is a run with no checkpoint yet; resume or finish it first")
        return str(checkpoint / "policy")
    if policy == "default":
        trained_on = pretrain_config().task
    elif (path / "pretrain.json").is_file():
        trained_on = json.loads((path / "pretrain.json").read_text())["config"]["task"]
    else:
        return policy
    if trained_on != task:
        raise UserError(f"--policy {policy} was trained on task {trained_on!r}, not {task!r}; pass --task {trained_on} or a policy for {task}")
    return policy


def shown_path(value: str, base: Path) -> str:
    """A model or run given by a path, as its path from ``base`` (the report's folder), so that reports
    record no machine's folder names; a name that is no path here (a hub id, "default") as given."""
    if value == "default" or not Path(value).expanduser().exists():
        return value
    return os.path.relpath(Path(value).expanduser().resolve(), Path(base).resolve())


PATH_OPTIONS = ("--policy", "--critic", "--config")


def portable_command(command: str, out: Path) -> str:
    """``command`` as run in the report's folder ``out``: the paths it names by their path from there and
    ``--out`` as "." (``shown_path``). A command that does not parse is kept as is."""
    try:
        args = shlex.split(command)
    except ValueError:
        return command
    shown = []
    for i, arg in enumerate(args):
        option, eq, inline = arg.partition("=")
        before = args[i - 1] if i else ""
        if eq and option == "--out":
            arg = "--out=."
        elif eq and option in PATH_OPTIONS:
            arg = f"{option}={shown_path(inline, out)}"
        elif before == "--out":
            arg = "."
        elif before in PATH_OPTIONS:
            arg = shown_path(arg, out)
        shown.append(arg)
    return shlex.join(shown)


def learned_checkpoint(run_dir: Path, task: str, learned: list[str]) -> tuple[str, Path]:
    """(strategy, latest checkpoint) of ``run_dir``, a run on ``task`` of one of the ``learned`` strategies audited."""
    from rlzoo.train import latest_checkpoint

    info = runs.read_run(run_dir)
    if not info:
        raise UserError(f"--critic {run_dir} is not a run folder (no run.json); give a folder written by `rlzoo train`")
    if info.get("algo") not in learned:
        wanted = f"a run of {' or '.join(learned)}" if learned else "no run: no strategy audited learns one"
        raise UserError(f"--critic {run_dir} is a {info.get('algo')!r} run, which has no critic to audit; give {wanted}")
    if info.get("task") != task:
        raise UserError(f"--critic {run_dir} is a run on task {info.get('task')!r}, not {task!r}; "
                        f"pass --task {info.get('task')} or a {info.get('algo')} run on {task}")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"--critic {run_dir} has no checkpoint yet; resume or finish it first")
    return info["algo"], checkpoint


def train_learned(algo: str, model: str, task: str, iterations: int, run_dir: Path, seed: int) -> Path:
    """Fit what ``algo`` learns (its critic) by the real training loop (``rlzoo.train``) for ``iterations`` into ``run_dir``,
    with the policy's learning rate at 0: the policy audited is exactly ``model``, and the critic's target does not move
    under it (the value network's most favourable case). Evaluation is cut to one problem. Re-running resumes or reuses it."""
    from rlzoo.train import TrainConfig, train

    cfg = TrainConfig(algo=algo, task=task, model=model, seed=seed, iterations=iterations, max_episodes=0, max_seconds=0.0, lr=0.0,
                      eval_every=iterations + 1, eval_samples=1, eval_train_problems=1, eval_test_problems=1, checkpoint_every=iterations)
    train(run_dir, cfg, command=f"rlzoo audit: critic for {algo}, {iterations} iterations, policy frozen")
    if runs.read_run(run_dir).get("status") != "finished":
        raise UserError(f"critic training in {run_dir} stopped before its {iterations} iterations; run the same command to resume it")
    return run_dir


# ----------------------------------------------------------------------------------- the command


def run_audit(task_name: str, out: Path, cfg: AuditConfig, policy: str | None = None, critics: list[Path] = (),
              critic_iterations: int = 20, command: str = "") -> dict:
    """``rlzoo audit``: check the inputs, get what each ``learned`` strategy needs (the latest checkpoint of its run
    among ``critics``, or a run trained here for ``critic_iterations``), audit the policy on the task's held-out
    problems, and write the report into ``out``. ``policy`` defaults to the first critic run's policy when one is
    given, else the built-in default."""
    import gin

    from rlzoo.engine import ENGINES
    from rlzoo.policy import check_model, load_policy
    from rlzoo.tasks import get_task
    from rlzoo.train import TrainConfig

    if not cfg.algos:
        raise UserError(f"--algos is empty; give strategies to audit, e.g. {','.join(ESTIMATORS.names()[:4])}")
    estimators = {name: build_estimator(name) for name in cfg.algos}  # an unknown name lists the known ones
    if cfg.alternatives < 2:
        raise UserError(f"--alternatives {cfg.alternatives}: the ranking metric compares pairs of next steps; give at least 2 (default 5)")
    if cfg.truth_samples < 2:
        raise UserError(f"--truth-samples {cfg.truth_samples}: the ground truth needs at least 2 continuations per state (default 256)")
    if cfg.problems < 1:
        raise UserError(f"--problems {cfg.problems}: audit at least 1 problem")
    task = get_task(task_name)
    learned = [name for name, e in estimators.items() if e.learned]
    critic_algos = [runs.read_run(Path(run)).get("algo") for run in critics]
    twice = sorted({a for a in critic_algos if a is not None and critic_algos.count(a) > 1})
    if twice:
        raise UserError(f"--critic names more than one {' and '.join(twice)} run; give one run per strategy")
    checkpoints = dict(learned_checkpoint(Path(run), task_name, learned) for run in critics)
    untrained = [name for name in learned if name not in checkpoints]
    if untrained and critic_iterations < 1:
        raise UserError(f"{', '.join(untrained)}'s credit needs a critic: pass --critic RUN (a run of it) or --critic-iterations N > 0 "
                        "to train one")
    given = policy or (str(critics[0]) if critics else "default")  # the policy audited, as named
    model = policy_to_load(given, task_name)
    check_model(model)
    train_cfg = TrainConfig()  # the training sampler and engine as configured (gin)
    log = lambda message: print(f"audit: {message}", file=sys.stderr, flush=True)  # noqa: E731

    out = Path(out)
    runs.check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    critics = {}
    for name in learned:
        trained_here = name not in checkpoints
        if trained_here:
            run_dir = out / f"critic-{name}-{critic_iterations}it"
            log(f"training a critic for {name}: {critic_iterations} iterations of `rlzoo train --algo {name}` (policy frozen) into {run_dir}")
            checkpoints[name] = learned_checkpoint(train_learned(name, model, task_name, critic_iterations, run_dir, cfg.seed),
                                                   task_name, [name])[1]
        run_dir = checkpoints[name].parent.parent
        trains = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
        critics[name] = {"checkpoint": shown_path(str(checkpoints[name]), out), "trained_here": trained_here,
                         "iterations": runs.read_run(run_dir).get("budget", {}).get("iterations"),
                         # what the critic cost in training: its update, per iteration (inference is in compute)
                         "update_seconds_per_iteration": float(np.mean([r.get("time/critic", np.nan) for r in trains])) if trains else None}

    cfg = replace(cfg, temperature=train_cfg.temperature, top_p=train_cfg.top_p, max_new_tokens=cfg.max_new_tokens or train_cfg.max_new_tokens)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy_model, tokenizer = load_policy(model, device=device)
    engine = ENGINES.get(train_cfg.engine)(policy_model, tokenizer, max_batch_size=train_cfg.engine_batch_size)
    split = "test" if "test" in task.splits else task.eval_splits[0]
    problems = task.problems(split)[: cfg.problems]
    started = time.perf_counter()
    result = audit(policy_model, tokenizer, engine, task, problems, cfg, estimators=estimators, checkpoints=checkpoints,
                   device=device, log=log)
    # Paths as seen from `out`: a report records no machine's folder names (leaderboard_sections rebases them).
    result |= {"policy": shown_path(given, out), "policy_is_path": given != "default" and Path(given).expanduser().exists(),
               "policy_loaded": shown_path(model, out), "split": split,
               "critics": critics, "seconds": time.perf_counter() - started, "config": gin.config_str(),
               "provenance": reporting.provenance(portable_command(command, out))}
    write_report(result, out)
    log(f"wrote {out}/audit.json, audit.md and plots ({', '.join(PLOTS)}) in {result['seconds']:.0f}s")
    if (out.parent / "index.html").is_file():
        log(f"re-run `rlzoo leaderboard ... --out {out.parent}` to add this audit to its page")
    return result


# ------------------------------------------------------------------------------------------ report


def strategy_label(name: str, s: dict) -> str:
    """A strategy as the tables name it: with the options it reports (its ``report_options``), "name (k=9)"."""
    options = s.get("options") or ({"k": s["k"]} if "k" in s else {})  # "k": an audit.json from before options
    return f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else name


def tables(result: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) of the summary and the by-step table."""
    truth, strategies = result["truth"], result["strategies"]
    summary = [["strategy", "value MAE ↓", "sign agreement ↑", "ranking accuracy ↑", "tokens generated", "forward tokens",
                "forward passes", "seconds"]]
    c = truth["compute"]
    summary.append([f"truth (MC, n={truth['samples']})", f"SE {truth['mean_se']:.3f}", "", "",
                    f"{c['tokens_generated']:,}", f"{c['forward_tokens']:,}", f"{c['forward_passes']:,}", f"{c['seconds']:.1f}"])
    for name, s in strategies.items():
        c = s["compute"]
        summary.append([strategy_label(name, s), ci_text(s["value_mae"]), ci_text(s["sign_agreement"]), ci_text(s["ranking_accuracy"]),
                        f"{c['tokens_generated']:,}", f"{c['forward_tokens']:,}", f"{c['forward_passes']:,}", f"{c['seconds']:.1f}"])
    r, ranking = result["responses"], result["ranking"]
    note = (f"{r['responses']} responses to {r['problems']} held-out problems (mean reward {r['mean_reward']:.3f}), "
            f"{r['states']} states ({r['distinct_states']} distinct); truth from {truth['samples']} continuations per state "
            f"(mean standard error {truth['mean_se']:.3f}); {ranking['pairs_not_tied_in_truth']} pairs of alternative next steps "
            f"from {ranking['source_states']} states. Mean [{result['ci_method']}]. Compute: what each strategy spent "
            "crediting these responses (the truth: all its states, alternatives included).")
    steps = list(truth["mean_se_by_step"])
    by_step = [["step t", "states", "truth SE", *strategies]]
    for t in steps:
        first = next(iter(strategies.values()))["mae_by_step"][t] if strategies else {"n": 0}
        by_step.append([t, str(first["n"]), f"{truth['mean_se_by_step'][t]:.3f}",
                        *[ci_text(s["mae_by_step"][t]) for s in strategies.values()]])
    by_step_note = "Value MAE by step index t (the state after t steps; t = 0 is the prompt alone)."
    return [("Credit accuracy against Monte-Carlo truth", note, summary[0], summary[1:]),
            ("Value MAE by step position", by_step_note, by_step[0], by_step[1:])]


DEFINITIONS = (
    "Value MAE: mean |V̂(s) − V(s)| over every step-boundary state. Sign agreement: share of steps whose advantage, "
    "as the strategy trains with it, has the sign of the true A_t = V(s_{t+1}) − V(s_t) (last step R − V); steps with "
    "A_t = 0 skipped, a predicted 0 scores 0.5. Ranking accuracy: share of pairs of distinct alternative next states "
    "(sampled from the same state, cut after one step) that the strategy's values order as the truth does; pairs tied "
    "in truth skipped, a tie in prediction scores 0.5 (so 0.5 = chance, and every group baseline, which values all "
    "states of a prompt alike, scores exactly 0.5).")


def markdown_section(result: dict, plot_prefix: str = "", level: int = 2) -> str:
    """The audit's tables, plots and definitions as Markdown; plots linked under ``plot_prefix``."""
    h = "#" * level
    lines = reporting.md_tables(tables(result), level)
    lines += [f"{h} Plots", ""] + [f"![{p}]({plot_prefix}{p}.png) ([SVG]({plot_prefix}{p}.svg))" for p in PLOTS] + [""]
    lines += [DEFINITIONS, ""]
    return "\n".join(lines)


def _policy_from_parent(result: dict, audit_dir: Path) -> str:
    """The audited policy as the page one folder up (the leaderboard's) sees it: a path, rebased onto it."""
    policy = str(result.get("policy"))
    return os.path.normpath(os.path.join(Path(audit_dir).name, policy)) if result.get("policy_is_path") else policy


def leaderboard_sections(board: Path) -> list[tuple[str, str]]:
    """The (Markdown, HTML) section of the audit that ``rlzoo audit`` writes by default into the leaderboard folder
    ``board`` (BOARD/audit/), for ``write_leaderboard(sections=...)``; none if there is no audit there."""
    audit_dir = Path(board) / "audit"
    return [leaderboard_section(audit_dir)] if (audit_dir / "audit.json").is_file() else []


def leaderboard_section(audit_dir: Path) -> tuple[str, str]:
    """(Markdown, HTML) section of the audit in ``audit_dir`` (a subfolder "audit" of the leaderboard folder)."""
    result = json.loads((Path(audit_dir) / "audit.json").read_text())
    title = f"Credit audit — {result['task']}, policy {_policy_from_parent(result, audit_dir)}"
    return f"## {title}\n\n" + markdown_section(result, plot_prefix=f"{Path(audit_dir).name}/", level=3), html_section(audit_dir)


def html_section(audit_dir: Path) -> str:
    """The audit in ``audit_dir`` as one self-contained HTML section (plots inlined)."""
    audit_dir = Path(audit_dir)
    result = json.loads((audit_dir / "audit.json").read_text())
    parts = [f"<h2>Credit audit — {html.escape(result['task'])}, policy {html.escape(_policy_from_parent(result, audit_dir))}</h2>"]
    parts += reporting.html_tables(tables(result), level=3)
    for p in PLOTS:
        if (audit_dir / f"{p}.png").is_file():
            data = base64.b64encode((audit_dir / f"{p}.png").read_bytes()).decode()
            parts.append(f'<figure><img alt="{p}" src="data:image/png;base64,{data}"></figure>')
    parts.append(f"<p>{html.escape(DEFINITIONS)}</p>")
    return "".join(parts)


def make_plots(result: dict, out: Path) -> None:
    """mae_by_step and ranking_accuracy, PNG and SVG, in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = result["strategies"]
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(strategies)}

    def interval(ms: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Means and error-bar lengths (0 where there is no interval)."""
        mean = np.array([m["mean"] if m["mean"] is not None else np.nan for m in ms])
        lo = np.array([m["ci"][0] if m["ci"][0] is not None else m["mean"] or 0.0 for m in ms])
        hi = np.array([m["ci"][1] if m["ci"][1] is not None else m["mean"] or 0.0 for m in ms])
        return mean, np.nan_to_num(np.stack([mean - lo, hi - mean]).clip(min=0))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    steps = [int(t) for t in result["truth"]["mean_se_by_step"]]
    for i, (name, s) in enumerate(strategies.items()):
        mean, err = interval([s["mae_by_step"][str(t)] for t in steps])
        shift = 0.06 * (i - len(strategies) / 2)  # side by side, so that the intervals do not hide each other
        ax.errorbar(np.array(steps) + shift, mean, yerr=err, color=colors[name], marker="o", ms=4, capsize=3, label=name)
    ax.plot(steps, list(result["truth"]["mean_se_by_step"].values()), color="gray", ls="--", lw=0.9, label="truth's standard error")
    ax.set_xlabel("step t (state after t reasoning steps)")
    ax.set_ylabel("value MAE vs Monte-Carlo truth")
    ax.set_xticks(steps)
    ax.set_title(f"Value error by position along the chain ({CONFIDENCE:.0%} CI)")
    figs = {"mae_by_step": fig}

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = list(strategies)
    x = np.arange(len(names))
    for offset, key, label, hatch in ((-0.2, "ranking_accuracy", "ranking accuracy (alternative next steps)", ""),
                                      (0.2, "sign_agreement", "advantage sign agreement", "//")):
        mean, err = interval([strategies[n][key] for n in names])
        ax.bar(x + offset, np.nan_to_num(mean), width=0.38, yerr=err, capsize=3, color=[colors[n] for n in names],
               hatch=hatch, edgecolor="white" if not hatch else "black", alpha=0.85 if not hatch else 0.45, label=label)
        for xi in x[np.isnan(mean)]:  # no steps / pairs to score
            ax.text(xi + offset, 0.02, "n/a", ha="center", fontsize=8)
    ax.axhline(0.5, color="gray", ls="--", lw=0.9, label="chance / all ties")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Ranking next steps and signing advantages ({CONFIDENCE:.0%} CI)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)  # below: the bars reach the top
    figs["ranking_accuracy"] = fig
    figs["mae_by_step"].axes[0].legend(fontsize=8)

    for name, fig in figs.items():
        fig.axes[0].grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        fig.savefig(out / f"{name}.svg", bbox_inches="tight")
        plt.close(fig)


def write_report(result: dict, out: Path) -> None:
    """audit.json, audit.md and the plots (PNG + SVG) in ``out``; paths in ``result`` are relative to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(reporting.jsonable(result), indent=1) + "\n")
    make_plots(result, out)
    s = result["settings"]
    header = [f"# Credit audit — {result['task']}", "",
              f"Policy `{result.get('policy')}`; strategies {', '.join(s['algos'])}; {s['problems']} problems x {s['group_size']} "
              f"responses at T={s['temperature']}, top-p {s['top_p']}; {s['truth_samples']} truth samples per state; "
              f"{s['alternatives']} alternatives per state; seed {s['seed']}.", ""]
    for name, c in (result.get("critics") or {}).items():
        line = f"{name}'s critic: `{c['checkpoint']}`"
        line += f" (trained here, {c['iterations']} iterations, policy frozen)" if c["trained_here"] else ""
        if c.get("update_seconds_per_iteration"):
            line += f"; its updates cost {c['update_seconds_per_iteration']:.1f}s per training iteration"
        header += [line + ".", ""]
    prov = result.get("provenance", {})
    footer = ["## Provenance", "", "```", *[f"{k}: {v}" for k, v in prov.items()], "```", "", "Paths are relative to this folder.", ""] if prov else []
    (out / "audit.md").write_text("\n".join(header + [markdown_section(result)] + footer))
