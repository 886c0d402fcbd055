"""The training loop end to end on the tiny built-in policy: every strategy updates the policy and
reports its FLOPs by stage, evaluations of an unchanged policy agree, GRPO raises train reward, a
SIGKILLed run resumes to identical metrics (FLOPs included), faults stop cleanly."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlzoo import runs
from rlzoo.algorithms import ESTIMATORS
from rlzoo.cli import main
from conftest import TINY_ARITH

CONFIGURABLE = {"ppo": "value_ppo"}  # estimator name -> its gin name, where they differ
MC_VALUED = {"vineppo", "vineppo_adaptive", "spo_chain"}  # strategies whose Monte-Carlo values are the "mc" stage

# Small and fast: 4 prompts x 2 samples, one optimizer step per epoch, tiny evaluation sets.
SMALL = [
    "train.prompts_per_iteration = 8", "train.lr = 1e-3", "train.eval_every = 100", "train.eval_samples = 2",
    "train.eval_train_problems = 4", "train.eval_test_problems = 4", "train.checkpoint_every = 1",
    "ppo.epochs = 1", "ppo.minibatches = 1", "vineppo.k = 2", "arith.test_size = 20", "arith.ood_test_size = 20",
    "vineppo_adaptive.k_first = 2", "vineppo_adaptive.round_size = 2", "vineppo_adaptive.budget = 3", "spo_chain.k = 2",
    "spo_tree.segment_tokens = 4",
] + TINY_ARITH


def _group_size(algo, n):
    if algo == "spo_tree":  # its group is its tree: n leaves at most
        return f"spo_tree.branch_factors = ({n // 2}, 2)"
    return f"{CONFIGURABLE.get(algo, algo)}.group_size = {n}"


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stage_flops(record) -> dict:
    return {k: v for k, v in record.items() if k.startswith("flops/") and k != "flops/total"}


def _train(run_dir, algo, model, bindings, budget="iterations=2"):
    args = ["train", "--algo", algo, "--model", str(model), "--out", str(run_dir), "--budget", budget]
    for b in bindings:
        args += ["--set", b]
    try:
        main(args)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("algo", ESTIMATORS.names())
def test_every_strategy_runs_and_changes_the_policy(algo, tiny_policy_path, tmp_path):
    assert _train(tmp_path, algo, tiny_policy_path, SMALL + [_group_size(algo, 4)]) == 0
    before = load_file(tiny_policy_path / "model.safetensors")
    after = load_file(tmp_path / "checkpoints" / "iter_000002" / "policy" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    records = runs.read_jsonl(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train_records] == [1, 2]
    assert {"eval/test/pass@1", "eval/train/pass@1"} <= set(records[0]) and records[-1]["kind"] == "eval"
    assert all(r["ppo/optimizer_steps"] == 1 for r in train_records)
    assert train_records[0]["tokens/policy"] > 0 and "time/generation" in train_records[0]
    if algo in MC_VALUED:
        assert train_records[0]["tokens/mc"] > 0 and train_records[0]["time/mc"] > 0
    if algo == "ppo":
        assert (tmp_path / "checkpoints" / "iter_000002" / "critic.safetensors").exists()
    if algo == "spo_tree":  # trees of 2 x 2 leaves: segments shared by two leaves were generated once
        assert all(r["credit/tree_leaves"] <= 8 * 4 and r["credit/tree_edges"] <= 8 * 6 for r in train_records)
        assert all(r["tokens_iter/policy"] <= r["response/length_mean"] * r["credit/tree_leaves"] + 1e-6 for r in train_records)
    if algo == "prime":
        assert (tmp_path / "checkpoints" / "iter_000002" / "prm" / "model.safetensors").exists()
        assert all("credit/prm_accuracy" in r and "critic/loss" in r for r in train_records)

    # FLOPs: every stage that runs a model reports a positive estimate; they add up to the cumulative total.
    from transformers import AutoModelForCausalLM

    n_policy = _parameters(AutoModelForCausalLM.from_pretrained(tiny_policy_path))
    total = 0
    for r in train_records:
        stages = _stage_flops(r)
        assert {"flops/generation", "flops/logprobs", "flops/update"} <= set(stages) and all(v > 0 for v in stages.values())
        assert r["flops/total"] == total + sum(stages.values())
        total = r["flops/total"]
        # micro-batches of rows of similar length run to their longest row, each prompt shared by several rows once:
        # between the response tokens and B x L
        within = lambda flops, per_position: per_position * r["batch/response_tokens"] <= flops <= per_position * r["batch/tokens"]  # noqa: E731
        assert r["batch/real_tokens"] < r["batch/tokens"]  # rows of several lengths: some padding to leave out
        assert within(r["flops/update"], 6 * n_policy * 1)  # ppo.epochs = 1
        assert within(r["flops/logprobs"], 2 * n_policy * 1)  # the reference's (the policy's came with the samples)
        assert ("flops/mc" in stages) == (algo in MC_VALUED) and ("flops/baseline" in stages) == (algo == "remax")
        if algo == "ppo":  # the critic's forward (in advantages) and its update, by its own parameter count
            from rlzoo.algorithms.value_ppo import ValueModel

            n_critic = _parameters(ValueModel(str(tiny_policy_path)))
            assert within(r["flops/advantages"], 2 * n_critic)
            assert within(r["flops/critic"], 6 * n_critic * 2)  # value_ppo.critic_epochs = 2
        elif algo == "prime":  # the forwards of the implicit PRM and its frozen π_ref (in advantages), the PRM's CE update
            n_prm = n_policy  # both from the policy checkpoint
            assert within(r["flops/advantages"], 2 * n_prm + 2 * n_prm)
            assert within(r["flops/critic"], 6 * n_prm * 1)  # prime.prm_epochs = 1
        else:
            assert "flops/critic" not in stages and "flops/advantages" not in stages
    assert records[0]["flops/total"] == 0 and records[-1]["flops/total"] == total  # evals carry the total so far
    assert runs.read_run(tmp_path)["status"] == "finished"
    assert "train.algo" in (tmp_path / "config.gin").read_text()


def test_every_evaluation_of_an_unchanged_policy_scores_the_same(tiny_policy_path, tmp_path):
    # At lr 0 the policy never changes: only a new draw of eval problems or sampler seeds could move its scores.
    evaluated = ["train.eval_every = 1", "train.eval_samples = 4", "train.eval_train_problems = 8", "train.eval_test_problems = 8"]
    frozen = SMALL + evaluated + ["grpo.group_size = 2", "train.lr = 0", "ppo.epochs = 2"]
    assert _train(tmp_path / "grpo", "grpo", tiny_policy_path, frozen, budget="iterations=2") == 0
    records = runs.read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
    scores = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in records if r["kind"] == "eval"]
    assert len(scores) == 3 and scores[0] == scores[1] == scores[2]
    assert 0 < scores[0]["eval/test/pass@1"] < 1 or 0 < scores[0]["eval/train/pass@1"] < 1  # samples that can differ
    # another strategy with the same run seed is evaluated on the same problems with the same seeds (here on
    # train.eval_splits' choice of splits: test only, no ood_test)
    only_test = ["rloo.group_size = 2", "train.eval_splits = ('test',)"]
    assert _train(tmp_path / "rloo", "rloo", tiny_policy_path, SMALL + evaluated + only_test, budget="iterations=1") == 0
    first = next(r for r in runs.read_jsonl(tmp_path / "rloo" / "metrics.jsonl") if r["kind"] == "eval")
    assert {k: v for k, v in first.items() if k.startswith("eval/")} == {k: v for k, v in scores[0].items() if "ood_test" not in k}
    # both runs record the weights they started from: the same policy, whatever trained on it since
    from rlzoo.policy import load_policy, weights_digest

    start = weights_digest(load_policy(tiny_policy_path)[0])
    assert runs.read_run(tmp_path / "grpo")["model_sha256"] == runs.read_run(tmp_path / "rloo")["model_sha256"] == start
    assert any("ood_test" in k for k in scores[0])
    # the update's FLOPs: 6·N per position run (forward + backward), every epoch: at least the response tokens twice
    # (a prompt of 2 samples in a micro-batch runs once), at most the whole padded batch twice
    from transformers import AutoModelForCausalLM

    n_policy = _parameters(AutoModelForCausalLM.from_pretrained(tiny_policy_path))
    for r in records:
        if r["kind"] == "train":
            assert 6 * n_policy * r["batch/response_tokens"] * 2 <= r["flops/update"] <= 6 * n_policy * r["batch/tokens"] * 2


@pytest.mark.slow
def test_grpo_raises_train_reward_on_a_fixed_pool(tiny_policy_path, tmp_path):
    # A finite pool of 32 problems: RL learns the problems it trains on (the prototype went 44% -> 95%).
    bindings = ["arith.train_size = 32", "train.prompts_per_iteration = 16", "grpo.group_size = 8", "train.lr = 1e-4",
                "train.warmup_ratio = 0.1", "train.eval_every = 12", "train.eval_samples = 8", "train.eval_train_problems = 32",
                "train.eval_test_problems = 32", "train.checkpoint_every = 100", "ppo.minibatches = 2",
                "arith.test_size = 32", "arith.ood_test_size = 32"] + TINY_ARITH
    assert _train(tmp_path, "grpo", tiny_policy_path, bindings, budget="iterations=24") == 0
    evals = [r for r in runs.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    first, last = evals[0]["eval/train/pass@1"], evals[-1]["eval/train/pass@1"]
    assert last > first + 0.05, (first, last)


def _comparable(records):
    drop = ("time/", "memory/")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in records]


def _uninterrupted_run_and_command(tiny_policy_path, tmp_path, out):
    """A 6-iteration GRPO run trained in-process (the reference), and the CLI command of the same run into ``out``."""
    bindings = SMALL + ["grpo.group_size = 4", "train.eval_every = 2", "train.checkpoint_every = 2"]
    reference = tmp_path / "uninterrupted"
    assert _train(reference, "grpo", tiny_policy_path, bindings, budget="iterations=6") == 0
    cmd = [sys.executable, "-m", "rlzoo.cli", "train", "--algo", "grpo", "--model", str(tiny_policy_path),
           "--out", str(out), "--budget", "iterations=6"] + [x for b in bindings for x in ("--set", b)]
    return reference, cmd


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_metrics(tiny_policy_path, tmp_path):
    killed = tmp_path / "killed"
    reference, cmd = _uninterrupted_run_and_command(tiny_policy_path, tmp_path, killed)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once it has passed a checkpoint but not finished
        done = [r for r in runs.read_jsonl(killed / "metrics.jsonl") if r["kind"] == "train"]
        if done and done[-1]["iteration"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert runs.read_run(killed)["status"] == "running"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    resumed = runs.read_jsonl(killed / "metrics.jsonl")
    assert _comparable(resumed) == _comparable(runs.read_jsonl(reference / "metrics.jsonl"))
    assert resumed[-1]["flops/total"] > 0 and all("flops/total" in r for r in resumed)  # cumulative FLOPs survive the resume


@pytest.mark.slow
def test_a_repeated_sigterm_still_saves_and_a_second_train_waits_for_the_folder(tiny_policy_path, tmp_path):
    # What a killed bench leaves (issue 16): its orphaned run gets the parent-death SIGTERM, maybe twice, while the
    # re-run bench starts the same run. The orphan must save and stop; the second process must wait, then resume.
    shared = tmp_path / "shared"
    reference, cmd = _uninterrupted_run_and_command(tiny_policy_path, tmp_path, shared)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not [r for r in runs.read_jsonl(shared / "metrics.jsonl") if r["kind"] == "train"]:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    first.send_signal(signal.SIGTERM)  # the parent-death signal again: still "save and stop", not "stop now"
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err, err
    assert runs.read_run(shared)["status"] == "running" and (shared / "checkpoints" / "latest").is_file()

    log = tmp_path / "second.log"
    with runs.owned(shared):  # another process owns the folder: a second train waits, writing nothing
        before = {p: p.read_bytes() for p in shared.rglob("*") if p.is_file()}
        with open(log, "w") as out:
            second = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while time.time() < deadline and "waiting" not in log.read_text() and second.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        assert second.poll() is None, log.read_text()
        assert {p: p.read_bytes() for p in shared.rglob("*") if p.is_file()} == before
    assert second.wait(timeout=300) == 0, log.read_text()
    assert "resuming" in log.read_text()
    assert _comparable(runs.read_jsonl(shared / "metrics.jsonl")) == _comparable(runs.read_jsonl(reference / "metrics.jsonl"))


def test_non_finite_update_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_policy_path, tmp_path, capsys):
    bindings = SMALL + ["grpo.group_size = 2", "train.lr = 1e30", "train.warmup_ratio = 0.0", "ppo.max_grad_norm = 1e30"]
    code = _train(tmp_path, "grpo", tiny_policy_path, bindings, budget="iterations=5")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-finite" in err[0] and "checkpoint" in err[0]
    assert runs.read_run(tmp_path)["status"] == "failed"
    # nothing non-finite was ever checkpointed
    for ckpt in (tmp_path / "checkpoints").glob("iter_*"):
        weights = load_file(ckpt / "policy" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_policy_path, tmp_path):
    cmd = [sys.executable, "-m", "rlzoo.cli", "train", "--algo", "grpo", "--model", str(tiny_policy_path),
           "--out", str(tmp_path), "--budget", "iterations=1000"] + [x for b in SMALL + ["grpo.group_size = 2",
                                                                       "train.checkpoint_every = 1000"] for x in ("--set", b)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not [r for r in runs.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume" in err
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert (tmp_path / "checkpoints" / latest / "state.pt").exists()


def test_a_resume_from_other_base_weights_is_one_line_and_exit_2(tiny_policy_path, tmp_path, capsys):
    # the base model is reloaded on resume as the frozen KL reference: other weights under the same name (the default
    # policy rebuilt on another kind of CPU) would change the run silently
    bindings = SMALL + ["grpo.group_size = 2"]
    assert _train(tmp_path, "grpo", tiny_policy_path, bindings) == 0
    run = runs.read_run(tmp_path) | {"status": "running"}  # as if killed after its last checkpoint
    runs.write_run(tmp_path, run | {"model_sha256": "0" * 64})
    metrics = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _train(tmp_path, "grpo", tiny_policy_path, bindings) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "started from other weights" in err[0] and "000000000000" in err[0], err
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # nothing resumed, nothing cut
    runs.write_run(tmp_path, run)  # the weights it started from: it resumes
    assert _train(tmp_path, "grpo", tiny_policy_path, bindings) == 0
    assert runs.read_run(tmp_path)["status"] == "finished"
    assert [r["iteration"] for r in runs.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]


def test_bad_train_input_is_one_line_and_exit_2(tiny_policy_path, tmp_path, capsys):
    for args in (["--algo", "nope"], ["--algo", "grpo", "--budget", "weeks=3"], ["--algo", "grpo", "--set", "train.nope = 1"],
                 ["--algo", "grpo", "--model", str(tmp_path / "missing")],
                 ["--algo", "grpo", "--model", str(tiny_policy_path), "--set", "train.eval_splits = ('train',)"]):
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", str(tmp_path / "run")] + args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rlzoo: error:"), err
