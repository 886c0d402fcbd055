"""`rlzoo bench`: option checks through the real CLI, the plan (one controlled command per run, kept in
bench.json), following metrics files, skipping finished runs; and, with the real `rlzoo train`, resuming a
half-finished bench and the smoke preset end to end."""

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlzoo.bench import (
    TUNE_SEED_BASE,
    BenchPlan,
    RunWatch,
    bench_command,
    check_plan,
    grid,
    make_plan,
    parse_budget,
    plan_runs,
    plan_tuning_runs,
    progress,
    run_bench,
    run_env,
)
from rlzoo.cli import main
from rlzoo.errors import UserError
from rlzoo.leaderboard import PLOTS, summarize_tuning, tuning_score, tuning_table
from rlzoo.runs import load_run
from rlzoo.runs import read_jsonl, read_run
from rlzoo.tasks import TASKS
from test_leaderboard import write_run_folder

REPO = Path(__file__).resolve().parents[1]
# The task registry's built-ins land separately; tests that validate a task name wait for them.
TASKS_READY = all(importlib.util.find_spec(m) is not None for m in TASKS.builtin_modules)
needs_tasks = pytest.mark.skipif(not TASKS_READY, reason="needs every built-in task module")


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("rlzoo: error: ") and err.count("\n") == 1, err
    return err


def test_default_policy_on_math_asks_for_a_model(tmp_path, capsys):
    for task in ("math", "gsm8k"):
        err = _cli_error(["bench", "--algos", "vineppo,ppo", "--task", task, "--out", str(tmp_path / "b")], capsys)
        assert "default policy only knows arith" in err and "--model" in err
    assert not (tmp_path / "b").exists()


def test_unknown_strategy_lists_the_known_ones(tmp_path, capsys):
    err = _cli_error(["bench", "--algos", "ppo,vinepo", "--task", "arith", "--out", str(tmp_path / "b")], capsys)
    assert "'vinepo'" in err and "vineppo" in err and "grpo" in err and "rloo" in err


