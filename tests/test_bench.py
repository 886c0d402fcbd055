"""`rlzoo bench`: option checks through the real CLI, the plan (one controlled command per run, kept in
bench.json), following metrics files, skipping finished runs; and, with the real `rlzoo train`, resuming a
half-finished bench and the smoke preset end to end."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlzoo.bench import BenchPlan, RunWatch, check_plan, make_plan, parse_budget, plan_runs, progress, run_bench
from rlzoo.cli import main
from rlzoo.errors import UserError
from rlzoo.leaderboard import PLOTS
from rlzoo.runs import read_run
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
    assert page.count("data:image/png;base64,") == len(PLOTS) and page.count("<table>") == 5
    res = json.loads((board / "results.json").read_text())
    assert set(res["strategies"]) == {"grpo", "ppo"} and all(s["runs"] == 2 for s in res["strategies"].values())
    assert all(r["status"] == "finished" for r in res["runs"])
