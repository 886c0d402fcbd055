"""The leaderboard: read run folders, compare strategies with statistics, write tables, plots and one HTML page.

Input is run folders as ``rlzoo/runs.py`` documents them, nothing else. Runs are grouped by strategy
(``run.json`` "algo"); the seeds of a strategy are its samples. Every number below is computed per run
first, then summarised over the seeds of a strategy as mean ± half-width of the 95% confidence interval
(Student's t with n − 1 degrees of freedom; none for a single seed).

Accuracy is ``eval/<split>/<metric>`` (metric ``pass@1`` by default) from the eval records:
"final" is the last eval of a run, "best" its maximum over evals.

Generalization (as in the VinePPO paper, test accuracy at matched train accuracy): each run's eval
records trace a curve of test accuracy against train accuracy. Levels are chosen where every run has
data: evenly spaced over the intersection of the runs' train-accuracy ranges. The rule for curves that
go up and down: walk the evals in training order and take the first segment between consecutive evals
whose train-accuracy range contains the level, then interpolate test accuracy linearly inside it — "the
test accuracy when the run first reached that train accuracy". A piecewise-linear curve crosses every
level between its minimum and maximum, so the value always exists inside the common range.
The gap of a run is the mean over levels of (train level − test accuracy there).

Speed against the baseline (value-network PPO, strategy "ppo"): the target is the maximum of the
baseline's mean test-accuracy curve over train wall-clock (seeds interpolated on a common grid, the
curve plotted in ``acc_vs_time``); a strategy's time to target is the first time its own mean curve
reaches it; speed-up = baseline's time / strategy's time. The same on the FLOPs axis (``flops/total``,
plotted in ``acc_vs_flops``), whose target is the maximum of the baseline's mean curve over FLOPs: FLOPs
do not drift with the load of a shared machine the way seconds do. Welch's unequal-variance t-test
compares each strategy's final (and best) test accuracy over seeds with the baseline's.

Gains: a run's gain is its last eval's accuracy minus its first's (train subset, test split). Every
evaluation of a run samples the same problems with the same seeds, and so do the runs of every strategy
with the same seed, so gains and differences are paired: a strategy's paired difference with the
baseline is, per seed both ran, its final accuracy minus the baseline's, summarised as mean ± t-interval
over those seeds (a paired t-test for p), which cancels the seed-to-seed spread of the starting point.

Train records, as ``rlzoo train`` writes them: ``time/<stage>`` is that iteration's seconds in the stage,
``time/iteration`` its total, ``time/train_total`` the cumulative training seconds, ``tokens/<purpose>``
the cumulative tokens generated for that purpose (policy rollouts, MC value rollouts), ``flops/<stage>``
that iteration's estimated FLOPs in the stage and ``flops/total`` the cumulative FLOPs (also on eval
records); effective GFLOP/s of a stage = its FLOPs / its seconds, summed over a run's iterations.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from rlzoo.errors import UserError
from rlzoo.reporting import (
    ALPHA,
    CONFIDENCE,
    html_tables,
    jsonable,
    md_table,
    md_tables,
    mean_ci,
    provenance,
)
from rlzoo.runs import Run, load_run
N_MATCHED_LEVELS = 5  # train-accuracy levels in the generalization table
GRID_POINTS = 400  # common time / iteration grid for mean curves
PLOTS = ("acc_vs_time", "acc_vs_flops", "acc_vs_iterations", "test_vs_train", "kl_vs_acc")
STAGE_ORDER = ("generation", "reward", "mc", "logprobs", "critic", "advantages", "update")


# --------------------------------------------------------------------------------------------------
# Statistics


def nearly_constant(values) -> bool:
    """All equal up to float rounding (scipy's t-tests lose all precision there and warn; the answer is plain)."""
    values = np.asarray(values, dtype=float)
    return float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.abs(values).max()))


def welch(a, b) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test of mean(a) vs mean(b): (t, two-sided p, degrees of freedom);
    nans where a side has fewer than two values."""
    a = [v for v in a if v is not None and np.isfinite(v)]
    b = [v for v in b if v is not None and np.isfinite(v)]
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    if nearly_constant(a) and nearly_constant(b):
        gap = np.mean(a) - np.mean(b)
        return (math.nan, 1.0, math.nan) if nearly_constant([np.mean(a), np.mean(b)]) else (math.copysign(math.inf, gap), 0.0, math.nan)
    with warnings.catch_warnings():
        # One constant side (every seed at its starting accuracy) is a valid Welch test, its variance 0; scipy warns
        # of precision loss computing that 0.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        r = stats.ttest_ind(a, b, equal_var=False)
    return float(r.statistic), float(r.pvalue), float(r.df)


def seeds_to_separate(diff: float, sd: float, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Seeds per strategy for a two-sided test at level alpha to detect a true difference ``diff`` with the
    given power, when seed-to-seed standard deviation is ``sd`` (normal approximation)."""
    if not diff or not np.isfinite(sd):
        return math.inf
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * (z * sd / diff) ** 2)


def first_crossing(xs, ys, level: float) -> float:
    """y where the polyline (xs[i], ys[i]), walked in order, first reaches x == level; linear inside the
    first segment whose x-range contains level. nan if it never does."""
    for i in range(len(xs) - 1):
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        if min(x0, x1) <= level <= max(x0, x1):
            if x0 == x1:
                return float(y0)
            return float(y0 + (level - x0) / (x1 - x0) * (y1 - y0))
    if len(xs) == 1 and xs[0] == level:
        return float(ys[0])
    return math.nan


def common_levels(curves: list[tuple[np.ndarray, np.ndarray]], n: int = N_MATCHED_LEVELS) -> np.ndarray:
    """``n`` train-accuracy levels spread evenly over the range every curve covers (empty if they share
    none)."""
    lo = max(float(np.min(x)) for x, _ in curves)
    hi = min(float(np.max(x)) for x, _ in curves)
    if lo > hi:
        return np.array([])
    if lo == hi:
        return np.array([lo])
    return np.linspace(lo, hi, n)


