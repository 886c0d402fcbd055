"""Credit audit: how accurately each strategy assigns credit, measured against Monte-Carlo ground truth.

    rlzoo audit --algos ppo,vineppo,grpo,rloo --task arith [--policy MODEL_OR_RUN] [--critic RUN]

The VinePPO paper's analysis of credit itself (Kazemnejad et al. 2024), for any policy and task:

1. Responses: G samples per held-out problem (the first ``problems`` of the test split; G the largest
   group size among the strategies, 8 as configured for all) at the training sampler (``train.temperature`` / ``train.top_p``: 0.6 / 0.9). Every step boundary of every response is a
   state s_t = prompt + its first t steps (``build_batch`` / ``step_token_starts``, the task's splitter).
2. Truth: V(s) = mean reward of ``truth_samples`` continuations (256), from ``values_by_rollouts``
   (identical states rolled out once, prefixes shared in the engine). Standard error sqrt(p(1-p)/(n-1)):
   exact for 0/1 rewards, an upper bound for rewards in [0, 1].
3. Each strategy's credit for the same responses, from its own estimator (``estimator.advantages``):
   ``ppo`` the critic's V(s) (a ppo run's critic, or one fit here by ``rlzoo.train`` with the policy frozen);
   ``vineppo`` its K-sample MC estimate (its own seed, independent of the truth's); group baselines
   (``grpo``, ``dr_grpo``: group mean; ``rloo``: leave-one-out mean; ``reinforce``: 0) one value per
   response, the same for every state of it.
4. Alternatives: from every distinct state, ``alternatives`` continuations at the training sampler, each
   cut at its first step boundary past the state: the distinct results are that state's alternative next
   states (as the reference code, ``action_ranking_analyzer.py``, dedupes next actions). A continuation
   that ends the response within that step gives a finished response: worth its reward R to the truth and
   to Monte-Carlo estimates (every rollout from it returns R); ``ppo`` values it by the critic just before
   its final token (where the critic is trained to predict R), as the reference code asks the critic at
   the end of the step's text; group baselines value every state, finished or not, by their baseline.

Metrics, each with a 95% confidence interval from a percentile bootstrap over problems (clusters: the
states of one problem are correlated; 2000 resamples):
- value MAE: mean |V̂(s) - V(s)| over states (a state as often as responses visit it); the same by step
  index t along the chain;
- sign agreement: per step, does the strategy's advantage have the true advantage's sign? A strategy's
  step advantage is the mean over the step's tokens of the per-token advantage it trains with (before the
  loop's optional whitening): ppo GAE(γ, λ) on its critic, vineppo V̂(s_{t+1}) - V̂(s_t), grpo
  (R - mean) / (std + ε), rloo R - leave-one-out mean. True: A_t = V(s_{t+1}) - V(s_t), last step
  R - V(s_last). Steps whose true advantage is 0 are skipped; a predicted 0 scores 0.5;
- ranking accuracy: for every pair of a state's alternative next states, is the order of the strategy's
  values the truth's? Pairs tied in truth are skipped; a tie in prediction scores 0.5 (so a strategy that
  cannot tell states apart scores exactly 0.5). The reference code counts every tie as wrong instead;
- compute each strategy spent on the responses' credit: tokens generated, forward tokens (token positions
  run through a model: prefill + decode for MC, the whole sequence for the critic), forward passes
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

from rlzoo import runs
from rlzoo.algorithms import ESTIMATORS, build_estimator
from rlzoo.algorithms.grpo import group_mean_std
from rlzoo.algorithms.vineppo import step_advantages
from rlzoo.engine import SamplingParams
from rlzoo.errors import UserError
from rlzoo.rollout import EstimatorContext, RolloutBatch, build_batch, step_token_starts
from rlzoo.tasks import Problem, Task

CONFIDENCE = 0.95
MC_CHUNK = 64  # distinct states per Monte-Carlo engine call: bounds the completions held in memory at once
PLOTS = ("mae_by_step", "ranking_accuracy")


def group_mean(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:  # [B] -> [B]
    return group_mean_std(scores, group_ids)[0]


def leave_one_out_mean(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:  # [B] -> [B]
    """Mean reward of the other responses of the prompt; a response alone is its own baseline (advantage 0)."""
    mean, _, size = group_mean_std(scores, group_ids)
    return torch.where(size > 1, (mean * size - scores) / (size - 1).clamp(min=1), scores)


# The value each group-baseline strategy implies for every state of a response: its baseline.
BASELINES = {
    "grpo": group_mean,
    "dr_grpo": group_mean,
    "rloo": leave_one_out_mean,
    "reinforce": lambda scores, group_ids: torch.zeros_like(scores),
}
STATE_VALUED = ("ppo", "vineppo")  # strategies that value each state: a critic, Monte-Carlo
AUDITABLE = STATE_VALUED + tuple(BASELINES)


@dataclass
class AuditConfig:
    algos: tuple[str, ...] = ("ppo", "vineppo", "grpo", "rloo")  # strategies whose credit is audited
    problems: int = 64  # held-out problems: the first N of the task's test split
    truth_samples: int = 256  # continuations per state for the ground-truth V(s) (the paper: 256)
    alternatives: int = 5  # next steps drawn from every state for the ranking metric
    k: int | None = None  # VinePPO's continuations per state (None: vineppo.k as configured)
    temperature: float = 0.6  # sampler of responses, continuations and alternatives (the training one)
    top_p: float = 0.9  # its nucleus mass
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


def bootstrap_ci(scores, clusters, resamples: int = 2000, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Mean of ``scores`` and its percentile-bootstrap interval, resampling whole clusters (problems) with
    replacement. No interval (None) with fewer than 2 clusters."""
    scores, clusters = np.asarray(scores, dtype=float), np.asarray(clusters)
    if len(scores) == 0:
        return {"mean": None, "ci": [None, None], "n": 0, "clusters": 0}
    _, cluster = np.unique(clusters, return_inverse=True)
    sums, counts = np.bincount(cluster, weights=scores), np.bincount(cluster)
    ci = [None, None]
    if len(sums) > 1:
        picks = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))  # [R, C]
        means = sums[picks].sum(1) / counts[picks].sum(1)  # [R]
        ci = [float(q) for q in np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])]
    return {"mean": float(scores.mean()), "ci": ci, "n": int(len(scores)), "clusters": int(len(sums))}


