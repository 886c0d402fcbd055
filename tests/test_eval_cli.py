"""Evaluation and the pretrain / eval / list commands, through the real CLI on the tiny built-in policy."""

import json
import os
import subprocess
import sys

import pytest

from rlzoo.cli import main
from rlzoo.engine.torch_engine import TorchEngine
from rlzoo.evaluate import evaluate
from rlzoo.policy import PRESETS, load_policy, preset_task_bindings
from rlzoo.tasks import get_task

TINY_TASK = {k: v for k, v in PRESETS["tiny"]["task_kwargs"].items() if k != "train_size"}  # the arith it learned


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_greedy_single_sample_majority_equals_pass1(tiny_policy_path):
    model, tokenizer = load_policy(str(tiny_policy_path))
    task = get_task("arith", **TINY_TASK)
    result = evaluate(model, tokenizer, TorchEngine(model, tokenizer), task, "test", samples=1, temperature=0.0, max_problems=24)
    assert result["n_problems"] == 24 and len(result["problems"]) == 24
    assert result["maj@1"] == result["pass@1"]  # one sample: its answer is the majority
    assert result["pass@1"] == sum(p["pass@1"] for p in result["problems"]) / 24
    assert result["pass@1"] > 0.2  # the tiny policy has learned its easy arith


def test_eval_cli_writes_pass1_and_majority(tiny_policy_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    bindings = [f"--set={b}" for b in preset_task_bindings("tiny")]
    code, stdout, _ = run_cli(
        capsys, "eval", "--model", str(tiny_policy_path), "--task", "arith", "--split", "test",
        "--samples", "4", "--temperature", "0.6", "--limit", "16", "--out", str(out), *bindings,
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n_problems"] == 16 and result["samples"] == 4 and len(result["problems"]) == 16
    assert 0.0 < result["pass@1"] <= 1.0 and 0.0 <= result["maj@4"] <= 1.0
    assert "pass@1" in stdout and "maj@4" in stdout


def test_pretrain_cli_reports_the_cached_policy(tiny_policy_path, capsys):
    code, stdout, _ = run_cli(capsys, "pretrain", "--preset", "tiny")
    assert code == 0
    assert f"policy: {tiny_policy_path}" in stdout and "parameters" in stdout


def test_list_names_registered_components(capsys):
    code, stdout, _ = run_cli(capsys, "list")
    assert code == 0
    assert "arith" in stdout and "torch" in stdout and "grpo" in stdout


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--task", "no-such-task", "--model", "{tiny}"],
        ["eval", "--model", "{missing}"],
        ["eval", "--model", "no_such_model_name"],
        ["eval", "--model", "{tiny}", "--samples", "0"],
        ["eval", "--model", "{tiny}", "--samples", "-3"],
        ["eval", "--model", "{tiny}", "--temperature", "-0.1"],
        ["eval", "--model", "{tiny}", "--top-p", "0"],
        ["eval", "--model", "{tiny}", "--split", "validation"],
        ["eval", "--model", "{tiny}", "--samples", "many"],
        ["eval", "--model", "{tiny}", "--set", "arith.no_such_knob=3"],
        ["eval", "--model", "{tiny}", "--max-new-tokens", "0"],
        ["eval", "--model", "{tiny}", "--set", "train.max_new_tokens=-1"],
        ["pretrain", "--preset", "huge"],
        ["pretrain", "--set", "pretrain.steps"],
        ["pretrain", "--config", "{missing}"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, tiny_policy_path, tmp_path, capsys):
    args = [a.format(tiny=tiny_policy_path, missing=tmp_path / "missing") for a in args]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2
    assert stderr.startswith("rlzoo: error: ") and stderr.count("\n") == 1, stderr


def test_unloadable_hub_model_exits_2_with_one_line_from_the_entry_point():
    """The installed command, offline: a hub id that cannot be fetched is a user error, not a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlzoo.cli", "eval", "--model", "no-such-org/no-such-model"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("rlzoo: error: cannot load model") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("task", ["gsm8k", "math"])
@pytest.mark.parametrize("command", ["eval", "train", "bench"])
def test_the_builtin_policy_on_a_task_it_never_learned_is_refused_before_anything_is_built(command, task, tiny_policy_path,
                                                                                           tmp_path, capsys):
    # Without --model every command would build the arith policy (minutes), then score 0 on answers it cannot write.
    out = tmp_path / "out"
    argv = {"eval": ["eval", "--task", task, "--out", str(out / "eval.json")],
            "train": ["train", "--algo", "grpo", "--task", task, "--out", str(out)],
            "bench": ["bench", "--algos", "grpo", "--task", task, "--out", str(out)]}[command]
    policies = sorted(tiny_policy_path.parent.iterdir())
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "built-in default policy only knows arith" in stderr and f"--task {task} pass --model PATH" in stderr
    assert not out.exists() and sorted(tiny_policy_path.parent.iterdir()) == policies


def test_eval_max_new_tokens_cuts_responses_at_the_budget_and_is_train_max_new_tokens(tiny_policy_path, tmp_path, capsys):
    common = ["eval", "--model", str(tiny_policy_path), "--task", "arith", "--samples", "2", "--temperature", "0",
              "--limit", "8", *[f"--set={b}" for b in preset_task_bindings("tiny")]]

    def run(*extra):
        out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}.json"
        code, stdout, stderr = run_cli(capsys, *common, "--out", str(out), *extra)
        assert code == 0, stderr
        return json.loads(out.read_text()), stdout

    task = get_task("arith", **TINY_TASK)
    full, _ = run()
    assert full["max_new_tokens"] == task.max_new_tokens and full["truncated"] == 0 and full["mean_response_tokens"] > 3
    cut, stdout = run("--max-new-tokens", "3")
    assert cut["max_new_tokens"] == 3 and cut["truncated"] == 1.0 and cut["mean_response_tokens"] == 3
    assert cut["pass@1"] == 0 and "cut at 3" in stdout  # no answer fits in 3 characters
    bound, _ = run("--set", "train.max_new_tokens=3")  # the knob train reads, from --set or a --config
    assert {k: v for k, v in bound.items() if k != "seconds"} == {k: v for k, v in cut.items() if k != "seconds"}
    wins, _ = run("--set", "train.max_new_tokens=3", "--max-new-tokens", "5")
    assert wins["max_new_tokens"] == 5 and wins["mean_response_tokens"] == 5
