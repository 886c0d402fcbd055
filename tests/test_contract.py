"""The promise "a new strategy is one file": a third-party estimator, installed as one module plus its entry
point, trains in a bench, appears on its leaderboard and in the credit audit; the loop and the audit name no
strategy; the package's imports run one way, floor by floor, without a cycle."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ import graph

# Each module of the package and its floor: a module imports only modules on its own floor or below
# (cli -> bench -> leaderboard/audit -> train -> engine | PPO core | estimators -> tasks/policy -> runs/grading).
FLOORS = {
    "rlzoo.cli": 7,
    "rlzoo.bench": 6,
    "rlzoo.leaderboard": 5, "rlzoo.audit": 5,
    "rlzoo.train": 4, "rlzoo.config": 4,
    "rlzoo.engine": 3, "rlzoo.ppo": 3, "rlzoo.algorithms": 3, "rlzoo.rollout": 3, "rlzoo.evaluate": 3,
    "rlzoo.tasks": 2, "rlzoo.policy": 2, "rlzoo.distributed": 2,
    "rlzoo.runs": 1, "rlzoo.grading": 1, "rlzoo.errors": 1, "rlzoo.registry": 1, "rlzoo.seeds": 1, "rlzoo.reporting": 1,
    "rlzoo": 0,  # the package's __init__: its version
}
SOURCES = {"rlzoo": REPO / "rlzoo", "rlzoo.algorithms": REPO / "algorithms", "rlzoo.tasks": REPO / "tasks"}


def package_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = f
    return modules


def floor(module: str) -> int:
    """The floor of a module: that of its longest listed prefix (rlzoo.engine.torch_engine: rlzoo.engine's)."""
    while module not in FLOORS:
        module = module.rpartition(".")[0]
    return FLOORS[module]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (lazy imports inside functions included)."""
    modules = package_modules()

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from rlzoo import runs`
            else:
                continue
            targets |= {resolve(n) for n in names if n.split(".")[0] == "rlzoo"} - {module, ""}
        graph[module] = targets
    return graph


def test_imports_run_down_the_floors_without_a_cycle():
    graph = import_graph()
    assert {"rlzoo.audit", "rlzoo.leaderboard", "rlzoo.reporting", "rlzoo.algorithms.vineppo"} <= set(graph)
    upward = [(a, b) for a, targets in graph.items() for b in targets if floor(b) > floor(a)]
    assert not upward, f"imports that climb a floor: {upward}"
    assert "rlzoo.leaderboard" not in graph["rlzoo.audit"] and "rlzoo.audit" not in graph["rlzoo.leaderboard"]

    def cycle_from(start, path, seen):
        for nxt in graph[path[-1]]:
            if nxt == start:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(start, path + [nxt], seen)
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, [m], {m}))]
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_the_loop_and_the_audit_name_no_strategy():
    from rlzoo.algorithms import ESTIMATORS

    names = set(ESTIMATORS.names())
    for path in (REPO / "rlzoo" / "train.py", REPO / "rlzoo" / "audit.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        core_keys = {id(k) for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if k is not None}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                # "ppo.<parameter>" is a binding of the PPO core every strategy shares, "ppo/<stat>" one of its
                # logged statistics, and run.json keeps the core's config under the key "ppo": none names the
                # strategy that is registered as "ppo".
                text = re.sub(r"\bppo[./]\w+", "", node.value)
                if id(node) in core_keys and text == "ppo" and path.name == "train.py":
                    continue
                found += [w for w in re.findall(r"[A-Za-z_]+", text) if w in names]
            elif isinstance(node, ast.Name) and node.id in names - {"ppo"}:
                found.append(node.id)
        assert not found, f"{path.name} names strategies: {found}"


def test_builtins_are_every_module_of_the_algorithms_package():
    from rlzoo.algorithms import ESTIMATORS

    files = {f.stem for f in (REPO / "algorithms").glob("*.py") if not f.stem.startswith("_")}
    assert {m.rpartition(".")[2] for m in ESTIMATORS.builtin_modules} == files


# ------------------------------------------------------------------------- every built-in fills the contract


def test_every_builtin_fills_credit_values_on_response_tokens():
    """Credit.values: V̂ of the state before each response token, 0 elsewhere, for every built-in; a strategy that owns
    the shape of its samples (``sample``) is credited on the batch it samples itself, as the loop would."""
    import dataclasses

    import torch

    from rlzoo.algorithms import ESTIMATORS, Estimator, build_estimator
    from test_estimators import _toy_batch_and_ctx

    def with_logprobs(batch):  # as the loop fills them before the credit: some tokens sure, some not (SPO-chain's cutpoints)
        gen = torch.Generator().manual_seed(0)
        batch.old_logprobs = torch.rand(batch.response_mask.shape, generator=gen).log() * batch.response_mask  # [B, L]
        return batch

    toy_batch, ctx = _toy_batch_and_ctx(0, 4)
    toy_batch = with_logprobs(toy_batch)
    baselines = {"grpo": toy_batch.scores.view(2, 4).mean(1).repeat_interleave(4), "reinforce": torch.zeros(8)}
    owners = []
    for name in ESTIMATORS.names():
        settable = "group_size" in {f.name for f in dataclasses.fields(ESTIMATORS.get(name))}
        estimator = build_estimator(name, **({"group_size": 4} if settable else {}))
        if estimator.learned:
            continue  # a critic: covered in test_audit (state_values, load_learned) and by the smoke audit
        batch = toy_batch
        if type(estimator).sample is not Estimator.sample:  # it samples its own shape: from the toy's prompts
            owners.append(name)
            batch = with_logprobs(estimator.sample(toy_batch.problems[::4], ctx))
            assert 2 <= batch.size <= 2 * estimator.group_size and batch.group_ids.unique().tolist() == [0, 1], name
        credit = estimator.advantages(batch, ctx)
        assert credit.values is not None and credit.values.shape == batch.response_mask.shape, name
        assert (credit.values * (1 - batch.response_mask)).abs().sum() == 0, name
        if credit.loss_mask is not None:
            assert (credit.loss_mask * (1 - batch.response_mask)).abs().sum() == 0, name
        if name in baselines:  # one value per response: its baseline
            first = batch.prompt_lens
            assert torch.allclose(credit.values[torch.arange(8), first], baselines[name]), name
    assert owners  # the contract's sample() is exercised (spo_tree)


# ------------------------------------------------------------------------------------ a third-party estimator

ESTIMATOR_FILE = '''"""A third-party strategy: the reward minus a fixed baseline of one half."""
from dataclasses import dataclass

import gin

from rlzoo.algorithms import Credit, Estimator


@gin.configurable("half_baseline")
@dataclass
class HalfBaseline(Estimator):
    group_size: int = 2  # samples per prompt
    baseline: float = 0.5  # V of every state

    def advantages(self, batch, ctx):
        scores = batch.token_rewards.sum(-1)  # [B]
        return Credit(advantages=(scores - self.baseline)[:, None] * batch.response_mask,
                      values=self.baseline * batch.response_mask)
'''


@pytest.mark.slow
def test_a_third_party_estimator_trains_in_a_bench_and_joins_the_leaderboard_and_the_audit(tmp_path):
    site = tmp_path / "site"  # what `pip install` of a one-module package leaves: the module and its entry point
    site.mkdir()
    (site / "half_baseline.py").write_text(ESTIMATOR_FILE)
    dist = site / "half_baseline-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: half-baseline\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlzoo.estimators]\nhalf = half_baseline:HalfBaseline\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    rlzoo = [sys.executable, "-m", "rlzoo.cli"]

    listed = subprocess.run([*rlzoo, "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "half" in listed.stdout, listed.stderr

    out = tmp_path / "bench"
    bench = subprocess.run([*rlzoo, "bench", "--algos", "half,grpo", "--task", "arith", "--seeds", "1",
                            "--config", str(REPO / "benchmarks" / "smoke.gin"), "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=900)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    records = [json.loads(line) for line in (out / "runs" / "half-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in records) == 4  # the smoke preset's 4 iterations
    results = json.loads((out / "leaderboard" / "results.json").read_text())
    assert set(results["strategies"]) == {"half", "grpo"}

    audit = subprocess.run([*rlzoo, "audit", "--algos", "half,grpo", "--problems", "2", "--truth-samples", "4",
                            "--alternatives", "2", "--config", str(REPO / "benchmarks" / "smoke.gin"),
                            "--out", str(out / "leaderboard" / "audit")], env=env, capture_output=True, text=True, timeout=600)
    assert audit.returncode == 0, audit.stderr[-2000:]
    result = json.loads((out / "leaderboard" / "audit" / "audit.json").read_text())
    half = result["strategies"]["half"]
    assert half["value_mae"]["n"] == result["responses"]["states"]
    assert result["per_state"]["half/value"] == [0.5] * result["responses"]["states"]
    assert half["ranking_accuracy"]["mean"] in (None, 0.5)  # one value for every state: it cannot rank alternatives
    assert "| half |" in (out / "leaderboard" / "audit" / "audit.md").read_text()

    # the bench's leaderboard page, re-made, carries the audit's section
    again = subprocess.run([*rlzoo, "leaderboard", str(out / "runs"), "--out", str(out / "leaderboard"), "--baseline", "grpo"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    readme = (out / "leaderboard" / "README.md").read_text()
    assert "Credit audit" in readme and "| half |" in readme


# ------------------------------------------------------------------------------------------- the flat loop


def test_stopwatch_counts_a_nested_span_once_in_the_innermost_stage():
    import time

    from rlzoo.rollout import Stopwatch

    watch = Stopwatch()
    t0 = time.perf_counter()
    with watch("advantages"):
        time.sleep(0.02)
        with watch("anything"):  # an estimator's own purpose, whatever it is called
            time.sleep(0.05)
    total = time.perf_counter() - t0
    assert watch.seconds["anything"] >= 0.05 and 0.02 <= watch.seconds["advantages"] < 0.05
    assert sum(watch.seconds.values()) == pytest.approx(total, abs=5e-3)


@pytest.mark.parametrize("algo", ["grpo", "vineppo"])
def test_one_iteration_runs_alone_from_a_built_trainer(algo, tiny_policy_path):
    """``train_iteration`` is a function of the Trainer: built without a run folder, two iterations run, each
    second of the iteration counted in one stage (the estimator's rollouts out of "advantages")."""
    import torch

    from conftest import TINY_ARITH
    from rlzoo.config import apply_gin
    from rlzoo.train import Trainer, TrainConfig, build_trainer, check_config, train_iteration

    apply_gin([], ["train.prompts_per_iteration = 2", f"{algo}.group_size = 2", "vineppo.k = 2", "ppo.epochs = 1",
                   "ppo.minibatches = 1"] + TINY_ARITH)
    cfg = TrainConfig(algo=algo, model=str(tiny_policy_path), device="cpu")
    ppo_cfg, task, estimator = check_config(cfg)
    trainer = build_trainer(cfg, ppo_cfg, task, estimator, None, torch.device("cpu"))
    assert isinstance(trainer, Trainer)
    first = train_iteration(trainer, 0)
    second = train_iteration(trainer, 1)
    for record in (first, second):
        assert record["episodes"] == 4 and 0 <= record["reward/mean"] <= 1
        stages = sum(v for k, v in record.items() if k.startswith("time/") and k != "time/iteration")
        assert stages <= record["time/iteration"] + 1e-3  # no second counted twice
    assert ("time/mc" in first) == (algo == "vineppo") and trainer.ctx.iteration == 1
    assert second["tokens/policy"] == first["tokens/policy"] + second["tokens_iter/policy"]
