"""Data parallelism on CPU: `rlzoo train` as two gloo processes under torchrun (plain DDP or DeepSpeed
ZeRO-2) against one process with the same global batch and seeds; a killed two-process run resumes;
a wrong launch fails with one line on every rank. Two-process tests are slow (tens of seconds each)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from rlzoo import runs
from rlzoo.cli import main
from rlzoo.engine import SamplingParams
from rlzoo.engine.torch_engine import TorchEngine

# 8 prompts x 4 samples; two minibatches of 16 rows; micro-batches of 4, so each rank accumulates two
# micro-batches per minibatch (one process: four). One-operation arith gives the tiny policy some reward.
SMALL = [
    "train.prompts_per_iteration = 8", "grpo.group_size = 4", "value_ppo.group_size = 4", "vineppo.group_size = 4",
    "vineppo.k = 2", "train.lr = 1e-4", "train.warmup_ratio = 0.0", "ppo.epochs = 1", "ppo.minibatches = 2",
    "ppo.micro_batch_size = 4", "value_ppo.critic_minibatches = 2", "value_ppo.micro_batch_size = 4",
    "train.eval_every = 100", "train.eval_samples = 2", "train.eval_train_problems = 4", "train.eval_test_problems = 4",
    "train.checkpoint_every = 1", "arith.max_ops = 1", "arith.max_operand = 9", "arith.train_size = 150",
    "arith.test_size = 20", "arith.ood_test_size = 20",
]
SCHEDULE = ["train.warmup_ratio = 0.5", 'train.lr_schedule = "cosine"', "ppo.max_grad_norm = 0.05"]
ZERO2 = {"zero_optimization": {"stage": 2}, "optimizer": {"params": {"torch_adam": True}}}  # torch's AdamW: nothing to compile


def _args(algo, model, out, bindings=(), budget="iterations=2", deepspeed=None):
    args = ["train", "--algo", algo, "--model", str(model), "--out", str(out), "--budget", budget]
    args += ["--deepspeed", str(deepspeed)] if deepspeed else []
    return args + [x for b in list(SMALL) + list(bindings) for x in ("--set", b)]


def _torchrun(args, stdout=subprocess.PIPE):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rlzoo.cli", *args]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def _two_ranks(args) -> None:
    proc = _torchrun(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


def _one_process(args) -> None:
    try:
        main(args)
    except SystemExit as e:
        assert e.code == 0


def _zero2(tmp_path):
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(ZERO2))
    return path


def _weights(run_dir, name="policy/model.safetensors"):
    latest = (run_dir / "checkpoints" / "latest").read_text()
    return load_file(run_dir / "checkpoints" / latest / name)


def _assert_same_weights(a, b, start=None):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-6, msg=k)
    if start is not None:  # and training did move them, by far more than the tolerance
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 2e-5


# FLOPs of sampling count the engine's padding, which depends on how the prompts split over ranks; so do those of
# the update and the critic: one process groups a minibatch's rows by length, ranks keep a plain split of theirs.
SAMPLER_FLOPS = ("flops/total", "flops/generation", "flops/mc", "flops/baseline", "flops/update", "flops/advantages", "flops/critic")


def _comparable(run_dir):
    """Metrics without wall-clock and memory figures, nor the FLOPs of sampling."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/")) and not k.endswith("/seconds") and k not in SAMPLER_FLOPS}
            for r in runs.read_jsonl(run_dir / "metrics.jsonl")]


def _same_value(got, want) -> bool:
    """Numbers up to float rounding; everything else (kind, names, flags, None) exactly, since pytest.approx
    raises on non-numbers (pytest >= 9.2) and a bool or a label that differs is a real difference."""
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_same_value, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same_value(got[k], want[k]) for k in want)
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and got == pytest.approx(want, rel=1e-4, abs=1e-6)
    return type(got) is type(want) and got == want


def _assert_same_metrics(a, b):
    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            assert _same_value(rb[k], v), (ra["kind"], ra["iteration"], k, rb[k], v)


@pytest.fixture(scope="module")
def grpo_two_ranks(tiny_policy_path, tmp_path_factory):
    """A three-iteration GRPO run of two ZeRO-2 ranks (shared by the equality and the resume tests), with a
    warm-up + cosine learning-rate schedule and gradient clipping that bites (gradient norms are ~1-5)."""
    root = tmp_path_factory.mktemp("grpo2")
    args = _args("grpo", tiny_policy_path, root / "run", SCHEDULE, budget="iterations=3", deepspeed=_zero2(root))
    _two_ranks(args)
    return root / "run", args