@pytest.mark.parametrize("argv, says", [
    (["--budget", "steps=5"], "--budget"),
    (["--budget", "iterations=0"], "--budget"),
    (["--seeds", "0"], "--seeds"),
    (["--config", "no/such.gin"], "not found"),
    (["--set", "train.lr"], "--set"),
    (["--algos", "ppo,ppo"], "twice"),
])
def test_bad_bench_options_are_one_line_errors(tmp_path, capsys, argv, says):
    base = {"--algos": "ppo,grpo", "--task": "arith", "--out": str(tmp_path / "b")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    err = _cli_error(["bench", *[x for kv in base.items() for x in kv]], capsys)
    assert says in err


@needs_tasks
@pytest.mark.parametrize("argv, says", [
    (["--sweep", "train.lrr=1e-5,1e-4"], "doesn't have a parameter named 'lrr'"),  # unknown binding
    (["--sweep", "no_such_thing.lr=1e-5"], "no_such_thing"),
    (["--sweep", "train.lr="], "empty grid"),
    (["--sweep", "train.lr=1e-5,,1e-4"], "empty value"),
    (["--sweep", "train.lr=1e-5,(1e-4"], "bad --sweep value train.lr=(1e-4"),  # malformed value
    (["--sweep", "train.lr_schedule=linear"], "bad --sweep value"),  # a string is quoted, as with --set
    (["--sweep", "train.lr"], "expected binding=value,value"),
    (["--sweep", "train.lr=1e-5", "--sweep", "train.lr=1e-4"], "twice"),
    (["--sweep", "train.seed=1,2"], "the bench sets train.seed"),
    (["--sweep", "ppo.epochs=1,2", "--set", "ppo.epochs=2"], "both swept"),
    (["--sweep", "train.lr=1e-5", "--tune-seeds", "0"], "--tune-seeds"),
])
def test_bad_sweeps_are_one_line_errors_before_anything_is_written(tmp_path, capsys, argv, says):
    out = tmp_path / "b"
    err = _cli_error(["bench", "--algos", "grpo,ppo", "--task", "arith", "--out", str(out), *argv], capsys)
    assert says in err
    assert not out.exists()


def test_parse_budget_canonical_forms():
    assert parse_budget("iterations=40") == "iterations=40"
    assert parse_budget("episodes=2048") == "episodes=2048"
    assert parse_budget("seconds=90.5") == "seconds=90.5"
    assert parse_budget(None) is None
    for bad in ("iterations=1.5", "iterations", "=3", "seconds=-1", "minutes=3"):
        with pytest.raises(UserError):
            parse_budget(bad)


def _plan(**changes) -> BenchPlan:
    fields = dict(algos=("ppo", "grpo"), task="arith", model="default", seeds=(0, 1), budget="iterations=10",
                  configs=(), config_sha256=(), bindings=("train.lr=1e-5",))
    return BenchPlan(**{**fields, **changes})


def test_every_run_gets_the_same_command_but_for_algo_seed_and_folder(tmp_path):
    runs = plan_runs(_plan(), tmp_path)
    assert [r.name for r in runs] == ["ppo-seed0", "grpo-seed0", "ppo-seed1", "grpo-seed1"]
    assert runs == plan_runs(_plan(), tmp_path)  # deterministic: re-running a bench re-issues the same commands

    def shape(cmd):  # the command with what may differ masked out
        masked = list(cmd)
        for flag in ("--algo", "--seed", "--out"):
            masked[masked.index(flag) + 1] = "*"
        return masked

    assert len({tuple(shape(r.command)) for r in runs}) == 1
    cmd = runs[0].command
    assert cmd[:4] == [sys.executable, "-m", "rlzoo.cli", "train"]
    assert cmd[cmd.index("--budget") + 1] == "iterations=10" and cmd[cmd.index("--set") + 1] == "train.lr=1e-5"
    assert cmd[cmd.index("--out") + 1] == str(tmp_path.resolve() / "runs" / "ppo-seed0")


@needs_tasks
def test_make_plan_records_config_contents(tmp_path):
    cfg = tmp_path / "a.gin"
    cfg.write_text("train.lr = 1e-5\n")
    plan = make_plan("ppo, grpo", "arith", seeds=2, budget="iterations=5", configs=[cfg])
    assert plan.algos == ("ppo", "grpo") and plan.seeds == (0, 1) and plan.configs == (str(cfg.resolve()),)
    cfg.write_text("train.lr = 1e-4\n")
    assert make_plan("ppo,grpo", "arith", seeds=2, budget="iterations=5", configs=[cfg]).config_sha256 != plan.config_sha256


def test_a_different_plan_on_the_same_folder_is_refused(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"format": 1, "plan": _plan().as_dict(), "sessions": []}))
    assert check_plan(_plan(), tmp_path)["plan"] == _plan().as_dict()
    with pytest.raises(UserError, match="seeds"):
        check_plan(_plan(seeds=(0, 1, 2)), tmp_path)
    with pytest.raises(UserError, match="config file contents changed"):
        check_plan(_plan(configs=("/x.gin",), config_sha256=("abc",)), tmp_path)