def curve_on_grid(xs, ys, grid) -> np.ndarray:
    """Linear interpolation on ``grid``; before the first point and after the last the end values hold."""
    return np.interp(grid, xs, ys)


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]], points: int = GRID_POINTS):
    """(grid, mean, ci half-width) of curves on a common grid from 0 to where the shortest one ends."""
    end = min(float(x[-1]) for x, _ in curves)
    grid = np.linspace(0.0, end, points) if end > 0 else np.array([0.0])
    ys = np.stack([curve_on_grid(x, y, grid) for x, y in curves])  # [runs, points]
    mean = ys.mean(axis=0)
    if len(curves) < 2:
        return grid, mean, np.full_like(mean, np.nan)
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(curves) - 1) * ys.std(axis=0, ddof=1) / math.sqrt(len(curves))
    return grid, mean, half


def time_to_reach(grid: np.ndarray, values: np.ndarray, target: float) -> float:
    """First x on the polyline (grid, values) where values reach ``target``; nan if never."""
    hit = np.nonzero(values >= target - 1e-12)[0]
    if len(hit) == 0:
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(grid[0])
    x0, x1, y0, y1 = grid[i - 1], grid[i], values[i - 1], values[i]
    return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))


# --------------------------------------------------------------------------------------------------
# Per-run numbers


def _stage_key(stage: str):
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def _acc(record: dict, split: str, metric: str) -> float:
    v = record.get(f"eval/{split}/{metric}")
    return float(v) if v is not None else math.nan


def _kl_at(trains: list[dict], iteration: int) -> float:
    """kl/ref of the last train record at or before ``iteration`` (0 before any update: policy = reference)."""
    kl = 0.0 if iteration == 0 else math.nan
    for r in trains:
        if r.get("iteration", 0) > iteration:
            break
        if r.get("kl/ref") is not None:
            kl = float(r["kl/ref"])
    return kl


def _gflops_per_second(trains: list[dict], stage: str) -> float:
    """Effective GFLOP/s of a stage over a run: all its FLOPs over all its seconds (iterations with both)."""
    both = [r for r in trains if r.get(f"flops/{stage}") is not None and r.get(f"time/{stage}")]
    return sum(r[f"flops/{stage}"] for r in both) / sum(r[f"time/{stage}"] for r in both) / 1e9 if both else math.nan


def run_numbers(run: Run, metric: str) -> dict:
    """Everything the leaderboard needs from one run, as plain numbers and arrays."""
    evals = [e for e in run.evals if np.isfinite(_acc(e, "test", metric))]
    records = run.trains + run.evals
    stages = sorted({k[5:] for r in run.trains for k in r if k.startswith("time/") and k not in ("time/train_total", "time/iteration")})
    flop_stages = sorted({k[6:] for r in run.trains for k in r if k.startswith("flops/") and k != "flops/total"})
    n = {
        "iterations": max((r.get("iteration", 0) for r in records), default=0),
        "episodes": max((r.get("episodes", 0) for r in records), default=0),
        "train_seconds": max((r.get("time/train_total", 0.0) for r in records), default=0.0),
        "time": np.array([e.get("time/train_total", 0.0) for e in evals], dtype=float),
        "iteration": np.array([e.get("iteration", 0) for e in evals], dtype=float),
        "test": np.array([_acc(e, "test", metric) for e in evals]),
        "train": np.array([_acc(e, "train", metric) for e in evals]),
        "ood_test": np.array([_acc(e, "ood_test", metric) for e in evals]),
        "kl": np.array([_kl_at(run.trains, e.get("iteration", 0)) for e in evals]),
        "stage_seconds": {
            s: float(np.mean([r[f"time/{s}"] for r in run.trains if r.get(f"time/{s}") is not None])) for s in stages
        },
        # Runs written before FLOPs were counted have none: nan, left out of every FLOPs number.
        "flops": np.array([float(e["flops/total"]) if e.get("flops/total") is not None else math.nan for e in evals]),
        "flops_total": float(max((r["flops/total"] for r in records if r.get("flops/total") is not None), default=math.nan)),
        "stage_gflops": {s: _gflops_per_second(run.trains, s) for s in flop_stages},
        "tokens_policy": float(max((r.get("tokens/policy") or 0 for r in run.trains), default=0)),  # cumulative
        "tokens_mc": float(max((r.get("tokens/mc") or 0 for r in run.trains), default=0)),
        "peak_rss_mb": max((r["memory/peak_rss_mb"] for r in run.trains if r.get("memory/peak_rss_mb") is not None), default=math.nan),
    }
    n["final_test"] = float(n["test"][-1])
    n["best_test"] = float(n["test"].max())
    n["final_train"] = float(n["train"][-1])
    n["initial_test"] = float(n["test"][0])
    n["initial_train"] = float(n["train"][0])
    n["test_gain"] = n["final_test"] - n["initial_test"]
    n["train_gain"] = n["final_train"] - n["initial_train"]  # nan where the train subset was not evaluated
    n["final_ood_test"] = float(n["ood_test"][-1])
    n["best_ood_test"] = float(np.nanmax(n["ood_test"])) if np.isfinite(n["ood_test"]).any() else math.nan
    n["s_per_iteration"] = n["train_seconds"] / n["iterations"] if n["iterations"] else math.nan
    return n


def _train_curve(n: dict) -> tuple[np.ndarray, np.ndarray] | None:
    ok = np.isfinite(n["train"]) & np.isfinite(n["test"])
    return (n["train"][ok], n["test"][ok]) if ok.any() else None


# --------------------------------------------------------------------------------------------------
# Summary over seeds