@pytest.mark.slow
def test_grpo_two_zero2_ranks_reach_the_parameters_of_one_process(grpo_two_ranks, tiny_policy_path, tmp_path):
    two, _ = grpo_two_ranks
    _one_process(_args("grpo", tiny_policy_path, tmp_path / "one", SCHEDULE, budget="iterations=3"))
    _assert_same_weights(_weights(two), _weights(tmp_path / "one"), start=load_file(tiny_policy_path / "model.safetensors"))
    _assert_same_metrics(_comparable(two), _comparable(tmp_path / "one"))
    train = [r for r in _comparable(two) if r["kind"] == "train"]
    assert any(r["reward/mean"] > 0 for r in train)  # there was a learning signal
    assert len({r["lr"] for r in train}) == 3 and any(r["ppo/grad_norm"] > 0.05 for r in train)  # the schedule moved; clipping bit
    assert runs.read_run(two)["processes"] == 2
    assert sorted(p.name for p in (two / "checkpoints" / "iter_000003").iterdir()) == ["policy", "policy.zero", "state.pt"]


@pytest.mark.slow
def test_value_ppo_two_zero2_ranks_reach_the_parameters_of_one_process(tiny_policy_path, tmp_path):
    # Two epochs and a tight ratio threshold: minibatches after the first step are skipped (DeepSpeed drops them).
    # Prompts run whole in both (ranks cannot share them in the update: a backward follows one forward there; one
    # process sharing them differs by rounding, which the tight threshold can turn into another skip).
    skips = ["ppo.epochs = 2", "ppo.ratio_skip_threshold = 1.0002", "ppo.share_prompts = False"]
    _two_ranks(_args("ppo", tiny_policy_path, tmp_path / "two", skips, deepspeed=_zero2(tmp_path)))
    _one_process(_args("ppo", tiny_policy_path, tmp_path / "one", skips))
    _assert_same_weights(_weights(tmp_path / "two"), _weights(tmp_path / "one"), start=load_file(tiny_policy_path / "model.safetensors"))
    _assert_same_weights(_weights(tmp_path / "two", "critic.safetensors"), _weights(tmp_path / "one", "critic.safetensors"))
    _assert_same_metrics(_comparable(tmp_path / "two"), _comparable(tmp_path / "one"))
    train = [r for r in _comparable(tmp_path / "two") if r["kind"] == "train"]
    assert all(r["ppo/skipped_minibatches"] > 0 and r["ppo/optimizer_steps"] > 0 for r in train)


@pytest.mark.slow
def test_vineppo_mc_values_split_over_two_ranks_equal_one_process(tiny_policy_path, tmp_path):
    # Plain DDP here (no DeepSpeed config): the other data-parallel path.
    _two_ranks(_args("vineppo", tiny_policy_path, tmp_path / "two"))
    _one_process(_args("vineppo", tiny_policy_path, tmp_path / "one"))
    two, one = _comparable(tmp_path / "two"), _comparable(tmp_path / "one")
    _assert_same_metrics(two, one)  # credit/mc_value_mean (the MC values' checksum), tokens/mc, advantages, losses ...
    train = [r for r in two if r["kind"] == "train"]
    assert all(r["credit/mc_unique_states"] > 2 and r["tokens_iter/mc"] > 0 for r in train)
    _assert_same_weights(_weights(tmp_path / "two"), _weights(tmp_path / "one"))


