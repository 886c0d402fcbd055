"""The leaderboard on run folders written to disk: statistics against textbook numbers, the
matched-train-accuracy rule on synthetic curves, every output file, and one-line errors for bad input."""

import json
import math
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rlzoo import leaderboard
from rlzoo.cli import main
from rlzoo.leaderboard import (
    PLOTS,
    common_levels,
    find_runs,
    first_crossing,
    mean_ci,
    seeds_to_separate,
    summarize,
    welch,
)
from rlzoo.runs import append_jsonl, write_run


def write_run_folder(run_dir, algo, seed, evals, task="arith", status="finished", s_per_iter=1.0, mc_tokens=0, ood=None):
    """A run folder as ``rlzoo train`` writes it: evals = {iteration: (train_acc, test_acc)}, evaluated
    before the update of that iteration; one train record per update with per-iteration stage seconds and
    cumulative tokens. ``ood``: {iteration: ood_test_acc}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    iterations = max(evals)
    write_run(run_dir, {"format": 1, "algo": algo, "task": task, "model": "default", "seed": seed,
                        "budget": {"iterations": iterations, "episodes": 0, "seconds": 0.0}, "rlzoo_version": "0.1.0",
                        "command": f"rlzoo train --algo {algo} --seed {seed}", "started": "2026-01-01T00:00:00+0000",
                        "status": status})
    for it in range(iterations + 1):
        common = {"iteration": it, "episodes": 64 * it, "time/train_total": s_per_iter * it}
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
                "kl/ref": 0.01 * done, "memory/peak_rss_mb": 300.0 + seed})
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
    for section in ("## Budget", "## Accuracy", "## Generalization at matched train accuracy", "## Speed and cost",
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
    assert page.count("data:image/png;base64,") == len(PLOTS) and page.count("<table>") == 5
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
    monkeypatch.setattr(leaderboard, "PROVENANCE_PACKAGES", ("torch", "rlzoo-no-such-package"))
    prov = json.loads(json.dumps(leaderboard.provenance("cmd")))
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