def summarize(runs: list[Run], baseline: str = "ppo", metric: str = "pass@1") -> dict:
    """Per-strategy statistics (see the module docstring); the dict written as results.json."""
    usable = [r for r in runs if any(np.isfinite(_acc(e, "test", metric)) for e in r.evals)]
    if not usable:
        known = sorted({k for r in runs for e in r.evals for k in e if k.startswith("eval/test/")})
        if known:
            raise UserError(f"no run has eval/test/{metric}; metrics present: {', '.join(known)}")
        raise UserError(f"no eval records with test accuracy in {', '.join(str(r.path) for r in runs[:3])}: runs must evaluate at least once")
    per_run = {str(r.path): run_numbers(r, metric) for r in usable}
    groups: dict[str, list[Run]] = {}
    for r in usable:
        groups.setdefault(r.algo, []).append(r)
    names = sorted(groups, key=lambda a: (a != baseline, a))
    nums = {a: [per_run[str(r.path)] for r in groups[a]] for a in names}
    warnings = [f"{r.name} ({r.path.name}) has no test evaluation yet: left out" for r in runs if r not in usable]
    warnings += caveats(groups, baseline)

    # Matched train accuracy: levels common to every run of every strategy.
    curves = {a: [c for c in map(_train_curve, nums[a]) if c is not None] for a in names}
    all_curves = [c for a in names for c in curves[a]]
    levels = common_levels(all_curves) if all_curves else np.array([])
    if all_curves and len(levels) == 0:
        warnings.append("the runs' train-accuracy ranges do not overlap: no matched-train-accuracy comparison")

    # Baseline target for speed: the max of its mean test-accuracy curve over train seconds.
    time_curves = {a: mean_curve([(n["time"], n["test"]) for n in nums[a]]) for a in names}
    iter_curves = {a: mean_curve([(n["iteration"], n["test"]) for n in nums[a]]) for a in names}
    target = t_base = math.nan
    if baseline in groups:
        grid, mean, _ = time_curves[baseline]
        target = float(mean.max())
        t_base = time_to_reach(grid, mean, target)
        if t_base == 0:
            warnings.append(f"{baseline}'s best mean test accuracy is its starting accuracy (training never improved on it): no speed-up to measure")

    # The same on the FLOPs axis, over the runs that count FLOPs (its own target: the max of the baseline's mean curve there).
    flop_curves = {a: mean_curve(c) for a in names
                   if (c := [(n["flops"], n["test"]) for n in nums[a] if np.isfinite(n["flops"]).all()])}
    flop_train_curves = {a: mean_curve(c) for a in names
                         if (c := [(n["flops"], n["train"]) for n in nums[a] if np.isfinite(n["flops"]).all() and np.isfinite(n["train"]).all()])}
    flop_target = f_base = math.nan
    if baseline in flop_curves:
        grid, mean, _ = flop_curves[baseline]
        flop_target = float(mean.max())
        f_base = time_to_reach(grid, mean, flop_target)

    strategies = {}
    for a in names:
        ns = nums[a]
        s: dict = {"runs": len(ns), "seeds": [r.seed for r in groups[a]], "status": sorted(r.status for r in groups[a])}
        for key in ("iterations", "episodes", "train_seconds", "final_test", "best_test", "final_train", "final_ood_test",
                    "best_ood_test", "s_per_iteration", "tokens_policy", "tokens_mc", "initial_test", "initial_train",
                    "test_gain", "train_gain", "flops_total"):
            s[key] = mean_ci([n[key] for n in ns])
        s["peak_rss_mb"] = max((n["peak_rss_mb"] for n in ns if np.isfinite(n["peak_rss_mb"])), default=math.nan)
        stage_names = sorted({k for n in ns for k in n["stage_seconds"]}, key=_stage_key)
        s["stage_seconds"] = {k: mean_ci([n["stage_seconds"].get(k, math.nan) for n in ns])[0] for k in stage_names}
        s["stage_gflops"] = {k: mean_ci([n["stage_gflops"].get(k, math.nan) for n in ns])[0]
                             for k in sorted({k for n in ns for k in n["stage_gflops"]}, key=_stage_key)}
        # generalization
        at_levels = np.array([[first_crossing(x, y, lv) for lv in levels] for x, y in curves[a]]) if len(levels) else np.zeros((0, 0))
        s["test_at_train"] = [mean_ci(at_levels[:, j]) for j in range(len(levels))]
        s["gen_gap"] = mean_ci([float(np.mean(levels - row)) for row in at_levels]) if len(levels) else (math.nan, math.nan, 0)
        # speed against the baseline
        grid, mean, _ = time_curves[a]
        t = time_to_reach(grid, mean, target) if np.isfinite(target) else math.nan
        s["time_to_target"] = t
        s["speedup"] = t_base / t if t > 0 and t_base > 0 else math.nan
        s["seeds_reaching_target"] = sum(bool((n["test"] >= target - 1e-12).any()) for n in ns) if np.isfinite(target) else 0
        f = time_to_reach(*flop_curves[a][:2], flop_target) if a in flop_curves and np.isfinite(flop_target) else math.nan
        s["flops_to_target"] = f
        s["flop_speedup"] = f_base / f if f > 0 and f_base > 0 else math.nan
        # paired with the baseline, seed by seed
        s["paired_vs_baseline"] = paired_differences(groups[a], ns, groups.get(baseline, []), nums.get(baseline, [])) \
            if baseline in groups and a != baseline else None
        # Welch against the baseline
        for key in ("final_test", "best_test"):
            if baseline in groups and a != baseline:
                s[f"welch_{key}"] = welch([n[key] for n in ns], [n[key] for n in nums[baseline]])
            else:
                s[f"welch_{key}"] = (math.nan, math.nan, math.nan)
        strategies[a] = s

    return {
        "task": usable[0].task,
        "metric": metric,
        "baseline": baseline,
        "confidence": CONFIDENCE,
        "baseline_target": target,
        "baseline_time_to_target": t_base,
        "baseline_flop_target": flop_target,
        "baseline_flops_to_target": f_base,
        "matched_train_levels": [float(v) for v in levels],
        "stated_budgets": sorted({stated_budget(r.info.get("budget")) for r in usable}),
        "strategies": strategies,
        "verdict": verdict(strategies, {a: [n["final_test"] for n in nums[a]] for a in names}),
        "has_ood": any(np.isfinite(n["final_ood_test"]) for ns in nums.values() for n in ns),
        "warnings": warnings,
        "runs": [
            {"path": str(r.path), "algo": r.algo, "seed": r.seed, "status": r.status, "model": r.info.get("model"),
             "model_sha256": r.info.get("model_sha256"),
             "budget": r.info.get("budget"), "command": r.info.get("command"),
             **{k: per_run[str(r.path)][k] for k in ("iterations", "episodes", "train_seconds", "initial_train", "final_train",
                                                    "initial_test", "final_test", "best_test", "final_ood_test",
                                                    "s_per_iteration", "tokens_policy", "tokens_mc", "flops_total", "peak_rss_mb")}}
            for r in usable
        ],
        "_curves": {"time": time_curves, "iterations": iter_curves, "per_run": {a: nums[a] for a in names}, "train": curves,
                    "flops": flop_curves, "flops_train": flop_train_curves},
    }


PAIRED_KEYS = ("final_test", "final_train", "test_gain", "train_gain")


