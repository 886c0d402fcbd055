"""Bad input, through the real CLI on the tiny built-in policy (issue 16): every case exits with code 2 and one
``rlzoo: error:`` line that names what is wrong, with no traceback, and leaves nothing half-written behind (most
fail before anything is written). A crafted checkpoint file is refused without running its payload."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rlzoo import runs
from rlzoo.cli import main

SMOKE = str(Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.gin")
RUN_BUDGET = ["--budget", "iterations=2"]  # one checkpoint (smoke's checkpoint_every = 2), in seconds


def train_args(tiny, out, *extra, algo="grpo", model=True):
    """``rlzoo train --algo grpo --task arith --config benchmarks/smoke.gin`` on the tiny policy (smoke's arith is its arith)."""
    return ["train", "--algo", algo, "--task", "arith", "--config", SMOKE, *(["--model", str(tiny)] if model else []),
            "--out", str(out), *extra]


def sets(*bindings):
    return [x for b in bindings for x in ("--set", b)]


def run_cli(capsys, argv) -> tuple[int, list[str]]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def trained_run(tiny_policy_path, tmp_path_factory):
    """A finished 2-iteration run (checkpoint iter_000002) and the command that made it; cases copy it."""
    import gin

    gin.clear_config()
    run = tmp_path_factory.mktemp("trained") / "run"
    argv = train_args(tiny_policy_path, run, *RUN_BUDGET)
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None)
    assert runs.read_run(run)["status"] == "finished"
    return run, argv


def interrupted_copy(trained_run, where: Path) -> tuple[Path, list[str]]:
    """A copy of the trained run as a kill after its last checkpoint leaves it (status running), and its resume command."""
    run, argv = trained_run
    copy = where / "run"
    shutil.copytree(run, copy)
    runs.write_run(copy, runs.read_run(copy) | {"status": "running"})
    return copy, [copy if a == str(run) else a for a in argv]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes: a refused resume must change none."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Each case: (id, make(tmp, tiny) -> argv, words the error line must contain, what must not exist afterwards).
# `tmp` is the case's own folder; "run", "bench", "audit", "board" under it are the outputs a command would write.
def _file(tmp, name="afile", text="not a folder\n"):
    (tmp / name).write_text(text)
    return tmp / name


def _data(tmp, name, content: bytes):
    (tmp / name).write_bytes(content)
    return str(tmp / name)


def _gsm8k_from(path):
    return ["--task", "gsm8k"] + sets(f"gsm8k.source = {{'train': '{path}', 'test': '{path}'}}")


def _bench(tiny, tmp, *extra, out=None):
    return ["bench", "--algos", "grpo,vineppo", "--task", "arith", "--seeds", "1", "--config", SMOKE, "--model", str(tiny),
            "--out", str(out or tmp / "bench"), *extra]


def _bad_gin(tmp):
    (tmp / "bad.gin").write_text("train.lr = (((\n")
    return str(tmp / "bad.gin")