def binomial_se(values, n: int) -> np.ndarray:
    """Standard error of a mean of n rewards in [0, 1] with mean p: sqrt(p(1-p)/(n-1)) (exact for 0/1)."""
    p = np.asarray(values, dtype=float)
    return np.sqrt(p * (1 - p) / max(n - 1, 1))


# ---------------------------------------------------------------------------------- value sources


def mc_values(ctx: EstimatorContext, states: list[list[int]], problems: list[Problem], prompt_lens: list[int],
              params: SamplingParams, purpose: str, log=None) -> torch.Tensor:
    """``ctx.values_by_rollouts`` over the distinct states in chunks, each chunk with its own seed (the
    engine's random keys follow a request's position, so two calls with one seed would share noise). [N]."""
    first: dict[tuple, int] = {}  # distinct state -> index of its first occurrence
    for i, s in enumerate(states):
        first.setdefault(tuple(s), i)
    distinct = list(first)
    values = torch.zeros(len(distinct))  # [U]
    started = time.perf_counter()
    for c in range(0, len(distinct), MC_CHUNK):
        owners = [first[s] for s in distinct[c : c + MC_CHUNK]]
        values[c : c + len(owners)] = ctx.values_by_rollouts(
            [states[i] for i in owners], [problems[i] for i in owners], [prompt_lens[i] for i in owners],
            replace(params, seed=(params.seed * 1_000_003 + c) % (2**31 - 1)), purpose=purpose)
        if log:
            log(f"{purpose}: {c + len(owners)}/{len(distinct)} states x {params.n} continuations, {time.perf_counter() - started:.0f}s")
    slot = {s: u for u, s in enumerate(distinct)}
    return values[torch.tensor([slot[tuple(s)] for s in states], dtype=torch.long)]


@torch.no_grad()
def critic_values(critic, states: list[list[int]], device, batch_size: int = 64) -> torch.Tensor:
    """V(state) of each token prefix by a ``ValueModel``: its value at position len(state), the state before
    the token that would follow (as the critic is trained). [N]."""
    critic.eval()
    out = []
    for i in range(0, len(states), batch_size):
        part = states[i : i + batch_size]
        lengths = torch.tensor([len(s) for s in part])  # [b]
        ids = torch.zeros(len(part), int(lengths.max()) + 1, dtype=torch.long)  # [b, W + 1]: one slot past the longest
        mask = torch.zeros_like(ids)  # [b, W + 1]
        for j, s in enumerate(part):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        values = critic(ids.to(device), mask.to(device)).float().cpu()  # [b, W + 1]: values[:, n] = V(ids[:, :n])
        out.append(values[torch.arange(len(part)), lengths])
    return torch.cat(out) if out else torch.zeros(0)


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
                      params: SamplingParams) -> tuple[list[int], list[list[int]], list[bool]]:
    """From each state ``states[i]`` for i in ``sources``, ``params.n`` continuations cut after one step. Returns,
    per distinct result of each source: the source (state index), its tokens, and whether the response finished."""
    completions = engine.generate([states[i] for i in sources], params)  # [len(sources)][n]
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