def paired_differences(runs: list[Run], ns: list[dict], base_runs: list[Run], base_ns: list[dict]) -> dict:
    """Per key of ``PAIRED_KEYS``: (mean, CI half-width, pairs) of this strategy's value minus the
    baseline's over the seeds both ran, and the paired t-test's two-sided p (nan under two pairs)."""
    mine = {str(r.seed): n for r, n in zip(runs, ns)}
    theirs = {str(r.seed): n for r, n in zip(base_runs, base_ns)}
    seeds = [seed for seed in mine if seed in theirs]
    out: dict = {"seeds": seeds}
    for key in PAIRED_KEYS:
        diffs = [mine[seed][key] - theirs[seed][key] for seed in seeds]
        out[key] = mean_ci(diffs)
        out[f"p_{key}"] = paired_p(diffs)
    return out


def paired_p(diffs) -> float:
    """Two-sided p of the paired t-test (a one-sample t-test of the differences against 0)."""
    d = np.asarray([v for v in diffs if v is not None and np.isfinite(v)], dtype=float)
    if len(d) < 2:
        return math.nan
    if nearly_constant(d):
        return 1.0 if nearly_constant([d.mean(), 0.0]) else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def caveats(groups: dict[str, list[Run]], baseline: str) -> list[str]:
    """What breaks the controls of a comparison, for the reader to see before the numbers."""
    runs = [r for rs in groups.values() for r in rs]
    out = []
    unfinished = [f"{r.name} ({r.status})" for r in runs if r.status != "finished"]
    if unfinished:
        out.append(f"runs not finished, numbers at their last eval: {', '.join(unfinished)}")
    for key, what in (("model", "base models"), ("budget", "budgets"), ("rlzoo_version", "rlzoo versions")):
        seen = sorted({json.dumps(r.info.get(key), sort_keys=True) for r in runs})
        if len(seen) > 1:
            out.append(f"runs differ in {what} ({', '.join(seen)}): the comparison is not controlled")
    digests = sorted({r.info["model_sha256"][:12] for r in runs if r.info.get("model_sha256")})  # runs from before it have none
    if len(digests) > 1:
        out.append(f"runs started from different weights (sha256 {', '.join(digests)}...): the comparison is not controlled "
                   f"(the same model built or trained elsewhere: the default policy built on another kind of CPU rounds differently)")
    dropped = sorted({json.dumps({k: v for k, v in (r.info.get("dropped_problems") or {}).items() if v}, sort_keys=True)
                      for r in runs} - {"{}"})
    if dropped:  # train fitted the task to the model's context (rlzoo.tasks.fit_to_context)
        out.append(f"problems dropped because their prompt leaves too little of the model's context for a response "
                   f"(per split): {', '.join(dropped)}")
    for algo, rs in groups.items():
        seeds = [r.seed for r in rs]
        if len(set(map(str, seeds))) < len(seeds):
            out.append(f"{algo} has several runs with the same seed ({seeds})")
        if len(seeds) < 2:
            out.append(f"{algo} has a single seed: no confidence interval")
    if baseline not in groups:
        out.append(f"no {baseline!r} runs: speed-up and Welch tests need the baseline (pick one with --baseline)")
    return out


def stated_budget(budget: dict | None) -> str:
    """run.json's budget as the user stated it: the limits that are set (train marks unset ones 0 and
    lifts the iteration limit out of reach when another limit governs)."""
    limits = [f"{k}={v:g}" for k, v in (budget or {}).items() if v and not (k == "iterations" and v >= 10**8)]
    return ", ".join(limits) or "unknown"


def verdict(strategies: dict, finals: dict[str, list[float]]) -> str:
    """One paragraph: which strategy leads on final test accuracy and whether the seeds can tell it apart."""
    if len(strategies) < 2:
        return "Only one strategy: nothing to compare."
    ranked = sorted(strategies, key=lambda a: -strategies[a]["final_test"][0])
    top = ranked[0]
    if all(finals[a] == finals[top] for a in ranked):
        return (f"Every strategy ends every seed at the same final test accuracy ({_pct(strategies[top]['final_test'])}): "
                "nothing separates them at this budget.")
    if any(len(finals[a]) < 2 for a in ranked):
        return (f"{top} has the highest mean final test accuracy, but a strategy with a single seed has no confidence "
                "interval: these runs cannot tell the strategies apart. Run at least 3 seeds per strategy.")
    tied, apart = [], []
    for a in ranked[1:]:
        _, p, _ = welch(finals[top], finals[a])
        (apart if p < ALPHA else tied).append((a, p))
    lo_top = strategies[top]["final_test"][0] - strategies[top]["final_test"][1]
    overlap = [a for a in ranked[1:] if strategies[a]["final_test"][0] + strategies[a]["final_test"][1] >= lo_top]
    text = f"**{top}** has the highest mean final test accuracy ({_pct(strategies[top]['final_test'])})."
    if tied:
        rival = tied[0][0]
        sd = math.sqrt((np.var(finals[top], ddof=1) + np.var(finals[rival], ddof=1)) / 2)
        need = seeds_to_separate(strategies[top]["final_test"][0] - strategies[rival]["final_test"][0], sd)
        text += (f" It **cannot be told apart** from {', '.join(f'{a} (Welch p = {p:.2g})' for a, p in tied)} "
                 f"at the {CONFIDENCE:.0%} level with {len(finals[top])} seeds. ")
        text += (f"Separating it from {rival} at the observed difference and seed-to-seed spread would take about "
                 f"{need} seeds per strategy (80% power), or a longer budget that widens the gap." if np.isfinite(need)
                 else f"Its mean equals {rival}'s: no number of seeds separates them at this budget.")
    if apart:
        text += f" It is ahead of {', '.join(f'{a} (Welch p = {p:.2g})' for a, p in apart)} at the {CONFIDENCE:.0%} level."
    if overlap:
        text += f" 95% CIs overlapping the leader's: {', '.join(overlap)}."
    return text + " (Tests on final test accuracy over seeds, uncorrected for multiple comparisons.)"


# --------------------------------------------------------------------------------------------------
# Formatting


def _pct(mc) -> str:
    m, h, n = mc
    if not np.isfinite(m):
        return "–"
    return f"{100 * m:.1f} ± {100 * h:.1f}" if np.isfinite(h) else f"{100 * m:.1f}"


def _num(v, fmt="{:.2f}") -> str:
    if isinstance(v, tuple):
        v = v[0]
    return fmt.format(v) if v is not None and np.isfinite(v) else "–"


def _signed_pct(mc) -> str:
    m, h, _ = mc
    if not np.isfinite(m):
        return "–"
    return f"{100 * m:+.1f} ± {100 * h:.1f}" if np.isfinite(h) else f"{100 * m:+.1f}"