def test_a_sweep_plans_the_same_grid_and_tuning_seeds_for_every_strategy(tmp_path):
    plan = _plan(sweep=(("train.lr", ("1e-5", "1e-4")), ("train.adam_betas", ("(0.9, 0.99)", "(0.9, 0.999)"))), tune_seeds=2)
    settings = grid(plan)
    assert settings == [("train.lr=1e-5", "train.adam_betas=(0.9, 0.99)"), ("train.lr=1e-5", "train.adam_betas=(0.9, 0.999)"),
                        ("train.lr=1e-4", "train.adam_betas=(0.9, 0.99)"), ("train.lr=1e-4", "train.adam_betas=(0.9, 0.999)")]
    tuning = plan_tuning_runs(plan, tmp_path)
    assert len(tuning) == 2 * 4 * 2 and len({r.run_dir for r in tuning}) == len(tuning)
    for algo in plan.algos:
        mine = [r for r in tuning if r.algo == algo]
        assert sorted((r.setting, r.seed) for r in mine) == sorted((g, k) for g in settings for k in (TUNE_SEED_BASE, TUNE_SEED_BASE + 1))
    assert not {r.seed for r in tuning} & set(plan.seeds)  # a pick is never judged on an evaluation seed
    for r in tuning:
        assert r.run_dir.is_relative_to(tmp_path.resolve() / "tune" / r.algo)
        sets = [r.command[i + 1] for i, x in enumerate(r.command) if x == "--set"]
        assert sets == [*plan.bindings, *r.setting]  # the plan's bindings, then the setting's (which win)

    picks = {"ppo": settings[2]}
    finals = plan_runs(plan, tmp_path, picks)
    for r in finals:
        sets = [r.command[i + 1] for i, x in enumerate(r.command) if x == "--set"]
        assert sets == [*plan.bindings, *picks.get(r.algo, ())]
    command = bench_command(plan, tmp_path, 1, None)
    assert "--sweep train.lr=1e-5,1e-4 --sweep 'train.adam_betas=(0.9, 0.99),(0.9, 0.999)' --tune-seeds 2" in command

    # bench.json keeps the sweep: the same sweep resumes, another (or none) is another plan.
    (tmp_path / "bench.json").write_text(json.dumps({"format": 1, "plan": plan.as_dict(), "sessions": []}))
    assert check_plan(plan, tmp_path)["plan"]["sweep"][1] == ["train.adam_betas", ["(0.9, 0.99)", "(0.9, 0.999)"]]
    for other in (_plan(), _plan(sweep=plan.sweep[:1], tune_seeds=2), _plan(sweep=plan.sweep, tune_seeds=3)):
        with pytest.raises(UserError, match="another plan"):
            check_plan(other, tmp_path)


def test_the_bench_command_keeps_relative_paths_as_given_and_names_no_machine_path(tmp_path, monkeypatch):
    (tmp_path / "work" / "presets").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    plan = _plan(configs=(str(tmp_path / "work" / "presets" / "quick.gin"), str(tmp_path / "shared" / "extra.gin")),
                 model=str(tmp_path / "policy"))
    command = bench_command(plan, Path("bench-quick"), 2, None)  # a relative --out, as the README's command gives it
    assert command.startswith("rlzoo bench --algos ppo,grpo --task arith --model ../../../policy --seeds 2 ")
    assert "--config presets/quick.gin --config ../../../shared/extra.gin " in command and command.endswith("--out bench-quick --jobs 2")
    # outside the working folder, given absolute: by their path from the leaderboard folder (bench-quick/leaderboard above)
    command = bench_command(plan, tmp_path / "b", 1, tmp_path / "b" / "board")
    assert command.endswith("--out .. --jobs 1 --leaderboard .") and str(tmp_path) not in command


