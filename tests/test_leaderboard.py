"""The leaderboard on run folders written to disk: statistics against textbook numbers, the
matched-train-accuracy rule on synthetic curves, every output file, and one-line errors for bad input."""

import csv
import json
import math
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rlzoo import reporting
from rlzoo.cli import main
from rlzoo.leaderboard import (
    PLOTS,
    common_levels,
    first_crossing,
    mean_ci,
    seeds_to_separate,
    summarize,
    tables,
    welch,
)
from rlzoo.runs import append_jsonl, find_runs, write_run


def write_run_folder(run_dir, algo, seed, evals, task="arith", status="finished", s_per_iter=1.0, mc_tokens=0, ood=None,
                     flops_per_iter=None):
    """A run folder as ``rlzoo train`` writes it: evals = {iteration: (train_acc, test_acc)}, evaluated
    before the update of that iteration; one train record per update with per-iteration stage seconds and
    cumulative tokens. ``ood``: {iteration: ood_test_acc}. ``flops_per_iter``: FLOPs of an update (60% in
    generation, 40% in the update stage), cumulative ``flops/total`` on every record; None: a run from
    before FLOPs were counted."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    iterations = max(evals)
    write_run(run_dir, {"format": 1, "algo": algo, "task": task, "model": "default", "seed": seed,
                        "budget": {"iterations": iterations, "episodes": 0, "seconds": 0.0}, "rlzoo_version": "0.1.0",
                        "command": f"rlzoo train --algo {algo} --seed {seed} --out {run_dir.resolve()}",
                        "started": "2026-01-01T00:00:00+0000", "status": status})
    flops = lambda done: {} if flops_per_iter is None else {"flops/total": flops_per_iter * done}  # noqa: E731
    for it in range(iterations + 1):
        common = {"iteration": it, "episodes": 64 * it, "time/train_total": s_per_iter * it, **flops(it)}
        if it in evals:
            train_acc, test_acc = evals[it]
            record = {"kind": "eval", **common, "eval/train/pass@1": train_acc, "eval/test/pass@1": test_acc, "time/eval": 0.5}
            if ood is not None:
                record["eval/ood_test/pass@1"] = ood[it]
            append_jsonl(run_dir / "metrics.jsonl", record)
        if it < iterations:
            done = it + 1
            append_jsonl(run_dir / "metrics.jsonl", {
                "kind": "train", "iteration": done, "episodes": 64 * done, "time/train_total": s_per_iter * done,
                "reward/mean": 0.5, "time/generation": 0.6 * s_per_iter, "time/update": 0.4 * s_per_iter,
                "time/iteration": s_per_iter, "tokens/policy": 1000 * done, "tokens/mc": mc_tokens * done,
                "kl/ref": 0.01 * done, "memory/peak_rss_mb": 300.0 + seed, **flops(done),
                **({} if flops_per_iter is None else {"flops/generation": 0.6 * flops_per_iter, "flops/update": 0.4 * flops_per_iter})})
    return run_dir


# ------------------------------------------------------------------------------------------- statistics


def test_mean_ci_matches_the_textbook_t_interval():
    mean, half, n = mean_ci([1, 2, 3, 4, 5])
    # s = sqrt(2.5); t(0.975, 4) = 2.776 (t table): 2.776 * 1.5811 / sqrt(5) = 1.963
    assert (mean, n) == (3.0, 5)
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), abs=1e-3)
    assert half == pytest.approx(1.9632, abs=1e-4)
    mean, half, n = mean_ci([0.5, float("nan"), 0.7])  # nan (a run without that split) is left out
    assert (mean, n) == (pytest.approx(0.6), 2)
    assert half == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2), abs=1e-3)
    assert math.isnan(mean_ci([0.4])[1]) and mean_ci([0.4])[0] == 0.4
    assert math.isnan(mean_ci([])[0])


def test_welch_matches_the_textbook_example_and_not_students_test():
    # Wikipedia, "Welch's t-test", example 2 (unequal sizes and variances): t = -1.57, df = 9.9, p = 0.149,
    # where Student's pooled test gives t = -2.10, p = 0.045.
    a = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
    b = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5, 21.5, 21.8]
    t, p, df = welch(a, b)
    assert round(t, 2) == -1.57 and round(df, 1) == 9.9 and round(p, 3) == 0.149
    # and the Welch-Satterthwaite formulas by hand
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t_hand = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df_hand = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert t == pytest.approx(t_hand) and df == pytest.approx(df_hand)
    assert p == pytest.approx(2 * stats.t.sf(abs(t_hand), df_hand))


def test_welch_on_degenerate_samples():
    assert all(math.isnan(v) for v in welch([0.5], [0.4, 0.6]))  # one seed: no test
    assert welch([0.5, 0.5], [0.5, 0.5])[1] == 1.0  # identical constants: no difference
    assert welch([0.6, 0.6], [0.5, 0.5])[1] == 0.0  # different constants: certain
    # equal up to float rounding (accuracies summed in another order): no test of noise, and no scipy warning
    import warnings

    from rlzoo.leaderboard import paired_p

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert welch([0.1 + 0.2, 0.3], [0.3, 0.3])[1] == 1.0
        assert paired_p([0.1 + 0.2 - 0.3, 0.0, 0.0]) == 1.0
        assert paired_p([0.25 + 1e-17, 0.25, 0.25]) == 0.0
        # one side constant (every seed at its starting accuracy): Welch's test still runs, on the other's variance
        t, p, _ = welch([0.3857421875] * 3, [0.30, 0.35, 0.40])
    expected = (0.3857421875 - 0.35) / math.sqrt(np.var([0.30, 0.35, 0.40], ddof=1) / 3)  # the constant side adds no variance
    assert t == pytest.approx(expected) and p == pytest.approx(2 * stats.t.sf(expected, df=2))


def test_seeds_to_separate_follows_the_normal_power_formula():
    # two-sided 5%, 80% power: n = 2 (1.96 + 0.8416)^2 (sd / d)^2 = 15.7 -> 16 for sd = d
    assert seeds_to_separate(0.05, 0.05) == 16
    assert seeds_to_separate(0.0, 0.05) == math.inf


# ------------------------------------------------------------------------------------ matched train accuracy


def test_first_crossing_interpolates_inside_the_first_segment_that_reaches_the_level():
    assert first_crossing([0.1, 0.3, 0.5], [0.0, 0.2, 0.6], 0.4) == pytest.approx(0.4)
    # train accuracy goes up, down, up: the level 0.5 is crossed three times; the first crossing counts
    train, test = [0.2, 0.6, 0.4, 0.8], [0.1, 0.5, 0.1, 0.9]
    assert first_crossing(train, test, 0.5) == pytest.approx(0.4)  # 0.1 + 0.75 * 0.4, not 0.3 or 0.5
    assert first_crossing(train, test, 0.7) == pytest.approx(0.7)  # first reached on the last segment
    assert first_crossing(train, test, 0.2) == pytest.approx(0.1)  # at a point
    assert math.isnan(first_crossing(train, test, 0.9))  # never reached
    assert first_crossing([0.3, 0.3], [0.1, 0.2], 0.3) == 0.1  # a flat segment: its first point


def test_common_levels_span_the_train_range_every_run_covers():
    curves = [(np.array([0.2, 0.6]), None), (np.array([0.3, 0.9, 0.5]), None)]
    assert np.allclose(common_levels(curves, n=4), [0.3, 0.4, 0.5, 0.6])
    assert len(common_levels([(np.array([0.1, 0.2]), None), (np.array([0.3, 0.4]), None)])) == 0


def test_generalization_gap_at_matched_train_accuracy_on_synthetic_curves(tmp_path):
    # "wide" generalizes with test = train - 0.1, "narrow" with test = train - 0.2; one "wide" run is
    # non-monotone and its later crossings would give other values: the first-crossing rule must hold.
    write_run_folder(tmp_path / "w0", "wide", 0, {0: (0.2, 0.1), 5: (0.4, 0.3), 10: (0.6, 0.5)})
    write_run_folder(tmp_path / "w1", "wide", 1, {0: (0.2, 0.1), 5: (0.7, 0.6), 10: (0.4, 0.1), 15: (0.65, 0.2)})
    write_run_folder(tmp_path / "n0", "narrow", 0, {0: (0.3, 0.1), 5: (0.5, 0.3), 10: (0.7, 0.5)})
    write_run_folder(tmp_path / "n1", "narrow", 1, {0: (0.3, 0.1), 5: (0.8, 0.6)})
    res = summarize(find_runs([tmp_path]), baseline="narrow")
    levels = np.array(res["matched_train_levels"])
    assert np.allclose(levels, np.linspace(0.3, 0.6, 5))  # max of minima .. min of maxima
    for name, gap in (("wide", 0.1), ("narrow", 0.2)):
        s = res["strategies"][name]
        assert [m for m, _, _ in s["test_at_train"]] == pytest.approx(list(levels - gap))
        assert s["gen_gap"][0] == pytest.approx(gap)
        assert s["gen_gap"][1] == pytest.approx(0.0, abs=1e-12)


def test_time_to_the_baselines_best_and_speed_up(tmp_path):
    # Per iteration the same curve for ppo and grpo (test = 0.3 + 0.02 it, best 0.5 at it 10), but grpo's
    # iterations take half the time: it reaches ppo's best at 5 s instead of 10 s. vineppo learns faster per
    # iteration (0.3 + 0.05 it) at 2 s per iteration: 0.5 at it 4 = 8 s.
    for seed in (0, 1):
        curve = {it: (0.5, 0.3 + 0.02 * it) for it in range(0, 11, 2)}
        write_run_folder(tmp_path / f"ppo{seed}", "ppo", seed, curve, s_per_iter=1.0)
        write_run_folder(tmp_path / f"grpo{seed}", "grpo", seed, curve, s_per_iter=0.5)
        write_run_folder(tmp_path / f"vine{seed}", "vineppo", seed, {it: (0.5, 0.3 + 0.05 * it) for it in range(0, 7, 2)},
                         s_per_iter=2.0, mc_tokens=500)
    res = summarize(find_runs([tmp_path]))
    S = res["strategies"]
    assert res["baseline_target"] == pytest.approx(0.5)
    assert S["ppo"]["time_to_target"] == pytest.approx(10.0) and S["ppo"]["speedup"] == pytest.approx(1.0)
    assert S["grpo"]["time_to_target"] == pytest.approx(5.0) and S["grpo"]["speedup"] == pytest.approx(2.0)
    assert S["vineppo"]["time_to_target"] == pytest.approx(8.0) and S["vineppo"]["speedup"] == pytest.approx(1.25)
    # all three budget measures, stage seconds, cumulative tokens
    assert S["grpo"]["iterations"][0] == 10 and S["grpo"]["episodes"][0] == 640 and S["grpo"]["train_seconds"][0] == 5.0
    assert S["vineppo"]["iterations"][0] == 6 and S["vineppo"]["train_seconds"][0] == 12.0
    assert S["grpo"]["stage_seconds"] == {"generation": pytest.approx(0.3), "update": pytest.approx(0.2)}
    assert S["vineppo"]["tokens_policy"][0] == 6000 and S["vineppo"]["tokens_mc"][0] == 3000
    assert S["ppo"]["s_per_iteration"][0] == pytest.approx(1.0)
    assert S["ppo"]["peak_rss_mb"] == 301.0


def test_flops_to_the_baselines_best_and_effective_gflops(tmp_path):
    # The same curve per iteration for both; ppo's iterations cost 10 GFLOP in 1 s, grpo's 4 GFLOP in 2 s (a busy
    # machine): by wall-clock grpo is slower, by FLOPs it reaches ppo's best (0.5, at iteration 10) 2.5x cheaper.
    curve = {it: (0.5, 0.3 + 0.02 * it) for it in range(0, 11, 2)}
    for seed in (0, 1):
        write_run_folder(tmp_path / f"ppo{seed}", "ppo", seed, curve, s_per_iter=1.0, flops_per_iter=10e9)
        write_run_folder(tmp_path / f"grpo{seed}", "grpo", seed, curve, s_per_iter=2.0, flops_per_iter=4e9)
    write_run_folder(tmp_path / "old", "rloo", 0, curve)  # from before FLOPs were counted: left out of FLOPs numbers
    res = summarize(find_runs([tmp_path]))
    S = res["strategies"]
    assert res["baseline_flop_target"] == pytest.approx(0.5)
    assert S["ppo"]["flops_to_target"] == pytest.approx(100e9) and S["grpo"]["flops_to_target"] == pytest.approx(40e9)
    assert S["grpo"]["flop_speedup"] == pytest.approx(2.5) and S["grpo"]["speedup"] == pytest.approx(0.5)
    assert S["grpo"]["flops_total"][0] == pytest.approx(40e9) and math.isnan(S["rloo"]["flops_total"][0])
    assert math.isnan(S["rloo"]["flops_to_target"]) and "rloo" not in res["_curves"]["flops"]
    # effective GFLOP/s: a stage's FLOPs over its seconds (generation: 60% of the FLOPs in 60% of the time)
    assert S["ppo"]["stage_gflops"] == {"generation": pytest.approx(10.0), "update": pytest.approx(10.0)}
    assert S["grpo"]["stage_gflops"] == {"generation": pytest.approx(2.0), "update": pytest.approx(2.0)}
    assert S["rloo"]["stage_gflops"] == {}
    stage_table = next(rows for name, _, _, rows in tables(res) if name == "Seconds per iteration by stage")
    assert stage_table[0][1] == "0.600 (10)" and stage_table[1][1] == "1.200 (2)"  # ppo, grpo: seconds (GFLOP/s)


def test_gains_and_paired_differences_against_scipy(tmp_path):
    # Each seed starts where that seed's evaluation puts the shared policy (paired evaluation: the same for every
    # strategy); grpo has seeds 0-2, ppo 0-3: the pairs are seeds 0-2.
    start = {0: (0.40, 0.45), 1: (0.50, 0.41), 2: (0.46, 0.50), 3: (0.44, 0.44)}
    final = {"ppo": {0: (0.55, 0.47), 1: (0.61, 0.40), 2: (0.58, 0.52), 3: (0.50, 0.43)},
             "grpo": {0: (0.70, 0.50), 1: (0.66, 0.47), 2: (0.75, 0.52)}}
    for algo, ends in final.items():
        for seed, end in ends.items():
            write_run_folder(tmp_path / "runs" / f"{algo}-seed{seed}", algo, seed, {0: start[seed], 5: (0.5, 0.45), 10: end})
    main(["leaderboard", str(tmp_path / "runs"), "--out", str(tmp_path / "board")])
    res = json.loads((tmp_path / "board" / "results.json").read_text())
    S = res["strategies"]

    def t_interval(x):  # scipy's, to check mean_ci's
        x = np.asarray(x, dtype=float)
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        return x.mean(), (hi - lo) / 2

    for algo, ends in final.items():
        for key, i in (("train_gain", 0), ("test_gain", 1)):
            mean, half = t_interval([ends[seed][i] - start[seed][i] for seed in ends])
            assert S[algo][key][:2] == [pytest.approx(mean), pytest.approx(half)] and S[algo][key][2] == len(ends)
    paired = S["grpo"]["paired_vs_baseline"]
    assert paired["seeds"] == ["0", "1", "2"] and S["ppo"]["paired_vs_baseline"] is None
    for key, i in (("final_test", 1), ("final_train", 0)):
        grpo, ppo = [final["grpo"][seed][i] for seed in range(3)], [final["ppo"][seed][i] for seed in range(3)]
        mean, half = t_interval(np.subtract(grpo, ppo))
        assert paired[key][:2] == [pytest.approx(mean), pytest.approx(half)] and paired[key][2] == 3
        assert paired[f"p_{key}"] == pytest.approx(stats.ttest_rel(grpo, ppo).pvalue)

    # runs.csv: first and last evaluation of each run, on the train subset and the test split
    with open(tmp_path / "board" / "runs.csv") as f:
        rows = {(r["algo"], int(r["seed"])): r for r in csv.DictReader(f)}
    assert len(rows) == 7
    for (algo, seed), r in rows.items():
        assert [float(r[k]) for k in ("initial_train", "initial_test", "final_train", "final_test")] == [
            *start[seed], *final[algo][seed]]
    readme = (tmp_path / "board" / "README.md").read_text()
    assert "## Gains" in readme and "final test − ppo (paired)" in readme
    gains_row = next(line for line in readme.splitlines() if line.startswith("| grpo |") and "→" in line)
    assert f"{100 * paired['final_test'][0]:+.1f} ± {100 * paired['final_test'][1]:.1f} (n=3)" in gains_row


def test_leaderboard_records_no_machine_paths(tmp_path, monkeypatch):
    _bench_like_runs(tmp_path)  # run.json commands name their absolute run folders, as `rlzoo train` records them
    # A run on another base model, given (as a bench gives every path) absolute: its model, --model and --config too.
    other = tmp_path / "runs" / "grpo-seed2"
    info = json.loads((other / "run.json").read_text())
    info["model"] = str(tmp_path / "policy")
    info["command"] += f" --model {tmp_path}/policy --config {tmp_path}/presets/quick.gin --set 'train.lr=1e-5'"
    write_run(other, info)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # paths given both ways: absolute runs, relative output
    main(["leaderboard", str(tmp_path / "runs"), "--out", "../board"])
    board = tmp_path / "board"
    written = [p for p in board.rglob("*") if p.suffix in (".md", ".json", ".csv", ".html")]
    assert {p.name for p in written} >= {"README.md", "results.json", "results.csv", "runs.csv", "index.html"}
    for p in written:
        assert str(tmp_path) not in p.read_text(), p
    readme = (board / "README.md").read_text()
    assert "| ../runs/ppo-seed0 | ppo | 0 | finished |" in readme and "command: rlzoo leaderboard ../runs --out ." in readme
    runs_ = json.loads((board / "results.json").read_text())["runs"]
    assert runs_[0]["path"].startswith("../runs/") and runs_[0]["command"].endswith(f"--out {runs_[0]['path']}")
    moved = next(r for r in runs_ if r["path"] == "../runs/grpo-seed2")
    assert moved["model"] == "../policy" and moved["command"] == (
        "rlzoo train --algo grpo --seed 2 --out ../runs/grpo-seed2 --model ../policy --config ../presets/quick.gin --set 'train.lr=1e-5'")
    assert 'runs differ in base models ("../policy", "default")' in readme


def test_a_bench_folders_tuning_runs_are_not_ranked_with_its_evaluation_runs(tmp_path):
    bench = tmp_path / "bench"
    for algo in ("ppo", "grpo"):
        write_run_folder(bench / "runs" / f"{algo}-seed0", algo, 0, {0: (0.4, 0.4), 5: (0.6, 0.5)})
        write_run_folder(bench / "tune" / algo / "train.lr=1e-4" / "seed1000", algo, 1000, {0: (0.4, 0.4), 5: (0.7, 0.5)})
    (bench / "bench.json").write_text("{}")
    assert sorted(r.path.name for r in find_runs([bench])) == ["grpo-seed0", "ppo-seed0"]
    assert sorted(r.seed for r in find_runs([bench / "tune"])) == [1000, 1000]  # asked for by name, they are read
    # a folder named tune that is no bench's tuning folder is searched like any other
    (bench / "bench.json").unlink()
    assert len(find_runs([bench])) == 4


# -------------------------------------------------------------------------------------------- end to end


def _bench_like_runs(root: Path, spread: float = 0.01):
    """3 strategies x 3 seeds with deterministic seed-to-seed differences, ood_test and MC tokens."""
    finals = {}
    for algo, gain, s_per_iter, mc in (("ppo", 0.15, 1.0, 0), ("grpo", 0.16, 0.5, 0), ("vineppo", 0.30, 2.0, 800)):
        for seed in range(3):
            wiggle = spread * (seed - 1)
            evals = {it: (0.40 + 1.5 * gain * it / 20 + wiggle, 0.40 + gain * it / 20 + wiggle) for it in range(0, 21, 5)}
            ood = {it: 0.2 + 0.5 * gain * it / 20 for it in evals}
            write_run_folder(root / "runs" / f"{algo}-seed{seed}", algo, seed, evals, s_per_iter=s_per_iter, mc_tokens=mc, ood=ood)
            finals.setdefault(algo, []).append(evals[20][1])
    return finals


def test_leaderboard_end_to_end_writes_every_table_plot_and_the_html_page(tmp_path, capsys):
    finals = _bench_like_runs(tmp_path)
    out = tmp_path / "board"
    main(["leaderboard", str(tmp_path / "runs"), "--out", str(out)])
    assert "leaderboard of 9 runs" in capsys.readouterr().out

    readme = (out / "README.md").read_text()
    for section in ("## Budget", "## Accuracy", "## Gains", "## Generalization at matched train accuracy", "## Speed and cost",
                    "## Seconds per iteration by stage", "## Plots", "## Runs", "## Provenance"):
        assert section in readme
    for fact in ("command: rlzoo leaderboard", "git_commit:", "date:", "machine:", "cores", "rlzoo_version: 0.1.0",
                 "final ood_test", "speed-up vs ppo", "train seconds", "episodes", "iterations"):
        assert fact in readme
    for plot in PLOTS:
        assert f"(plots/{plot}.png)" in readme and f"(plots/{plot}.svg)" in readme
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / "plots" / f"{plot}.svg").read_text()
    assert "**vineppo**" in readme and "ahead of" in readme  # the clear winner is called one

    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS) and page.count("<table>") == 6
    assert 'src="plots/' not in page and "href=" not in page  # self-contained

    res = json.loads((out / "results.json").read_text())
    assert set(res["strategies"]) == {"ppo", "grpo", "vineppo"} and len(res["runs"]) == 9
    for algo, values in finals.items():
        mean, half, n = res["strategies"][algo]["final_test"]
        assert (mean, n) == (pytest.approx(np.mean(values)), 3)
        assert half == pytest.approx(stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3))
    p_vine = res["strategies"]["vineppo"]["welch_final_test"][1]
    assert p_vine == pytest.approx(stats.ttest_ind(finals["vineppo"], finals["ppo"], equal_var=False).pvalue)
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("strategy,runs,final_test_mean") and rows[1].startswith("ppo,3,")
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 10

    # The versions of the lower-bounded dependencies a result was made with (deepspeed: the test extra has it).
    prov = res["provenance"]
    for name in ("torch", "transformers", "tokenizers", "math-verify", "deepspeed", "datasets", "numpy", "scipy", "gin-config"):
        assert prov[name] == metadata.version(name), name
        assert f"{name}: {metadata.version(name)}" in readme
    assert prov["python"] == platform.python_version()


def test_provenance_records_a_package_that_is_not_installed_as_null(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "PROVENANCE_PACKAGES", ("torch", "rlzoo-no-such-package"))
    prov = json.loads(json.dumps(reporting.provenance("cmd")))
    assert prov["torch"] == metadata.version("torch") and prov["rlzoo-no-such-package"] is None


def test_readme_says_so_when_strategies_cannot_be_told_apart(tmp_path):
    for algo, shift in (("ppo", 0.0), ("grpo", 0.005)):
        for seed, noise in enumerate((-0.05, 0.0, 0.05)):
            write_run_folder(tmp_path / f"{algo}{seed}", algo, seed, {0: (0.4, 0.4), 10: (0.6 + noise, 0.5 + noise + shift)})
    main(["leaderboard", str(tmp_path), "--out", str(tmp_path / "board")])
    readme = (tmp_path / "board" / "README.md").read_text()
    assert "cannot be told apart" in readme and "seeds per strategy" in readme


def test_unfinished_runs_and_uncontrolled_budgets_are_flagged(tmp_path):
    write_run_folder(tmp_path / "a", "ppo", 0, {0: (0.4, 0.4), 10: (0.6, 0.5)})
    write_run_folder(tmp_path / "b", "grpo", 0, {0: (0.4, 0.4), 4: (0.6, 0.5)}, status="running")
    res = summarize(find_runs([tmp_path]))
    text = " ".join(res["warnings"])
    assert "not finished" in text and "grpo-seed0 (running)" in text and "differ in budgets" in text


def test_runs_that_started_from_different_weights_are_flagged(tmp_path):
    for name, algo, digest in (("a", "ppo", "ab" * 32), ("b", "grpo", "ab" * 32), ("c", "rloo", None)):
        write_run_folder(tmp_path / name, algo, 0, {0: (0.4, 0.4), 10: (0.6, 0.5)})
        if digest:  # "c": a run from before the digest was recorded (not flagged for lacking it)
            write_run(tmp_path / name, json.loads((tmp_path / name / "run.json").read_text()) | {"model_sha256": digest})
    assert not [w for w in summarize(find_runs([tmp_path]))["warnings"] if "different weights" in w]
    write_run(tmp_path / "b", json.loads((tmp_path / "b" / "run.json").read_text()) | {"model_sha256": "cd" * 32})
    res = summarize(find_runs([tmp_path]))
    (warning,) = [w for w in res["warnings"] if "different weights" in w]
    assert "abababababab, cdcdcdcdcdcd" in warning and "not controlled" in warning
    assert {r["model_sha256"] for r in res["runs"]} == {"ab" * 32, "cd" * 32, None}


def test_the_weights_digest_tells_equal_weights_from_a_changed_bit():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlzoo.policy import weights_digest

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    a = LlamaForCausalLM(config)
    torch.manual_seed(0)
    b = LlamaForCausalLM(config)
    assert weights_digest(a) == weights_digest(b) and len(weights_digest(a)) == 64
    with torch.no_grad():
        b.model.norm.weight[0] = torch.nextafter(b.model.norm.weight[0], torch.tensor(2.0))  # one ulp
    assert weights_digest(a) != weights_digest(b)


def _run_from_other_task(root):
    write_run_folder(root / "a", "ppo", 0, {0: (0.4, 0.4), 5: (0.5, 0.5)})
    write_run_folder(root / "b", "grpo", 0, {0: (0.4, 0.4), 5: (0.5, 0.5)}, task="gsm8k")


def _run_without_evals(root):
    (root / "r").mkdir()
    write_run(root / "r", {"format": 1, "algo": "ppo", "task": "arith", "seed": 0, "status": "running"})


def _not_a_run(root):
    (root / "notes.txt").write_text("hello")
    (root / "sub").mkdir()


@pytest.mark.parametrize("make, says", [
    (lambda root: None, "no run folders under"),  # an empty folder
    (_not_a_run, "no run folders under"),
    (_run_from_other_task, "different tasks"),
    (_run_without_evals, "no eval records"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, make, says):
    root = tmp_path / "runs"
    root.mkdir()
    make(root)
    with pytest.raises(SystemExit) as exit_:
        main(["leaderboard", str(root), "--out", str(tmp_path / "board")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("rlzoo: error: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "board").exists()


def test_missing_path_and_unknown_metric_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["leaderboard", str(tmp_path / "nope")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err
    write_run_folder(tmp_path / "r", "ppo", 0, {0: (0.4, 0.4), 5: (0.5, 0.5)})
    with pytest.raises(SystemExit) as exit_:
        main(["leaderboard", str(tmp_path / "r"), "--metric", "maj@99", "--out", str(tmp_path / "board")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "eval/test/pass@1" in err and err.count("\n") == 1