def _count(v) -> str:
    v = v[0] if isinstance(v, tuple) else v
    if not np.isfinite(v):
        return "–"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def _p(w) -> str:
    t, p, _ = w
    return "–" if not np.isfinite(p) else f"t = {t:.2f}, p = {p:.3g}"


def tables(res: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) for every table, shared by README.md and the HTML page."""
    S, base = res["strategies"], res["baseline"]
    m = res["metric"]
    out = []
    hdr = ["strategy", "seeds", "iterations", "episodes", "train seconds", "status"]
    rows = [[a, str(s["runs"]), _num(s["iterations"], "{:.0f}"), _num(s["episodes"], "{:.0f}"), _num(s["train_seconds"], "{:.0f}"),
             ", ".join(f"{s['status'].count(x)} {x}" for x in sorted(set(s["status"])))] for a, s in S.items()]
    out.append(("Budget", f"Stated budget: {' | '.join(res['stated_budgets'])}. All three measures are shown, whatever the budget "
                "fixed: a cheaper iteration is not a better algorithm.", hdr, rows))

    hdr = ["strategy", f"final test {m}", f"best test {m}", f"final train {m}"] + (["final ood_test"] if res["has_ood"] else []) + [
        f"Welch vs {base} (final)", f"Welch vs {base} (best)"]
    rows = [[a, _pct(s["final_test"]), _pct(s["best_test"]), _pct(s["final_train"])] + ([_pct(s["final_ood_test"])] if res["has_ood"] else [])
            + [_p(s["welch_final_test"]), _p(s["welch_best_test"])] for a, s in S.items()]
    out.append(("Accuracy", f"Percent, mean ± {res['confidence']:.0%} CI over seeds (Student t). Welch's t-test of each strategy against {base}.", hdr, rows))
    out.append(gains_table(res))

    levels = res["matched_train_levels"]
    about = ("Test accuracy when each run first reached the given train accuracy (linear between evals), levels "
             "spread over the range all runs cover; the gap is train level − test accuracy, averaged over levels.")
    if levels:
        hdr = ["strategy"] + [f"test @ train {100 * lv:.1f}" for lv in levels] + ["gap (train − test)"]
        rows = [[a] + [_pct(v) for v in s["test_at_train"]] + [_pct(s["gen_gap"])] for a, s in S.items()]
    else:  # said, not left out: a reader should see that the comparison could not be made
        hdr, rows = ["strategy", "test at matched train accuracy"], [[a, "no train-accuracy range common to all runs"] for a in S]
    out.append(("Generalization at matched train accuracy", about, hdr, rows))

    has_flops = any(np.isfinite(s["flops_total"][0]) for s in S.values())  # runs from before FLOPs were counted have none
    flop_target = res["baseline_flop_target"]
    hdr = ["strategy", f"time to {base}'s best (s)", f"speed-up vs {base}", "seeds reaching it"] + (
        [f"FLOPs to {base}'s best", f"FLOP speed-up vs {base}", "train FLOPs"] if has_flops else []) + [
        "s / iteration", "policy tokens", "MC tokens", "peak RSS (MB)"]
    rows = [[a, _num(s["time_to_target"], "{:.0f}") if np.isfinite(s["time_to_target"]) or not np.isfinite(res["baseline_target"]) else "not reached",
             _num(s["speedup"], "{:.2f}×"), f"{s['seeds_reaching_target']}/{s['runs']}"]
            + ([_count(s["flops_to_target"]) if np.isfinite(s["flops_to_target"]) or not np.isfinite(flop_target) else "not reached",
                _num(s["flop_speedup"], "{:.2f}×"), _count(s["flops_total"])] if has_flops else [])
            + [_num(s["s_per_iteration"], "{:.2f}"), _count(s["tokens_policy"]), _count(s["tokens_mc"]), _num(s["peak_rss_mb"], "{:.0f}")]
            for a, s in S.items()]
    target = res["baseline_target"]
    note = (f"{base}'s best = max of its mean test-accuracy curve over train seconds = {_pct((target, math.nan, 1))}; "
            "a strategy's time is where its own mean curve first reaches it. Tokens are per run (mean over seeds)."
            if np.isfinite(target) else f"No {base} runs: no speed target.")
    if has_flops:
        note += (" FLOPs are estimated (2·N per token position forward, 6·N forward + backward, N the model's parameters; "
                 "`flops/total`), training only, per run (mean over seeds)"
                 + (f"; on the FLOPs axis {base}'s best is the max of its mean curve over FLOPs = {_pct((flop_target, math.nan, 1))}."
                    if np.isfinite(flop_target) else "."))
    out.append(("Speed and cost", note, hdr, rows))

    stages = sorted({k for s in S.values() for k in s["stage_seconds"]}, key=_stage_key)
    if stages:
        hdr = ["strategy"] + [f"{k} (s)" for k in stages] + ["sum of stages (s)", "total s / iteration"]
        def cell(s, k):
            seconds, gflops = _num(s["stage_seconds"].get(k, math.nan), "{:.3f}"), s["stage_gflops"].get(k, math.nan)
            return f"{seconds} ({gflops:,.0f})" if gflops >= 100 else f"{seconds} ({gflops:.3g})" if np.isfinite(gflops) else seconds

        rows = [[a] + [cell(s, k) for k in stages]
                + [_num(sum(v for v in s["stage_seconds"].values() if np.isfinite(v)), "{:.3f}"), _num(s["s_per_iteration"], "{:.3f}")]
                for a, s in S.items()]
        note = "Mean over iterations, then over seeds (`time/<stage>` in train records)."
        if any(s["stage_gflops"] for s in S.values()):
            note += (" In parentheses: effective GFLOP/s of the stages that run a model, the stage's estimated FLOPs over its "
                     "seconds (`flops/<stage>`), mean over seeds.")
        out.append(("Seconds per iteration by stage", note, hdr, rows))
    return out


def gains_table(res: dict) -> tuple[str, str, list[str], list[list[str]]]:
    """Each strategy's gains over its own start, and its paired differences with the baseline."""
    S, base, m = res["strategies"], res["baseline"], res["metric"]

    def start_end(s, split):
        return f"{_num(100 * s[f'initial_{split}'][0], '{:.1f}')} → {_num(100 * s[f'final_{split}'][0], '{:.1f}')}"

    def paired(s, key):
        p = s["paired_vs_baseline"]
        if p is None:
            return ["–", "–"]
        return [f"{_signed_pct(p[key])} (n={p[key][2]})", _num(p[f"p_{key}"], "{:.3g}")]

    hdr = ["strategy", f"train {m}: first → last", "train gain", f"test {m}: first → last", "test gain",
           f"final test − {base} (paired)", "p (test)", f"final train − {base} (paired)", "p (train)"]
    rows = [[a, start_end(s, "train"), _signed_pct(s["train_gain"]), start_end(s, "test"), _signed_pct(s["test_gain"])]
            + paired(s, "final_test") + paired(s, "final_train") for a, s in S.items()]
    note = (f"Percentage points. Gain: a run's last evaluation minus its first, mean ± {res['confidence']:.0%} CI over seeds "
            f"(Student t). Every evaluation samples the same problems with the same seeds, for every strategy with the same "
            f"seed, so a strategy and {base} are compared seed by seed: the paired difference is the mean ± CI over the seeds "
            "both ran of this strategy's final accuracy minus the baseline's, p its paired t-test.")
    return "Gains", note, hdr, rows