def _tuning_run(run_dir, algo, seed, train, test, reward, status="finished", flops=None):
    """A finished tuning run: final train / test accuracy, and a rollout reward at every iteration."""
    write_run_folder(run_dir, algo, seed, {0: (0.4, 0.4), 4: (train, test)}, status=status)
    records = read_jsonl(run_dir / "metrics.jsonl")
    for r in records:
        if r["kind"] == "train":
            r["reward/mean"] = reward
        if flops is not None:
            r["flops/total"] = flops * r["iteration"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_the_pick_is_by_train_accuracy_then_reward_never_test_and_excludes_diverged_settings(tmp_path):
    lo, hi = ("train.lr=1e-5",), ("train.lr=1e-4",)
    runs = {}

    def add(algo, setting, seed, *args, **kw):
        path = _tuning_run(tmp_path / algo / setting[0] / f"seed{seed}", algo, seed, *args, **kw)
        runs.setdefault(algo, {}).setdefault(setting, []).append(path)

    # a: lo has the best test accuracy, hi the best train accuracy (mean over its two tuning seeds).
    add("a", lo, 1000, 0.60, 0.90, 0.5)
    add("a", lo, 1001, 0.60, 0.90, 0.5)
    add("a", hi, 1000, 0.80, 0.10, 0.5, flops=1000)
    add("a", hi, 1001, 0.62, 0.10, 0.5, flops=1000)
    # b: equal train accuracy; hi's rollouts earn more over the last quarter.
    add("b", lo, 1000, 0.50, 0.50, 0.30)
    add("b", hi, 1000, 0.50, 0.50, 0.40)
    # c: hi scored better before it diverged: it is out; d: only lo diverged, hi never ran.
    add("c", lo, 1000, 0.20, 0.20, 0.1)
    add("c", hi, 1000, 0.90, 0.90, 0.9, status="failed")
    add("d", lo, 1000, 0.90, 0.90, 0.9, status="failed")
    runs["d"][hi] = [tmp_path / "d" / "never-started"]

    res = summarize_tuning([lo, hi], runs, seeds=[1000, 1001])
    S = res["strategies"]
    assert S["a"]["pick"] == list(hi) and S["a"]["points"][1]["train"] == pytest.approx(0.71)
    assert S["b"]["pick"] == list(hi)
    assert S["c"]["pick"] == list(lo) and S["c"]["points"][1]["status"] == "diverged"
    assert S["d"]["pick"] is None and [p["status"] for p in S["d"]["points"]] == ["diverged", "unfinished"]
    assert tuning_score(load_run(runs["a"][hi][0])) == (0.80, 0.5)  # its final train accuracy, whatever its test says
    # Cost: every tuning run that started; write_run_folder's runs train 4 iterations of 64 episodes, 1 s each.
    assert S["a"]["cost"] == {"runs": 4, "train_seconds": 16.0, "episodes": 1024, "flops": 8000}
    assert S["b"]["cost"]["flops"] is None
    assert res["cost"]["runs"] == 9 and res["cost"]["flops"] == 8000

    title, note, header, rows = tuning_table(res)
    assert title == "Tuning" and header[:3] == ["strategy", "train.lr=1e-5", "train.lr=1e-4"] and "FLOPs" in header
    assert rows[0][:4] == ["a", "60.0 · 0.500", "71.0 · 0.500", "train.lr=1e-4"]
    assert rows[2][2] == "diverged" and rows[3][3] == "none" and rows[-1][0] == "all"
    assert "1000, 1001" in note and "test accuracy plays no part" in note


def test_run_watch_reads_only_complete_lines_and_follows_a_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    watch = RunWatch(tmp_path)
    watch.poll()  # no file yet
    assert watch.last == {}
    path.write_text('{"kind": "train", "iteration": 1, "reward/mean": 0.25}\n{"kind": "eval", "itera')
    watch.poll()
    assert watch.last_train["reward/mean"] == 0.25 and watch.last_eval == {}
    with open(path, "a") as f:
        f.write('tion": 1, "eval/test/pass@1": 0.5}\n')
    watch.poll()
    assert watch.last_eval["eval/test/pass@1"] == 0.5 and watch.last["kind"] == "eval"
    path.write_text('{"kind": "train", "iteration": 0}\n')  # a resume rewound the file to its checkpoint
    watch.poll()
    assert watch.last == {"kind": "train", "iteration": 0} and watch.last_eval == {}


def test_progress_takes_the_limit_the_run_meets_first():
    budget = {"iterations": 1000000000, "episodes": 0, "seconds": 60.0}  # how train records --budget seconds=60
    assert progress({"iteration": 3, "episodes": 96, "time/train_total": 15.0}, budget) == pytest.approx(0.25)
    assert progress({"iteration": 5}, {"iterations": 10, "episodes": 0, "seconds": 0}) == pytest.approx(0.5)
    assert progress({}, budget) is None and progress({"iteration": 1}, None) is None


def test_finished_runs_are_skipped_and_the_leaderboard_still_written(tmp_path):
    plan = _plan()
    for r in plan_runs(plan, tmp_path):
        write_run_folder(r.run_dir, r.algo, r.seed, {0: (0.4, 0.4), 5: (0.5 + 0.01 * r.seed, 0.45)})
    before = {r.name: (r.run_dir / "metrics.jsonl").read_bytes() for r in plan_runs(plan, tmp_path)}
    for session in (1, 2):
        result = run_bench(plan, tmp_path, jobs=2)
        assert set(result.states.values()) == {"skipped"} and not result.unfinished
        assert list((tmp_path / "logs").iterdir()) == []  # no train process was started
        assert (tmp_path / "leaderboard" / "README.md").exists() and (tmp_path / "leaderboard" / "index.html").exists()
        saved = json.loads((tmp_path / "bench.json").read_text())
        assert saved["plan"] == plan.as_dict() and len(saved["sessions"]) == session
        assert saved["sessions"][-1]["command"].startswith("rlzoo bench --algos ppo,grpo --task arith")
    assert before == {r.name: (r.run_dir / "metrics.jsonl").read_bytes() for r in plan_runs(plan, tmp_path)}


# ---------------------------------------------------------------------------------------------------------
# With the real `rlzoo train` (rlzoo/train.py and the arith task): these run once both exist.

TRAIN_READY = TASKS_READY and importlib.util.find_spec("rlzoo.train") is not None
needs_train = pytest.mark.skipif(not TRAIN_READY, reason="needs rlzoo/train.py and every built-in task module")

# A few-second run of the tiny policy (conftest's tiny_policy_path): small batches and eval sets, a checkpoint
# every iteration.
TINY_RUN = ["train.prompts_per_iteration=4", "train.eval_every=100", "train.eval_samples=2", "train.eval_train_problems=4",
            "train.eval_test_problems=4", "train.checkpoint_every=1", "grpo.group_size=2", "rloo.group_size=2",
            "ppo.epochs=1", "ppo.minibatches=1", "arith.test_size=20", "arith.ood_test_size=20"]


@pytest.mark.slow
@needs_train
def test_a_half_finished_bench_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, tiny_policy_path):
    tiny_policy = tiny_policy_path
    out = tmp_path / "bench"
    plan = make_plan("grpo,rloo", "arith", model=str(tiny_policy), seeds=1, budget="iterations=4", bindings=TINY_RUN)
    done, cut = plan_runs(plan, out)
    # The state an interrupted bench leaves: one run finished, one stopped with Ctrl-C after a checkpoint.
    subprocess.run(done.command, check=True, capture_output=True)
    proc = subprocess.Popen(cut.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (cut.run_dir / "checkpoints" / "latest").exists() and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # train finishes the iteration, saves and exits
    proc.wait()
    assert read_run(done.run_dir)["status"] == "finished" and read_run(cut.run_dir)["status"] == "running"
    finished_metrics = (done.run_dir / "metrics.jsonl").read_bytes()

    main(["bench", "--algos", "grpo,rloo", "--task", "arith", "--model", str(tiny_policy), "--seeds", "1",
          "--budget", "iterations=4", *[x for b in TINY_RUN for x in ("--set", b)], "--out", str(out), "--jobs", "2"])

    assert (done.run_dir / "metrics.jsonl").read_bytes() == finished_metrics  # skipped: untouched
    assert not (out / "logs" / f"{done.name}.log").exists()
    assert "resuming" in (out / "logs" / f"{cut.name}.log").read_text()
    assert read_run(cut.run_dir)["status"] == "finished"
    trains = [json.loads(line) for line in (cut.run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in trains if r["kind"] == "train"]
    assert iterations == list(range(1, 5))  # resumed, not restarted, and nothing counted twice
    assert (out / "leaderboard" / "README.md").exists()


def _trains_in(run_dir: Path) -> list[int]:
    """Live `rlzoo train` processes whose --out is ``run_dir`` (zombies left to a PID 1 that does not reap are gone)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if b"train" in argv and str(run_dir).encode() in argv and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@needs_train
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal and /proc are Linux's")
def test_a_killed_bench_rerun_at_once_never_trains_a_run_twice(tmp_path, tiny_policy_path):
    # Issue 16: kill -9 a bench mid-run and re-run it at once. The orphaned train saves and stops on its parent-death
    # signal; the re-run's train waits for the folder (RUN/.lock), then resumes: one process per run folder, and a
    # metrics.jsonl in order, the very records of an uninterrupted run.
    out = tmp_path / "bench"
    plan = make_plan("grpo", "arith", model=str(tiny_policy_path), seeds=1, budget="iterations=6", bindings=TINY_RUN)
    (run,) = plan_runs(plan, out)
    reference = tmp_path / "reference"
    # under the bench's thread settings: MKL's float sums differ in the last bits between thread counts
    subprocess.run([reference if a == str(run.run_dir) else a for a in run.command], check=True, capture_output=True, env=run_env(1))

    bench = [sys.executable, "-m", "rlzoo.cli", "bench", "--algos", "grpo", "--task", "arith", "--model", str(tiny_policy_path),
             "--seeds", "1", "--budget", "iterations=6", *[x for b in TINY_RUN for x in ("--set", b)], "--out", str(out)]
    first = subprocess.Popen(bench, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not [r for r in read_jsonl(run.run_dir / "metrics.jsonl") if r["kind"] == "train"]:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    orphans = _trains_in(run.run_dir)
    again = subprocess.run(bench, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert not set(orphans) & set(_trains_in(run.run_dir))  # the orphan stopped
    assert read_run(run.run_dir)["status"] == "finished"
    drop = ("time/", "memory/")
    comparable = lambda records: [{k: v for k, v in r.items() if not k.startswith(drop)} for r in records]  # noqa: E731
    assert comparable(read_jsonl(run.run_dir / "metrics.jsonl")) == comparable(read_jsonl(reference / "metrics.jsonl"))


@pytest.mark.slow
@needs_train
@pytest.mark.skipif(not (REPO / "benchmarks" / "smoke.gin").exists(), reason="needs benchmarks/smoke.gin")
def test_smoke_preset_end_to_end_writes_every_table_plot_and_the_html_page(tmp_path):
    out = tmp_path / "smoke"
    main(["bench", "--algos", "grpo,ppo", "--task", "arith", "--seeds", "2", "--config", str(REPO / "benchmarks" / "smoke.gin"),
          "--out", str(out)])
    board = out / "leaderboard"
    readme = (board / "README.md").read_text()
    for section in ("## Budget", "## Accuracy", "## Generalization at matched train accuracy", "## Speed and cost",
                    "## Seconds per iteration by stage", "## Provenance"):
        assert section in readme
    for plot in PLOTS:
        assert (board / "plots" / f"{plot}.png").stat().st_size > 0 and (board / "plots" / f"{plot}.svg").stat().st_size > 0
    page = (board / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert _table_titles(page) == ["Budget", "Accuracy", "Gains", "Generalization at matched train accuracy", "Speed and cost",
                                   "Seconds per iteration by stage"]
    res = json.loads((board / "results.json").read_text())
    assert set(res["strategies"]) == {"grpo", "ppo"} and all(s["runs"] == 2 for s in res["strategies"].values())
    assert all(r["status"] == "finished" for r in res["runs"])


def _table_titles(page: str) -> list[str]:
    """The titles of the HTML page's tables, in order; every table has one."""
    titles = re.findall(r"<h2>([^<]*)</h2><p>[^<]*</p><table>", page)
    assert len(titles) == page.count("<table>")
    return titles


SMOKE = REPO / "benchmarks" / "smoke.gin"
needs_smoke = pytest.mark.skipif(not SMOKE.exists(), reason="needs benchmarks/smoke.gin")


def _lr_bound(run_dir: Path) -> float:
    return read_run(run_dir)["config"]["lr"]


@pytest.mark.slow
@needs_train
@needs_smoke
def test_a_sweep_tunes_each_strategy_on_train_accuracy_runs_its_pick_and_a_rerun_trains_nothing(tmp_path, tiny_policy_path):
    # smoke.gin's built-in policy is the tiny preset: tiny_policy_path has it cached.
    out = tmp_path / "bench"
    options = dict(algos="grpo,ppo", task="arith", seeds=1, budget="iterations=2", configs=[SMOKE],
                   bindings=["train.checkpoint_every=1"], sweep=["train.lr=1e-4,3e-3"])
    argv = ["bench", "--algos", "grpo,ppo", "--task", "arith", "--seeds", "1", "--budget", "iterations=2", "--config", str(SMOKE),
            "--set", "train.checkpoint_every=1", "--sweep", "train.lr=1e-4,3e-3", "--out", str(out), "--jobs", "2"]
    plan = make_plan(**options)
    tuning = plan_tuning_runs(plan, out)
    assert len(tuning) == 2 * 2 * 1
    # One tuning run killed after its first checkpoint (of two), as a killed bench leaves it: the bench resumes it.
    cut = tuning[-1]
    proc = subprocess.Popen(cut.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (cut.run_dir / "checkpoints" / "latest").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert read_run(cut.run_dir)["status"] == "running"

    main(argv)

    assert "resuming" in (out / "logs" / f"{cut.name}.log").read_text()
    for r in tuning:
        assert read_run(r.run_dir)["status"] == "finished" and read_run(r.run_dir)["seed"] == TUNE_SEED_BASE
        assert _lr_bound(r.run_dir) == float(r.setting[0].partition("=")[2])
    # The pick, re-derived here from the tuning runs' metrics: final train accuracy, then the last quarter's reward.
    board = json.loads((out / "leaderboard" / "results.json").read_text())
    for algo in plan.algos:
        def score(setting):
            run = next(load_run(r.run_dir) for r in tuning if r.algo == algo and r.setting == setting)
            return run.evals[-1]["eval/train/pass@1"], run.trains[-1]["reward/mean"]  # 2 iterations: the last is the last quarter

        pick = max(grid(plan), key=score)  # max keeps the first of equals: grid order
        assert board["tuning"]["strategies"][algo]["pick"] == list(pick)
        final = out / "runs" / f"{algo}-seed0"
        assert read_run(final)["status"] == "finished" and _lr_bound(final) == float(pick[0].partition("=")[2])
    assert sorted(r["seed"] for r in board["runs"]) == [0, 0]  # the leaderboard ranks the evaluation runs only
    assert board["tuning"]["cost"]["runs"] == 4 and board["tuning"]["cost"]["episodes"] == 4 * 2 * 8
    readme = (out / "leaderboard" / "README.md").read_text()
    assert "## Tuning" in readme and "| train.lr=1e-4 | train.lr=3e-3 | pick |" in readme
    assert "Tuning" in _table_titles((out / "leaderboard" / "index.html").read_text())
    # Every path was given absolute: what gets committed names none of this machine's folders.
    assert "--out .. --jobs 2" in json.loads((out / "leaderboard" / "results.json").read_text())["provenance"]["command"]
    # The bench folder as a whole: its evaluation runs, not its tuning runs.
    main(["leaderboard", str(out), "--out", str(tmp_path / "whole")])
    assert sorted((r["algo"], r["seed"]) for r in json.loads((tmp_path / "whole" / "results.json").read_text())["runs"]) == [
        ("grpo", 0), ("ppo", 0)]
    for p in [*(out / "leaderboard").rglob("*"), *(tmp_path / "whole").rglob("*")]:
        if p.suffix in (".md", ".json", ".csv", ".html"):
            assert str(tmp_path) not in p.read_text(), p
    assert json.loads((out / "bench.json").read_text())["plan"]["sweep"] == [["train.lr", ["1e-4", "3e-3"]]]

    everything = sorted([*out.glob("tune/*/*/*/metrics.jsonl"), *out.glob("runs/*/metrics.jsonl"), *out.glob("logs/**/*.log")])
    assert len(everything) == 4 + 2 + 4 + 2
    before = {p: p.read_bytes() for p in everything}
    main(argv)
    assert {p: p.read_bytes() for p in everything} == before  # nothing trained, nothing launched
    assert len(json.loads((out / "bench.json").read_text())["sessions"]) == 2


@pytest.mark.slow
@needs_train
@needs_smoke
def test_the_bench_builds_the_base_policy_once_before_any_run(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("RLZOO_HOME", str(home))  # nothing cached: someone has to build it
    out = tmp_path / "bench"
    main(["bench", "--algos", "grpo,rloo", "--task", "arith", "--seeds", "1", "--budget", "iterations=1", "--config", str(SMOKE),
          "--set", "pretrain.steps=40", "--set", "pretrain.warmup_steps=4", "--out", str(out), "--jobs", "2"])
    assert "building the base policy" in capsys.readouterr().err
    built = [p for p in (home / "policies").iterdir()]
    assert len(built) == 1 and (built[0] / "pretrain.json").is_file()  # one build, no leftover of a second
    for name in ("grpo-seed0", "rloo-seed0"):
        assert read_run(out / "runs" / name)["status"] == "finished"
        assert "pretrain step" not in (out / "logs" / f"{name}.log").read_text()  # a run that builds it logs its steps
        assert (built[0] / "pretrain.json").stat().st_mtime <= (out / "runs" / name / "config.gin").stat().st_mtime