CASES = [
    # tracebacks before
    ("prompts_per_iteration=0", lambda t, m: train_args(m, t / "run", *sets("train.prompts_per_iteration=0")),
     ["train.prompts_per_iteration"], ["run"]),
    ("eval_every=0", lambda t, m: train_args(m, t / "run", *sets("train.eval_every=0")), ["train.eval_every"], ["run"]),
    ("checkpoint_every=0", lambda t, m: train_args(m, t / "run", *sets("train.checkpoint_every=0")),
     ["train.checkpoint_every"], ["run"]),
    ("train.lr<0", lambda t, m: train_args(m, t / "run", *sets("train.lr=-1")), ["train.lr"], ["run"]),
    ("train.old_logprobs unknown", lambda t, m: train_args(m, t / "run", *sets("train.old_logprobs='twice'")),
     ["train.old_logprobs", "recompute"], ["run"]),
    ("pretrain.lr<0 in train", lambda t, m: train_args(m, t / "run", *sets("pretrain.lr=-1"), model=False),
     ["pretrain.lr"], ["run"]),
    ("train --out is a file", lambda t, m: train_args(m, _file(t)), ["afile", "is a file"], []),
    ("train --out under a file", lambda t, m: train_args(m, _file(t) / "run"), ["afile", "is a file"], []),
    ("bench --out is a file", lambda t, m: _bench(m, t, out=_file(t)), ["afile", "is a file"], []),
    ("audit --out is a file", lambda t, m: ["audit", "--algos", "vineppo", "--policy", str(m), "--out", str(_file(t))],
     ["afile", "is a file"], []),
    ("leaderboard --out is a file", lambda t, m: ["leaderboard", str(t), "--out", str(_file(t))], ["afile", "is a file"], []),
    ("eval --out under a file", lambda t, m: ["eval", "--model", str(m), "--out", str(_file(t) / "eval.json")],
     ["afile", "is a file"], []),
    ("eval --device nope", lambda t, m: ["eval", "--model", str(m), "--device", "nope"], ["'nope'"], []),
    ("empty .jsonl", lambda t, m: train_args(m, t / "run", *_gsm8k_from(_data(t, "d.jsonl", b""))), ["d.jsonl", "empty"], ["run"]),
    ("empty .json", lambda t, m: train_args(m, t / "run", *_gsm8k_from(_data(t, "d.json", b""))), ["d.json", "empty"], ["run"]),
    ("plain text .jsonl", lambda t, m: train_args(m, t / "run", *_gsm8k_from(_data(t, "d.jsonl", b"two plus two\n"))),
     ["d.jsonl"], ["run"]),
    ("corrupt .jsonl.gz", lambda t, m: train_args(m, t / "run", *_gsm8k_from(_data(t, "d.jsonl.gz", b"not gzip"))),
     ["d.jsonl.gz"], ["run"]),
    ("pretrain steps=0", lambda t, m: ["pretrain", "--preset", "tiny", "--set", "pretrain.steps=0"], ["pretrain.steps"], []),
    ("pretrain steps=-1", lambda t, m: ["pretrain", "--preset", "tiny", "--set", "pretrain.steps=-1"], ["pretrain.steps"], []),
    ("pretrain batch_size=0", lambda t, m: ["pretrain", "--preset", "tiny", "--set", "pretrain.batch_size=0"],
     ["pretrain.batch_size"], []),
    ("pretrain lr<0", lambda t, m: ["pretrain", "--preset", "tiny", "--set", "pretrain.lr=-1"], ["pretrain.lr"], []),
    ("pretrain hidden_size=65", lambda t, m: ["pretrain", "--preset", "tiny", "--set", "pretrain.hidden_size=65"],
     ["pretrain.hidden_size", "pretrain.num_heads"], []),
    # one line, but something was left half-written
    ("grpo.group_size=0", lambda t, m: train_args(m, t / "run", *sets("grpo.group_size=0")), ["grpo.group_size"], ["run"]),
    ("vineppo.k=0", lambda t, m: train_args(m, t / "run", *sets("vineppo.k=0"), algo="vineppo"), ["vineppo.k"], ["run"]),
    ("train missing --model", lambda t, m: train_args(t / "nope", t / "run"), ["nope"], ["run"]),
    ("bench bad --set value", lambda t, m: _bench(m, t, *sets("grpo.group_size=0")), ["grpo.group_size"], ["bench"]),
    ("bench bad --set for one strategy", lambda t, m: _bench(m, t, *sets("vineppo.k=0")), ["vineppo.k"], ["bench"]),
    ("bench bad --sweep value", lambda t, m: _bench(m, t, "--sweep", "train.lr=1e-4,-1"), ["train.lr", "-1"], ["bench"]),
    ("bench malformed --config", lambda t, m: _bench(m, t, "--config", _bad_gin(t)), ["gin"], ["bench"]),
    ("bench missing --model", lambda t, m: _bench(t / "nope", t), ["nope"], ["bench"]),
    ("audit missing --policy", lambda t, m: ["audit", "--algos", "vineppo", "--policy", str(t / "nope"), "--out", str(t / "audit")],
     ["nope"], ["audit"]),
    # accepted silently before
    ("iterations=-1", lambda t, m: train_args(m, t / "run", *sets("train.iterations=-1")), ["train.iterations"], ["run"]),
    # misleading before
    ("pretrain --task gsm8k", lambda t, m: ["pretrain", "--task", "gsm8k"], ["gsm8k", "alphabet"], []),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tiny_policy_path, tmp_path, capsys):
    _, make, words, absent = case
    policies = tiny_policy_path.parent
    built_before = sorted(policies.iterdir())
    code, err = run_cli(capsys, [str(a) for a in make(tmp_path, tiny_policy_path)])
    assert code == 2 and len(err) == 1 and err[0].startswith("rlzoo: error:"), err
    assert all(w in err[0] for w in words), err
    for name in absent:
        assert not (tmp_path / name).exists(), f"{name} left behind"
    assert sorted(policies.iterdir()) == built_before  # no half-built policy


# Resuming a damaged run folder: refused with one line naming the file, and the folder is left as it was.
def _cut_metrics(run):
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: text.index('"kind": "train"') + 20])  # cut inside the first train record