# --------------------------------------------------------------------------------------------------
# Tuning sweeps (rlzoo bench --sweep)


def tuning_score(run: Run, metric: str = "pass@1") -> tuple[float, float]:
    """What a tuning run is judged by, never its test accuracy: (final train accuracy: the last eval's
    ``eval/train/<metric>``, the eval protocol on the fixed train subset; the tie-break: mean rollout
    ``reward/mean`` over the last quarter of its train iterations)."""
    train = _acc(run.evals[-1], "train", metric) if run.evals else math.nan
    rewards = [float(r["reward/mean"]) for r in run.trains if r.get("reward/mean") is not None]
    tail = rewards[-max(1, math.ceil(len(rewards) / 4)):]
    return train, float(np.mean(tail)) if tail else math.nan


def summarize_tuning(grid: list[tuple[str, ...]], runs: dict[str, dict[tuple[str, ...], list[Path]]], seeds: list = (),
                     metric: str = "pass@1") -> dict:
    """Per strategy: each setting's score (``tuning_score`` averaged over its tuning runs), the pick and the cost.

    ``runs``: strategy -> setting -> its tuning run folders (absent ones count as not run). A setting competes
    only if every one of its runs finished; the pick is the highest mean train accuracy, ties broken by the mean
    tail reward, then by grid order. Cost sums over every tuning run that started: runs, training seconds,
    episodes, and ``flops/total`` where the runs record it.
    """
    strategies = {}
    for algo, by_setting in runs.items():
        points, cost = [], {"runs": 0, "train_seconds": 0.0, "episodes": 0, "flops": None}
        for setting in grid:
            loaded = [load_run(d) for d in by_setting.get(setting, []) if (Path(d) / "run.json").is_file()]
            scores = [tuning_score(r, metric) for r in loaded]
            finished = sum(r.status == "finished" for r in loaded)
            status = ("finished" if loaded and finished == len(by_setting[setting]) else
                      "diverged" if any(r.status == "failed" for r in loaded) else "unfinished")
            points.append({"setting": list(setting), "status": status, "runs": len(loaded),
                           "train": float(np.mean([t for t, _ in scores])) if scores else math.nan,
                           "reward": float(np.mean([w for _, w in scores])) if scores else math.nan})
            for r in loaded:
                records = r.trains + r.evals
                cost["runs"] += 1
                cost["train_seconds"] += max((x.get("time/train_total", 0.0) for x in records), default=0.0)
                cost["episodes"] += max((x.get("episodes", 0) for x in records), default=0)
                flops = [x["flops/total"] for x in records if x.get("flops/total") is not None]
                if flops:
                    cost["flops"] = (cost["flops"] or 0) + max(flops)  # cumulative in the run: its last value
        ok = [p for p in points if p["status"] == "finished" and np.isfinite(p["train"])]
        best = max(ok, key=lambda p: (p["train"], p["reward"] if np.isfinite(p["reward"]) else -math.inf), default=None)
        strategies[algo] = {"points": points, "pick": best["setting"] if best else None, "cost": cost}
    total = {k: sum(s["cost"][k] for s in strategies.values()) for k in ("runs", "train_seconds", "episodes")}
    all_flops = [s["cost"]["flops"] for s in strategies.values() if s["cost"]["flops"] is not None]
    total["flops"] = sum(all_flops) if all_flops else None
    return {"metric": metric, "grid": [list(g) for g in grid], "seeds": list(seeds), "strategies": strategies, "cost": total}


def tuning_table(tuning: dict) -> tuple[str, str, list[str], list[list[str]]]:
    """The leaderboard's "Tuning" section: (title, note, header, rows), as ``tables`` gives them."""
    m, S = tuning["metric"], tuning["strategies"]
    has_flops = tuning["cost"]["flops"] is not None

    def cell(p: dict) -> str:
        if p["status"] != "finished":
            return p["status"]
        return f"{100 * p['train']:.1f} · {p['reward']:.3f}" if np.isfinite(p["reward"]) else f"{100 * p['train']:.1f}"

    def cost(c: dict) -> list[str]:
        return [str(c["runs"]), _num(c["train_seconds"], "{:.1f}"), _count(float(c["episodes"]))] + (
            [_count(float(c["flops"])) if c["flops"] is not None else "–"] if has_flops else [])

    hdr = ["strategy"] + [", ".join(g) for g in tuning["grid"]] + ["pick", "tuning runs", "train s", "episodes"] + (["FLOPs"] if has_flops else [])
    rows = [[a] + [cell(p) for p in s["points"]] + [", ".join(s["pick"]) if s["pick"] else "none"] + cost(s["cost"]) for a, s in S.items()]
    rows.append(["all"] + [""] * (len(tuning["grid"]) + 1) + cost(tuning["cost"]))
    seeds = tuning["seeds"]
    note = (f"Every strategy trained once per setting of the grid and tuning seed ({', '.join(map(str, seeds))}: never an "
            f"evaluation seed). Cells: final train {m} (%, the last evaluation on the fixed train subset) · mean rollout reward "
            "over the last quarter of iterations, both averaged over tuning seeds. The pick is the best train accuracy, ties "
            "broken by that reward; test accuracy plays no part. The tables above are the picked settings on the evaluation "
            "seeds. Cost: every tuning run, seconds of training (evaluation excluded)" + (", estimated FLOPs." if has_flops else "."))
    return "Tuning", note, hdr, rows