# What each splits over ranks: spo_chain and vineppo_adaptive their MC rollouts (the adaptive one round by round,
# every rank settling the same states), prime its implicit PRM's update (a second module trained through DDP).
ZOO_2025 = {
    "spo_chain": ["spo_chain.group_size = 4", "spo_chain.k = 2", "spo_chain.cutpoint_interval = 2"],
    "vineppo_adaptive": ["vineppo_adaptive.group_size = 4", "vineppo_adaptive.k_first = 2", "vineppo_adaptive.round_size = 2",
                         "vineppo_adaptive.k_max = 6", "vineppo_adaptive.budget = 3.0"],
    "prime": ["prime.group_size = 4", "prime.micro_batch_size = 4", "prime.prm_lr = 1e-4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(ZOO_2025))
def test_the_2025_strategies_over_two_ranks_equal_one_process(algo, tiny_policy_path, tmp_path):
    _two_ranks(_args(algo, tiny_policy_path, tmp_path / "two", ZOO_2025[algo]))
    _one_process(_args(algo, tiny_policy_path, tmp_path / "one", ZOO_2025[algo]))
    two, one = _comparable(tmp_path / "two"), _comparable(tmp_path / "one")
    _assert_same_metrics(two, one)  # credit/* (the MC values' and the PRM's statistics), tokens, losses ...
    _assert_same_weights(_weights(tmp_path / "two"), _weights(tmp_path / "one"), start=load_file(tiny_policy_path / "model.safetensors"))
    if algo == "prime":
        _assert_same_weights(_weights(tmp_path / "two", "prm/model.safetensors"), _weights(tmp_path / "one", "prm/model.safetensors"))
    else:
        assert all(r["tokens_iter/mc"] > 0 for r in two if r["kind"] == "train")


@pytest.mark.slow
def test_spo_tree_sampled_over_two_ranks_equals_one_process(tiny_policy_path, tmp_path):
    # A strategy that owns the shape of its samples: each level's nodes draw the keys one process gives them.
    tree = ["spo_tree.branch_factors = (2, 2)", "spo_tree.segment_tokens = 4"]
    _two_ranks(_args("spo_tree", tiny_policy_path, tmp_path / "two", tree))
    _one_process(_args("spo_tree", tiny_policy_path, tmp_path / "one", tree))
    two, one = _comparable(tmp_path / "two"), _comparable(tmp_path / "one")
    _assert_same_metrics(two, one)  # credit/tree_* (the tree's shape and values), tokens/policy, losses ...
    assert all(r["credit/tree_edges"] > r["credit/tree_leaves"] for r in two if r["kind"] == "train")  # a tree, not groups
    _assert_same_weights(_weights(tmp_path / "two"), _weights(tmp_path / "one"))


@pytest.mark.slow
def test_two_rank_run_killed_mid_way_resumes_to_the_same_metrics(grpo_two_ranks, tmp_path):
    reference, args = grpo_two_ranks
    run_dir = tmp_path / "killed"
    args = [str(run_dir) if a == str(reference) else a for a in args]
    with open(tmp_path / "killed.log", "w") as log:
        proc = _torchrun(args, stdout=log)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (latest.exists() and latest.read_text() >= "iter_000001"):
        time.sleep(0.02)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:  # the ranks, then torchrun
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert runs.read_run(run_dir)["status"] == "running"
    _two_ranks(args)
    assert runs.read_run(run_dir)["status"] == "finished"
    _assert_same_metrics(_comparable(run_dir), _comparable(reference))
    _assert_same_weights(_weights(run_dir), _weights(reference))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["prompts", "fp16"])
def test_a_wrong_launch_fails_with_one_line_on_every_rank(problem, tiny_policy_path, tmp_path):
    if problem == "prompts":  # 3 prompts cannot be split over 2 ranks
        args, expected = _args("grpo", tiny_policy_path, tmp_path / "run", ["train.prompts_per_iteration = 3"]), "prompts_per_iteration"
    else:  # a config asking for a device this machine does not have
        (tmp_path / "fp16.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
        args, expected = _args("grpo", tiny_policy_path, tmp_path / "run", deepspeed=tmp_path / "fp16.json"), "fp16"
    # The two ranks started by hand, with the environment torchrun gives them, to see each one's exit code and output.
    env = os.environ | {"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    ranks = [subprocess.Popen([sys.executable, "-m", "rlzoo.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    for proc in ranks:
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, err
        assert lines[0].startswith("rlzoo: error:") and expected in lines[0]


def test_a_split_request_samples_what_the_whole_request_samples(tiny_policy_path):
    """Ranks that each send their part of a request (SamplingParams.first_index) get the one-process samples."""
    from rlzoo.policy import load_policy

    model, tokenizer = load_policy(str(tiny_policy_path))
    engine = TorchEngine(model, tokenizer)
    prompts = [tokenizer(q)["input_ids"] for q in ("1+2?\n", "3*4?\n", "5-1?\n", "1+2?\n", "9+9?\n")]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    ids = lambda out: [[c.token_ids for c in group] for group in out]  # noqa: E731
    whole = ids(engine.generate(prompts, params))
    parts = ids(engine.generate(prompts[:2], params)) + ids(engine.generate(prompts[2:], SamplingParams(**{**params.__dict__, "first_index": 2})))
    assert parts == whole
    assert ids(engine.generate(prompts[2:], params)) != whole[2:]  # without the offset, the part would sample differently


def test_bench_runs_each_train_through_a_launcher(tmp_path):
    from rlzoo.bench import make_plan, plan_runs
    from rlzoo.errors import UserError

    plan = make_plan("grpo,rloo", "arith", seeds=1, launcher="torchrun --nproc_per_node 2 -m")
    assert all(r.command[:6] == ["torchrun", "--nproc_per_node", "2", "-m", "rlzoo.cli", "train"] for r in plan_runs(plan, tmp_path))
    assert plan_runs(make_plan("grpo", "arith", seeds=1), tmp_path)[0].command[:4] == [sys.executable, "-m", "rlzoo.cli", "train"]
    assert "launcher" not in make_plan("grpo", "arith", seeds=1).as_dict()  # bench.json of earlier benches still matches
    with pytest.raises(UserError, match="must end with"):
        make_plan("grpo", "arith", seeds=1, launcher="torchrun --nproc_per_node 2")