RESUME_CASES = [
    ("corrupt state.pt", lambda run: (run / "checkpoints/iter_000002/state.pt").write_bytes(b"\x80\x02garbage"), ["state.pt", "corrupt"]),
    ("truncated policy.optim.pt", lambda run: (run / "checkpoints/iter_000002/policy.optim.pt").write_bytes(
        (run / "checkpoints/iter_000002/policy.optim.pt").read_bytes()[:100]), ["policy.optim.pt"]),
    ("corrupt model.safetensors", lambda run: (run / "checkpoints/iter_000002/policy/model.safetensors").write_bytes(b"{}" * 10),
     ["iter_000002", "policy"]),
    ("corrupt run.json", lambda run: (run / "run.json").write_text('{"algo": "grpo", '), ["run.json"]),
    ("metrics.jsonl cut mid-record", _cut_metrics, ["metrics.jsonl", "iterations 1..2"]),
]


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resuming_a_damaged_run_is_one_line_and_changes_nothing(case, trained_run, tmp_path, capsys):
    _, damage, words = case
    run, argv = interrupted_copy(trained_run, tmp_path)
    damage(run)
    before = snapshot(run)
    code, err = run_cli(capsys, [str(a) for a in argv])
    assert code == 2 and len(err) == 1 and err[0].startswith("rlzoo: error:"), err
    assert all(w in err[0] for w in words), err
    assert snapshot(run) == before


class Payload:
    """Pickles as a call of ``open(marker, "w")``: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["state.pt", "policy.optim.pt"])
def test_a_crafted_checkpoint_is_refused_without_running_its_payload(victim, trained_run, tmp_path, capsys):
    run, argv = interrupted_copy(trained_run, tmp_path)
    path = run / "checkpoints" / "iter_000002" / victim
    marker = tmp_path / "payload-ran"
    # the real file's contents, plus one object that runs code when unpickled
    torch.save(torch.load(path, weights_only=True) | {"x": Payload(marker)}, path)
    before = snapshot(run)
    code, err = run_cli(capsys, [str(a) for a in argv])
    assert code == 2 and len(err) == 1 and err[0].startswith("rlzoo: error:") and victim in err[0], err
    assert not marker.exists() and snapshot(run) == before
    # the payload is live: an unpickling load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()
    os.remove(marker)


def test_resume_uses_the_newest_checkpoint_when_latest_names_a_missing_one(trained_run, tmp_path, capsys):
    run, argv = interrupted_copy(trained_run, tmp_path)
    (run / "checkpoints" / "latest").write_text("iter_000009")
    code, err = run_cli(capsys, [str(a) for a in argv])
    assert code == 0, err
    records, original = runs.read_jsonl(run / "metrics.jsonl"), runs.read_jsonl(trained_run[0] / "metrics.jsonl")
    # resumed at iteration 2: the records before it are kept as they were, timings included (a retrain would re-time them)
    assert [(r["kind"], r["iteration"]) for r in records] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    assert records[:3] == original[:3]
    assert runs.read_run(run)["status"] == "finished"


def test_leaderboard_baseline_must_name_a_strategy_that_ran(trained_run, tmp_path, capsys):
    code, err = run_cli(capsys, ["leaderboard", str(trained_run[0]), "--baseline", "nope", "--out", str(tmp_path / "board")])
    assert code == 2 and len(err) == 1 and "--baseline 'nope'" in err[0] and "grpo" in err[0], err
    assert not (tmp_path / "board").exists()


# 32 samples: some group surely has rewards that differ, so the first update is not all zero advantages
LIVELY = ["train.prompts_per_iteration=8", "grpo.group_size=4", "value_ppo.group_size=4"]


def test_non_finite_at_the_first_iteration_says_no_checkpoint_exists(tiny_policy_path, tmp_path, capsys):
    argv = train_args(tiny_policy_path, tmp_path / "run", *RUN_BUDGET,
                      *sets("train.lr=1e30", "train.warmup_ratio=0.0", "ppo.max_grad_norm=1e30", *LIVELY))
    code, err = run_cli(capsys, argv)
    assert code == 2 and len(err) == 1 and "non-finite" in err[0] and "no checkpoint" in err[0], err
    assert "is intact" not in err[0] and runs.read_run(tmp_path / "run")["status"] == "failed"


def test_a_diverging_critic_names_the_critic_learning_rate(tiny_policy_path, tmp_path, capsys):
    argv = train_args(tiny_policy_path, tmp_path / "run", *RUN_BUDGET, algo="ppo",
                      *sets("value_ppo.critic_lr=1e30", "value_ppo.max_grad_norm=1e30", *LIVELY))
    code, err = run_cli(capsys, argv)
    assert code == 2 and len(err) == 1 and "critic" in err[0] and "value_ppo.critic_lr" in err[0], err
    assert "train.lr" not in err[0]


def test_a_run_json_that_is_valid_json_but_not_an_object_is_refused(trained_run, tmp_path, capsys):
    run, argv = interrupted_copy(trained_run, tmp_path)
    (run / "run.json").write_text(json.dumps(["grpo"]))
    code, err = run_cli(capsys, [str(a) for a in argv])
    assert code == 2 and len(err) == 1 and "run.json" in err[0], err