# --------------------------------------------------------------------------------------------------
# Plots


def make_plots(res: dict, out: Path) -> list[str]:
    """PNG and SVG of each plot in ``out``; returns the plot names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C, base, m = res["_curves"], res["baseline"], res["metric"]
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(res["strategies"])}

    def band(ax, key, xlabel):
        for a, (grid, mean, half) in C[key].items():
            ax.plot(grid, 100 * mean, color=colors[a], label=f"{a} (n={res['strategies'][a]['runs']})")
            if np.isfinite(half).any():
                ax.fill_between(grid, 100 * (mean - half), 100 * (mean + half), color=colors[a], alpha=0.2, lw=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {m} (%)")

    figs = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    band(ax, "time", "train wall-clock (s)")
    if np.isfinite(res["baseline_target"]):
        ax.axhline(100 * res["baseline_target"], color="gray", ls="--", lw=0.8, label=f"{base}'s best")
    ax.set_title(f"Test accuracy vs wall-clock (mean, {res['confidence']:.0%} CI)")
    figs["acc_vs_time"] = fig

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    band(ax, "flops", "estimated training FLOPs")
    for a, (grid, mean, _) in C["flops_train"].items():  # train accuracy dashed beside test, same colour
        ax.plot(grid, 100 * mean, color=colors[a], ls="--", lw=1.0, label=f"{a} train")
    if np.isfinite(res["baseline_flop_target"]):
        ax.axhline(100 * res["baseline_flop_target"], color="gray", ls=":", lw=0.8, label=f"{base}'s best (test)")
    if not C["flops"]:
        ax.text(0.5, 0.5, "no run records FLOPs", ha="center", transform=ax.transAxes)
    ax.set_ylabel(f"{m} (%): test solid, train dashed")
    ax.set_title(f"Accuracy vs FLOPs (mean, test {res['confidence']:.0%} CI)")
    figs["acc_vs_flops"] = fig

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    band(ax, "iterations", "iteration")
    ax.set_title(f"Test accuracy vs iterations (mean, {res['confidence']:.0%} CI)")
    figs["acc_vs_iterations"] = fig

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for a, curves in C["train"].items():
        for x, y in curves:
            ax.scatter(100 * x, 100 * y, color=colors[a], s=8, alpha=0.35)
        if curves:
            levels = common_levels(curves, n=50)
            if len(levels):
                at = np.array([[first_crossing(x, y, lv) for lv in levels] for x, y in curves])
                mean = at.mean(axis=0)
                ax.plot(100 * levels, 100 * mean, color=colors[a], label=a)
                if len(curves) > 1:
                    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(curves) - 1) * at.std(axis=0, ddof=1) / math.sqrt(len(curves))
                    ax.fill_between(100 * levels, 100 * (mean - half), 100 * (mean + half), color=colors[a], alpha=0.2, lw=0)
    lim = ax.get_xlim()
    ax.plot(lim, lim, color="gray", ls=":", lw=0.8, label="test = train")
    ax.set_xlabel(f"train {m} (%)")
    ax.set_ylabel(f"test {m} (%)")
    ax.set_title("Test vs train accuracy (evals; line: mean at matched train accuracy)")
    figs["test_vs_train"] = fig

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for a, ns in C["per_run"].items():
        for i, n in enumerate(ns):
            ok = np.isfinite(n["kl"])
            ax.plot(n["kl"][ok], 100 * n["test"][ok], color=colors[a], marker=".", lw=0.8, alpha=0.8, label=a if i == 0 else None)
    ax.set_xlabel("KL to reference (kl/ref)")
    ax.set_ylabel(f"test {m} (%)")
    ax.set_title("Test accuracy vs KL to the reference policy (one line per run)")
    figs["kl_vs_acc"] = fig

    for name, fig in figs.items():
        fig.axes[0].grid(alpha=0.3)
        if fig.axes[0].get_legend_handles_labels()[0]:  # e.g. acc_vs_flops over runs that predate FLOPs: nothing to name
            fig.axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        fig.savefig(out / f"{name}.svg")
        plt.close(fig)
    return list(figs)


# --------------------------------------------------------------------------------------------------
# Provenance and writing


def _csv_rows(res: dict) -> tuple[list[str], list[list]]:
    levels = res["matched_train_levels"]
    header = ["strategy", "runs"]
    for k in ("final_test", "best_test", "final_train", "final_ood_test", "gen_gap", "iterations", "episodes", "train_seconds",
              "s_per_iteration", "tokens_policy", "tokens_mc"):
        header += [f"{k}_mean", f"{k}_ci95"]
    header += [f"test_at_train_{lv:.4f}_mean" for lv in levels]
    header += ["time_to_baseline_best_s", "speedup_vs_baseline", "seeds_reaching_baseline_best", "peak_rss_mb",
               "welch_t_final", "welch_p_final", "welch_t_best", "welch_p_best"]
    stages = sorted({k for s in res["strategies"].values() for k in s["stage_seconds"]}, key=_stage_key)
    header += [f"time_{k}_s_per_iteration" for k in stages]
    gain_keys = ("initial_train", "initial_test", "train_gain", "test_gain", "flops_total")
    for k in gain_keys:
        header += [f"{k}_mean", f"{k}_ci95"]
    header += ["flops_to_baseline_best", "flop_speedup_vs_baseline"]
    for k in PAIRED_KEYS:
        header += [f"paired_{k}_diff_mean", f"paired_{k}_diff_ci95", f"paired_{k}_diff_n", f"paired_{k}_diff_p"]
    flop_stages = sorted({k for s in res["strategies"].values() for k in s["stage_gflops"]}, key=_stage_key)
    header += [f"gflops_per_s_{k}" for k in flop_stages]
    rows = []
    for a, s in res["strategies"].items():
        row = [a, s["runs"]]
        for k in ("final_test", "best_test", "final_train", "final_ood_test", "gen_gap", "iterations", "episodes", "train_seconds",
                  "s_per_iteration", "tokens_policy", "tokens_mc"):
            row += [s[k][0], s[k][1]]
        row += [v[0] for v in s["test_at_train"]]
        row += [s["time_to_target"], s["speedup"], s["seeds_reaching_target"], s["peak_rss_mb"],
                s["welch_final_test"][0], s["welch_final_test"][1], s["welch_best_test"][0], s["welch_best_test"][1]]
        row += [s["stage_seconds"].get(k, math.nan) for k in stages]
        for k in gain_keys:
            row += [s[k][0], s[k][1]]
        row += [s["flops_to_target"], s["flop_speedup"]]
        paired = s["paired_vs_baseline"]
        for k in PAIRED_KEYS:
            row += [paired[k][0], paired[k][1], paired[k][2], paired[f"p_{k}"]] if paired else ["", "", "", ""]
        row += [s["stage_gflops"].get(k, math.nan) for k in flop_stages]
        rows.append(["" if isinstance(v, float) and not np.isfinite(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return header, rows


def write_leaderboard(runs: list[Run], out: Path, command: str = "", baseline: str = "ppo", metric: str = "pass@1",
                      notes: list[str] | None = None, tuning: dict | None = None,
                      sections: list[tuple[str, str]] = ()) -> dict:
    """Write README.md, results.csv, results.json, runs.csv, plots/*.png|svg and index.html into ``out``;
    returns the results (as written to results.json). ``sections``: further (Markdown, HTML) sections of the page,
    after the plots (the credit audit's, as ``rlzoo.audit.leaderboard_sections`` makes them)."""
    res = summarize(runs, baseline=baseline, metric=metric)
    out = Path(out)
    # Run folders, models and the paths of run commands are written by their path from `out`, never by this machine's
    # absolute path.
    here = out.resolve()
    models = {r["model"] for r in res["runs"] if isinstance(r.get("model"), str)}
    for r in res["runs"]:
        absolute, r["path"] = str(r["path"]), os.path.relpath(r["path"], here)
        if isinstance(r.get("model"), str):
            r["model"] = rebase_paths(r["model"], [r["model"]], here)
        if r.get("command"):
            r["command"] = rebase_paths(r["command"], [absolute, *_run_command_paths(r["command"])], here)
    res["warnings"] = [rebase_paths(w, models, here) for w in res["warnings"]]  # "runs differ in base models (...)"
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = make_plots(res, out / "plots")
    prov = provenance(command)
    tabs = tables(res) + ([tuning_table(tuning)] if tuning else [])  # tuning: summarize_tuning's, from a bench with --sweep
    notes = list(notes or [])

    header, rows = _csv_rows(res)
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    run_keys = [k for k in res["runs"][0] if k not in ("command", "budget")]
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(run_keys + ["budget"])
        for r in res["runs"]:
            w.writerow([r[k] for k in run_keys] + [json.dumps(r["budget"])])
    public = {k: v for k, v in res.items() if not k.startswith("_")} | ({"tuning": tuning} if tuning else {})
    (out / "results.json").write_text(json.dumps(jsonable({**public, "provenance": prov, "notes": notes}), indent=2))

    title = f"rlzoo leaderboard — {res['task']}"
    prov_lines = [f"{k}: {v}" for k, v in prov.items()] + [f"note: {n}" for n in notes]
    md = [f"# {title}", "", res["verdict"], ""]
    if res["warnings"]:
        md += ["**Caveats**", ""] + [f"- {w}" for w in res["warnings"]] + [""]
    md += md_tables(tabs)
    md += ["## Plots", ""]
    for p in plots:
        md += [f"![{p}](plots/{p}.png)", f"([SVG](plots/{p}.svg))", ""]
    md += [section_md for section_md, _ in sections]
    md += ["## Runs", "", md_table(["run", "strategy", "seed", "status"],
                                    [[r["path"], r["algo"], str(r["seed"]), r["status"]] for r in res["runs"]]), ""]
    md += ["## Provenance", "", "```", *prov_lines, "```", "", "Paths are relative to this folder.",
           "Files: `results.csv` (per strategy), `runs.csv` (per run), `results.json` (everything), `index.html` (this page, self-contained).", ""]
    (out / "README.md").write_text("\n".join(md))

    imgs = "".join(
        f'<figure><img alt="{p}" src="data:image/png;base64,{base64.b64encode((out / "plots" / f"{p}.png").read_bytes()).decode()}"></figure>'
        for p in plots)
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{_md_bold_to_html(res['verdict'])}</p>"]
    if res["warnings"]:
        body += ["<h3>Caveats</h3><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in res["warnings"]) + "</ul>"]
    body += html_tables(tabs)
    body += ["<h2>Plots</h2>", imgs] + [section_html for _, section_html in sections]
    body += ["<h2>Provenance</h2>", f"<pre>{html.escape(chr(10).join(prov_lines))}</pre>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}figure{display:inline-block;margin:0.5em}"
             "img{max-width:520px}pre{background:#f7f7f7;padding:0.8em;overflow-x:auto}")
    (out / "index.html").write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body>{''.join(body)}</body></html>")
    return public


def _md_bold_to_html(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


RUN_PATH_OPTIONS = ("--out", "--model", "--config", "--deepspeed")  # the options of `rlzoo train` that name paths


def _run_command_paths(command: str) -> list[str]:
    """The values of ``RUN_PATH_OPTIONS`` in a run's recorded command."""
    try:
        args = shlex.split(command)
    except ValueError:  # recorded by an older rlzoo, unquoted
        args = command.split()
    found = []
    for before, arg in zip(["", *args], args):
        option, eq, value = arg.partition("=")
        if eq and option in RUN_PATH_OPTIONS:
            found.append(value)
        elif before in RUN_PATH_OPTIONS:
            found.append(arg)
    return found


def rebase_paths(text: str, paths, base: Path) -> str:
    """``text`` with every absolute path of ``paths`` in it (as a whole word, or the start of a longer path) replaced
    by its path from ``base``; relative paths and names ("default", hub ids) are left as given."""
    for p in sorted({p for p in paths if os.path.isabs(p)}, key=len, reverse=True):
        shown = os.path.relpath(Path(p).resolve(), base)
        text = re.sub(rf"(?<![^\s=\"']){re.escape(p)}(?=$|[\s/\"',)])", lambda _: shown, text)
    return text


def leaderboard_command(paths: list[Path], out: Path, baseline: str, metric: str) -> str:
    """The command line that reproduces a leaderboard (for provenance), as run in its output folder: the
    run folders by their path from there, so that no machine's folder names are recorded."""
    here = Path(out).resolve()
    args = ["rlzoo", "leaderboard", *(os.path.relpath(Path(p).resolve(), here) for p in paths), "--out", "."]
    if baseline != "ppo":
        args += ["--baseline", baseline]
    if metric != "pass@1":
        args += ["--metric", metric]
    return shlex.join(args)