def audit(policy, tokenizer, engine, task: Task, problems: list[Problem], cfg: AuditConfig, critic=None,
          device: torch.device = torch.device("cpu"), log=None) -> dict:
    """Measure each strategy's credit on responses to ``problems`` against Monte-Carlo truth (module doc).
    ``critic``: the ValueModel that ``ppo`` predicts with. Returns the results (audit.json)."""
    log = log or (lambda message: None)
    estimators = {a: build_estimator(a, **({"k": cfg.k} if a == "vineppo" and cfg.k else {})) for a in cfg.algos}
    if "ppo" in estimators:
        estimators["ppo"].critic = critic
    group = max(e.group_size for e in estimators.values())  # responses per problem, shared by every strategy
    sampler = SamplingParams(n=group, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=task.max_new_tokens, stop=task.stop)
    seed = lambda salt: (cfg.seed * 1_000_003 + salt * 10_007) % (2**31 - 1)  # noqa: E731  one seed per purpose
    ctx = EstimatorContext(policy=policy, tokenizer=tokenizer, engine=engine, task=task, sampling=replace(sampler, seed=seed(2)),
                           model_path="", device=device, seed=cfg.seed)

    # 1. Responses; every step boundary of every response is a state (row b, step t, tokens).
    prompt_ids = [tokenizer(task.prompt(p), add_special_tokens=True)["input_ids"] for p in problems]
    completions = engine.generate(prompt_ids, replace(sampler, seed=seed(1)))  # [P][G]
    scores = task.score([p for p, g in zip(problems, completions) for _ in g], [c.text for g in completions for c in g])
    batch = build_batch(tokenizer, task, problems, prompt_ids, completions, scores)
    rows = [b for b in range(batch.size) for _ in batch.step_starts[b]]  # [S]
    steps = [t for b in range(batch.size) for t in range(len(batch.step_starts[b]))]  # [S]
    states = [batch.input_ids[b, : batch.step_starts[b][t]].tolist() for b, t in zip(rows, steps)]  # [S]
    state_problems = [batch.problems[b] for b in rows]
    state_prompt_lens = [int(batch.prompt_lens[b]) for b in rows]
    clusters = batch.group_ids[rows].numpy()  # [S] problem of each state
    log(f"{batch.size} responses to {len(problems)} problems (mean reward {batch.scores.mean():.3f}), "
        f"{len(states)} states ({len({tuple(s) for s in states})} distinct)")

    # 2. Alternatives: from every distinct state, cfg.alternatives continuations cut after one step.
    first_of: dict[tuple, int] = {}
    for i, s in enumerate(states):
        first_of.setdefault(tuple(s), i)
    sources = list(first_of.values())  # index of each distinct state's first occurrence
    alt_source, alt_tokens, alt_finished = draw_alternatives(engine, tokenizer, task, states, state_prompt_lens, sources,
                                                             replace(sampler, n=cfg.alternatives, seed=seed(4)))
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
                          replace(sampler, n=cfg.truth_samples, seed=seed(3)), purpose="truth", log=log).numpy()
    distinct_truth = len({tuple(s) for s in states} | {tuple(alt_tokens[a]) for a in opened})
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
    results = {}
    for name, estimator in estimators.items():
        tokens_before, forward_before, t0 = dict(ctx.tokens), engine.stats.forward_tokens, time.perf_counter()
        credit = estimator.advantages(batch, ctx)
        seconds = time.perf_counter() - t0
        adv = np.array([a for row in step_means(credit.advantages.cpu(), batch) for a in row])  # [S] per step
        if name in BASELINES:
            values = BASELINES[name](batch.scores, batch.group_ids)[rows].numpy()  # [S]
            alt_values = values[alt_source]  # the source response's baseline, finished or not
            compute = {"tokens_generated": 0, "forward_tokens": 0, "forward_passes": 0}
        else:
            positions = [batch.step_starts[b][t] for b, t in zip(rows, steps)]
            values = credit.values.cpu()[rows, positions].numpy()  # [S] V̂(s_t)
            alt_values = alt_reward.copy()  # [A]
            open_states = [alt_tokens[a] for a in opened]
            if name == "ppo":
                alt_values[opened] = critic_values(critic, open_states, device).numpy()
                alt_values[ends] = critic_values(critic, [alt_tokens[a][:-1] for a in ends], device).numpy()
                compute = {"tokens_generated": 0, "forward_tokens": int(batch.attention_mask.sum()), "forward_passes": batch.size}
            else:
                compute = {"tokens_generated": int(ctx.tokens["mc"] - tokens_before.get("mc", 0)),
                           "forward_tokens": int(engine.stats.forward_tokens - forward_before),
                           "forward_passes": int(credit.stats["mc_unique_states"]) * estimator.k}
                alt_values[opened] = mc_values(ctx, open_states, [alt_problems[a] for a in opened], [alt_prompt_lens[a] for a in opened],
                                               replace(sampler, n=estimator.k, seed=seed(5)), purpose="mc_ranking").numpy()
        results[name] = {"values": values, "advantages": adv, "alt_values": alt_values, "compute": compute | {"seconds": seconds}}
        if name == "vineppo":
            results[name]["k"] = estimator.k
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
        } | ({"k": r["k"]} if "k" in r else {})
    steps_arr = np.array(steps)
    pairs = sum(len(pairwise_ranking(alt_truth[a], alt_truth[a])) for a in pair_sources)  # pairs not tied in truth
    return {
        "task": task.name,
        "settings": asdict(cfg) | {"algos": list(cfg.algos), "group_size": group, "max_new_tokens": task.max_new_tokens},
        "responses": {"problems": len(problems), "responses": batch.size, "mean_reward": float(batch.scores.mean()),
                      "states": len(states), "distinct_states": len({tuple(s) for s in states}),
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


def critic_checkpoint(run_dir: Path, task: str) -> Path:
    """The latest checkpoint of a ``ppo`` run on ``task`` that holds a critic (critic.safetensors)."""
    from rlzoo.train import latest_checkpoint

    info = runs.read_run(run_dir)
    if not info:
        raise UserError(f"--critic {run_dir} is not a run folder (no run.json); give a folder written by `rlzoo train --algo ppo`")
    if info.get("algo") != "ppo":
        raise UserError(f"--critic {run_dir} is a {info.get('algo')!r} run, which has no critic; give a ppo run folder")
    if info.get("task") != task:
        raise UserError(f"--critic {run_dir} is a run on task {info.get('task')!r}, not {task!r}; "
                        f"pass --task {info.get('task')} or a ppo run on {task}")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not (checkpoint / "critic.safetensors").is_file():
        raise UserError(f"--critic {run_dir} has no checkpoint with critic.safetensors (DeepSpeed runs save critic.zero/, "
                        "which the audit cannot read); give a ppo run trained without --deepspeed")
    return checkpoint


def load_critic(checkpoint: Path, device):
    """The ValueModel of a ppo checkpoint: the policy's body and the scalar head, as trained."""
    from safetensors.torch import load_file

    from rlzoo.algorithms.value_ppo import ValueModel

    critic = ValueModel(str(checkpoint / "policy"))
    critic.load_state_dict(load_file(str(checkpoint / "critic.safetensors")))
    return critic.to(device).eval()


def train_critic(model: str, task: str, iterations: int, run_dir: Path, seed: int) -> Path:
    """Fit a critic by the real training loop (``rlzoo.train``, algo ppo) for ``iterations`` into ``run_dir``,
    with the policy's learning rate at 0: the policy audited is exactly ``model``, and the critic's target
    does not move under it (the value network's most favourable case). Evaluation is cut to one problem.
    Re-running resumes or reuses the run."""
    from rlzoo.train import TrainConfig, train

    cfg = TrainConfig(algo="ppo", task=task, model=model, seed=seed, iterations=iterations, max_episodes=0, max_seconds=0.0, lr=0.0,
                      eval_every=iterations + 1, eval_samples=1, eval_train_problems=1, eval_test_problems=1, checkpoint_every=iterations)
    train(run_dir, cfg, command=f"rlzoo audit: critic for ppo, {iterations} iterations, policy frozen")
    if runs.read_run(run_dir).get("status") != "finished":
        raise UserError(f"critic training in {run_dir} stopped before its {iterations} iterations; run the same command to resume it")
    return run_dir


# ----------------------------------------------------------------------------------- the command


def run_audit(task_name: str, out: Path, cfg: AuditConfig, policy: str | None = None, critic: Path | None = None,
              critic_iterations: int = 20, command: str = "") -> dict:
    """``rlzoo audit``: check the inputs, get a critic for ``ppo`` (``critic``'s, or one trained here for
    ``critic_iterations``), audit the policy on the task's held-out problems, and write the report into ``out``.
    ``policy`` defaults to the critic run's policy when ``critic`` is given, else the built-in default."""
    import gin

    from rlzoo.engine import ENGINES
    from rlzoo.leaderboard import provenance
    from rlzoo.policy import check_model, load_policy
    from rlzoo.tasks import get_task
    from rlzoo.train import TrainConfig

    for name in cfg.algos:
        ESTIMATORS.get(name)  # an unknown name lists the known ones
        if name not in AUDITABLE:
            raise UserError(f"cannot audit {name!r}: it implies no value of a state to compare; auditable: {', '.join(AUDITABLE)}")
    if not cfg.algos:
        raise UserError(f"--algos is empty; give strategies to audit, e.g. {','.join(AuditConfig.algos)}")
    if cfg.alternatives < 2:
        raise UserError(f"--alternatives {cfg.alternatives}: the ranking metric compares pairs of next steps; give at least 2 (default 5)")
    if cfg.truth_samples < 2:
        raise UserError(f"--truth-samples {cfg.truth_samples}: the ground truth needs at least 2 continuations per state (default 256)")
    if cfg.problems < 1:
        raise UserError(f"--problems {cfg.problems}: audit at least 1 problem")
    if cfg.k is not None and cfg.k < 1:
        raise UserError(f"--k {cfg.k}: VinePPO needs at least 1 continuation per state")
    task = get_task(task_name)
    if "ppo" in cfg.algos and critic is None and critic_iterations < 1:
        raise UserError("ppo's credit needs a critic: pass --critic RUN (a ppo run folder) or --critic-iterations N > 0 to train one")
    checkpoint = critic_checkpoint(Path(critic), task_name) if critic is not None else None
    model = policy_to_load(policy or (str(critic) if critic is not None else "default"), task_name)
    check_model(model)
    train_cfg = TrainConfig()  # the training sampler and engine as configured (gin)
    log = lambda message: print(f"audit: {message}", file=sys.stderr, flush=True)  # noqa: E731

    out = Path(out)
    runs.check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    critic_info = None
    if "ppo" in cfg.algos:
        if checkpoint is None:
            run_dir = out / f"critic-ppo-{critic_iterations}it"
            log(f"training a critic for ppo: {critic_iterations} iterations of `rlzoo train --algo ppo` (policy frozen) into {run_dir}")
            checkpoint = critic_checkpoint(train_critic(model, task_name, critic_iterations, run_dir, cfg.seed), task_name)
        run_dir = checkpoint.parent.parent
        trains = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
        critic_info = {"checkpoint": shown_path(str(checkpoint), out), "trained_here": critic is None,
                       "iterations": runs.read_run(run_dir).get("budget", {}).get("iterations"),
                       # what the critic cost PPO in training: its update, per iteration (inference is in compute)
                       "update_seconds_per_iteration": float(np.mean([r.get("time/critic", np.nan) for r in trains])) if trains else None}

    cfg = replace(cfg, temperature=train_cfg.temperature, top_p=train_cfg.top_p)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy_model, tokenizer = load_policy(model, device=device)
    engine = ENGINES.get(train_cfg.engine)(policy_model, tokenizer, max_batch_size=train_cfg.engine_batch_size)
    split = "test" if "test" in task.splits else task.eval_splits[0]
    problems = task.problems(split)[: cfg.problems]
    started = time.perf_counter()
    result = audit(policy_model, tokenizer, engine, task, problems, cfg,
                   critic=load_critic(checkpoint, device) if checkpoint is not None else None, device=device, log=log)
    # Paths as seen from `out`: a report records no machine's folder names (leaderboard_sections rebases them).
    given = policy or (str(critic) if critic is not None else "default")
    result |= {"policy": shown_path(given, out), "policy_is_path": given != "default" and Path(given).expanduser().exists(),
               "policy_loaded": shown_path(model, out), "split": split,
               "critic": critic_info, "seconds": time.perf_counter() - started, "config": gin.config_str(),
               "provenance": provenance(portable_command(command, out))}
    write_report(result, out)
    log(f"wrote {out}/audit.json, audit.md and plots ({', '.join(PLOTS)}) in {result['seconds']:.0f}s")
    if (out.parent / "index.html").is_file():
        log(f"re-run `rlzoo leaderboard ... --out {out.parent}` to add this audit to its page")
    return result


# ------------------------------------------------------------------------------------------ report


def _ci_text(m: dict, digits: int = 3) -> str:
    if m["mean"] is None:
        return "–"
    lo, hi = m["ci"]
    return f"{m['mean']:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else "")


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
        label = f"{name} (K={s['k']})" if "k" in s else name
        summary.append([label, _ci_text(s["value_mae"]), _ci_text(s["sign_agreement"]), _ci_text(s["ranking_accuracy"]),
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
                        *[_ci_text(s["mae_by_step"][t]) for s in strategies.values()]])
    by_step_note = "Value MAE by step index t (the state after t steps; t = 0 is the prompt alone)."
    return [("Credit accuracy against Monte-Carlo truth", note, summary[0], summary[1:]),
            ("Value MAE by step position", by_step_note, by_step[0], by_step[1:])]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
    lines = []
    for title, note, header, rows in tables(result):
        lines += [f"{h} {title}", "", note, "", _md_table(header, rows), ""]
    lines += [f"{h} Plots", ""] + [f"![{p}]({plot_prefix}{p}.png) ([SVG]({plot_prefix}{p}.svg))" for p in PLOTS] + [""]
    lines += [DEFINITIONS, ""]
    return "\n".join(lines)


def _policy_from_parent(result: dict, audit_dir: Path) -> str:
    """The audited policy as the page one folder up (the leaderboard's) sees it: a path, rebased onto it."""
    policy = str(result.get("policy"))
    return os.path.normpath(os.path.join(Path(audit_dir).name, policy)) if result.get("policy_is_path") else policy


def leaderboard_sections(audit_dir: Path) -> tuple[str, str]:
    """(Markdown, HTML) sections of the audit in ``audit_dir`` (a subfolder "audit" of the leaderboard folder)."""
    result = json.loads((Path(audit_dir) / "audit.json").read_text())
    title = f"Credit audit — {result['task']}, policy {_policy_from_parent(result, audit_dir)}"
    return f"## {title}\n\n" + markdown_section(result, plot_prefix=f"{Path(audit_dir).name}/", level=3), html_section(audit_dir)


def html_section(audit_dir: Path) -> str:
    """The audit in ``audit_dir`` as one self-contained HTML section (plots inlined)."""
    audit_dir = Path(audit_dir)
    result = json.loads((audit_dir / "audit.json").read_text())
    parts = [f"<h2>Credit audit — {html.escape(result['task'])}, policy {html.escape(_policy_from_parent(result, audit_dir))}</h2>"]
    for title, note, header, rows in tables(result):
        parts += [f"<h3>{html.escape(title)}</h3>", f"<p>{html.escape(note)}</p>", _html_table(header, rows)]
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
    (out / "audit.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    make_plots(result, out)
    s = result["settings"]
    header = [f"# Credit audit — {result['task']}", "",
              f"Policy `{result.get('policy')}`; strategies {', '.join(s['algos'])}; {s['problems']} problems x {s['group_size']} "
              f"responses at T={s['temperature']}, top-p {s['top_p']}; {s['truth_samples']} truth samples per state; "
              f"{s['alternatives']} alternatives per state; seed {s['seed']}.", ""]
    if result.get("critic"):
        c = result["critic"]
        line = f"ppo's critic: `{c['checkpoint']}`"
        line += f" (trained here, {c['iterations']} iterations, policy frozen)" if c["trained_here"] else ""
        if c.get("update_seconds_per_iteration"):
            line += f"; its updates cost {c['update_seconds_per_iteration']:.1f}s per training iteration"
        header += [line + ".", ""]
    prov = result.get("provenance", {})
    footer = ["## Provenance", "", "```", *[f"{k}: {v}" for k, v in prov.items()], "```", "", "Paths are relative to this folder.", ""] if prov else []
    (out / "audit.md").write_text("\n".join(header + [markdown_section(result)] + footer))
