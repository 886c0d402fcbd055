"""Peer race: one GRPO iteration of rlzoo against TRL's GRPOTrainer, side by side on CPU.

    pip install -e '.[peer]'                          # TRL (+ accelerate); only this script needs it
    python benchmarks/peer_race_trl.py                # quick.gin's shape, 5 repetitions, 1 torch thread
    python benchmarks/peer_race_trl.py --repeats 3 --threads 2 --set train.prompts_per_iteration=32

Both sides get the same thing to do, read from one gin config (default ``benchmarks/quick.gin``):
- the same model: the built-in policy at the ``tiny`` preset (``rlzoo.policy.pretrain``, built if missing),
  loaded by ``rlzoo.policy.load_policy``, fp32, no gradient checkpointing (TRL's defaults are bf16 autocast
  and checkpointing: both turned off, so the two do the same arithmetic);
- the same prompts: rlzoo's iteration-0 arith train prompts (``iteration_problems``), scored by arith's own
  scorer (TRL's reward function calls ``task.score``);
- the same group size (``num_generations``), response budget (``max_completion_length``), temperature,
  top-p, clip ε, KL β (k3 estimator to a frozen reference in both), learning rate, grad clipping;
- the same optimizer steps: rlzoo runs ``ppo.epochs`` × ``ppo.minibatches`` steps on one rollout batch; TRL
  gets ``num_iterations = epochs``, ``per_device_train_batch_size`` = the micro-batch, ``gradient_accumulation_steps``
  = micro-batches per minibatch, ``steps_per_generation`` = micro-batches per rollout batch, ``max_steps`` =
  epochs × minibatches, so it generates once and steps as often. rlzoo's ``ppo.micro_batch_size`` is bound to
  the same micro-batch (its old/ref log-probs then run in the same chunks as TRL's).

rlzoo's iteration is driven through ``rlzoo.train.train`` (one fresh run folder per repetition, budget
``iterations=1``; tiny evaluation sets, since evaluation is outside the iteration's clock) and timed by what
the run logs: ``time/iteration`` and its per-stage ``time/*`` in metrics.jsonl. TRL's iteration is one
``GRPOTrainer.train()`` with a fresh trainer per repetition, timed from the first optimizer step's
``on_step_begin`` (before it generates) to the last ``on_step_end``; its stages by timing three of its methods
on the instance: ``_generate`` (tokenize, ``model.generate``, decode), ``_calculate_rewards``, and
``_generate_and_score_completions`` (the rest of it is padding, old and reference log-probs, advantages).
Setup (loading the model and the reference, building the trainer or the run folder) is outside both clocks.

A first round of each is a warm-up and is not counted; then ``--repeats`` rounds, alternating which goes
first. Reported: medians (and the range) of the repetitions, and TRL / rlzoo time ratios.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub: the model is built locally
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generation", "reward", "logprobs + advantages", "update", "other")  # rows of the breakdown table
RLZOO_TO_TRL_LOSS = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


def race_setup(config: str, bindings: list[str], seed: int, preset: str) -> dict:
    """Apply the gin config, build the built-in policy at ``preset``, and derive the one shape both sides run."""
    import gin

    from rlzoo.algorithms import build_estimator
    from rlzoo.config import apply_gin
    from rlzoo.errors import UserError
    from rlzoo.policy import describe_policy, pretrain, pretrain_config
    from rlzoo.ppo import PPOConfig
    from rlzoo.tasks import get_task
    from rlzoo.train import TrainConfig, iteration_problems

    apply_gin([config] if config else [], bindings)
    policy_path = pretrain(pretrain_config(preset), progress=False)
    fixed = {"algo": "grpo", "task": "arith", "model": str(policy_path), "seed": seed, "engine": "torch", "device": "cpu",
             "iterations": 1, "max_episodes": 0, "max_seconds": 0.0, "checkpoint_every": 1000,
             # evaluation runs outside the iteration's clock; one problem and one sample keep the calls short
             "eval_samples": 1, "eval_train_problems": 1, "eval_test_problems": 1}
    for name, value in fixed.items():  # the race's fixed bindings win over the config's and the user's
        gin.bind_parameter(f"train.{name}", value)

    cfg, ppo, task = TrainConfig(), PPOConfig(), get_task("arith")
    estimator = build_estimator("grpo")
    group, loss_agg = estimator.group_size, estimator.loss_agg or ppo.loss_agg  # as train() resolves them
    rows = cfg.prompts_per_iteration * group  # responses per iteration
    if rows % ppo.minibatches:
        raise UserError(f"{rows} rows do not split into ppo.minibatches = {ppo.minibatches} equal minibatches (TRL needs equal ones)")
    minibatch = rows // ppo.minibatches
    micro = min(ppo.micro_batch_size, minibatch)
    if minibatch % micro:
        raise UserError(f"a minibatch of {minibatch} rows does not split into micro-batches of {micro}; pick a divisor")
    if ppo.kl_mode == "k1-reward":
        raise UserError("TRL has no k1-in-the-reward KL; race with ppo.kl_mode = 'k3-loss' or 'none'")
    gin.bind_parameter("ppo.micro_batch_size", micro)  # rlzoo's log-prob chunks = TRL's per-device batch

    problems = iteration_problems(task.problems("train"), 0, cfg.prompts_per_iteration, cfg.seed)
    return {
        "cfg": cfg, "ppo": ppo, "task": task, "group": group, "rows": rows, "minibatch": minibatch, "micro": micro,
        "max_new_tokens": cfg.max_new_tokens or task.max_new_tokens, "problems": problems,
        "policy_path": policy_path, "params": describe_policy(policy_path)["params"],
        "optimizer_steps": ppo.epochs * ppo.minibatches, "loss_agg": loss_agg, "preset": preset,
    }


# ----------------------------------------------------------------------------- rlzoo


def run_rlzoo(setup: dict, run_dir: Path) -> dict:
    """One ``rlzoo.train.train`` call with budget iterations=1; the iteration's times from its metrics.jsonl."""
    from rlzoo.train import TrainConfig, train

    started = time.perf_counter()
    train(run_dir, TrainConfig(), command="benchmarks/peer_race_trl.py")
    call_seconds = time.perf_counter() - started
    record = next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
    times = {k.removeprefix("time/"): v for k, v in record.items() if k.startswith("time/")}
    stages = {
        "generation": times.get("generation", 0.0),
        "reward": times.get("reward", 0.0),
        "logprobs + advantages": sum(times.get(k, 0.0) for k in ("logprobs", "advantages", "baseline", "mc", "critic")),
        "update": times.get("update", 0.0),
    }
    stages["other"] = times["iteration"] - sum(stages.values())
    return {"iteration": times["iteration"], "stages": stages, "call": call_seconds,
            "tokens": record["tokens_iter/policy"], "length": record["response/length_mean"],
            "reward": record["reward/mean"], "steps": setup["optimizer_steps"] - int(record.get("ppo/skipped", 0)),
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- TRL


def run_trl(setup: dict, out_dir: Path) -> dict:
    """One fresh ``GRPOTrainer`` trained for one generation's worth of optimizer steps, timed by a callback."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlzoo.policy import load_policy

    cfg, ppo, task, problems = setup["cfg"], setup["ppo"], setup["task"], setup["problems"]
    model, tokenizer = load_policy(str(setup["policy_path"]))
    dataset = Dataset.from_dict({"prompt": [task.prompt(p) for p in problems], "index": list(range(len(problems)))})

    def arith_reward(prompts, completions, index, **_) -> list[float]:
        return task.score([problems[i] for i in index], completions)

    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, gradient_checkpointing=False, seed=cfg.seed,
        num_generations=setup["group"], max_completion_length=setup["max_new_tokens"],
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        per_device_train_batch_size=setup["micro"],
        gradient_accumulation_steps=setup["minibatch"] // setup["micro"],  # one optimizer step per rlzoo minibatch
        steps_per_generation=setup["rows"] // setup["micro"],  # one generation covers all the prompts
        num_iterations=ppo.epochs, max_steps=setup["optimizer_steps"],
        beta=ppo.kl_coef if ppo.kl_mode == "k3-loss" else 0.0, epsilon=ppo.clip_eps, scale_rewards="group",
        loss_type=RLZOO_TO_TRL_LOSS[setup["loss_agg"]], learning_rate=cfg.lr, lr_scheduler_type="constant",
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1],
        max_grad_norm=ppo.max_grad_norm, optim="adamw_torch",  # the same torch.optim.AdamW rlzoo steps with
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )

    clock = {"begin": None, "end": None, "steps": 0}

    class IterationClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if clock["begin"] is None:
                clock["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            clock["end"], clock["steps"] = time.perf_counter(), clock["steps"] + 1

    trainer = GRPOTrainer(model=model, reward_funcs=arith_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[IterationClock()])
    trainer.remove_callback(PrinterCallback)  # it prints the trainer's metrics dict; the race prints its own

    spent = {"_generate": 0.0, "_calculate_rewards": 0.0, "_generate_and_score_completions": 0.0}
    seen = {"generations": 0, "tokens": 0, "rows": 0, "rewards": []}

    def timed(name):
        method = getattr(trainer, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = method(*a, **kw)
            spent[name] += time.perf_counter() - t0
            if name == "_generate":
                completion_ids = out[1]
                seen["generations"] += 1
                seen["rows"] += len(completion_ids)
                seen["tokens"] += sum(len(ids) for ids in completion_ids)
            if name == "_calculate_rewards":
                seen["rewards"].append(out)
            return out

        setattr(trainer, name, wrapper)

    for name in spent:
        timed(name)

    started = time.perf_counter()
    trainer.train()
    call_seconds = time.perf_counter() - started
    if seen["generations"] != 1 or clock["steps"] != setup["optimizer_steps"] or seen["rows"] != setup["rows"]:
        raise RuntimeError(f"TRL did {seen['generations']} generations of {seen['rows']} rows and {clock['steps']} optimizer steps; "
                           f"the race expects 1 of {setup['rows']} and {setup['optimizer_steps']}")
    iteration = clock["end"] - clock["begin"]
    rollout = spent["_generate_and_score_completions"]
    stages = {
        "generation": spent["_generate"],
        "reward": spent["_calculate_rewards"],
        "logprobs + advantages": rollout - spent["_generate"] - spent["_calculate_rewards"],
        "update": iteration - rollout,
        "other": 0.0,  # the trainer's bookkeeping between steps is inside "update"
    }
    rewards = torch.cat(seen["rewards"])
    return {"iteration": iteration, "stages": stages, "call": call_seconds, "tokens": seen["tokens"],
            "length": seen["tokens"] / seen["rows"], "reward": rewards.mean().item(), "steps": clock["steps"],
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- report


def median(results: list[dict], key) -> float:
    return statistics.median(key(r) for r in results)


def report(setup: dict, results: dict[str, list[dict]], threads: int, load: tuple[float, float], console: Console) -> None:
    import transformers
    import trl

    rl, tr = results["rlzoo"], results["trl"]
    cfg, ppo = setup["cfg"], setup["ppo"]
    console.print(
        f"model: built-in policy, {setup['preset']} preset ({setup['params']:,} params, fp32)  |  batch: {cfg.prompts_per_iteration} "
        f"prompts × {setup['group']} = {setup['rows']} responses  |  max new tokens {setup['max_new_tokens']}, T = "
        f"{cfg.temperature}, top-p {cfg.top_p}  |  {ppo.epochs} epochs × {ppo.minibatches} minibatches of "
        f"{setup['minibatch']} rows = {setup['optimizer_steps']} optimizer steps, micro-batch {setup['micro']}  |  KL β "
        f"{ppo.kl_coef} ({ppo.kl_mode})  |  torch threads {threads}  |  torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}  |  load average {load[0]:.1f} before, {load[1]:.1f} after"
        + ("  (machine loaded: > 2)" if max(load) > 2 else ""))

    race = Table(title=f"One GRPO iteration, median of {len(rl)} (range)")
    for column in ("framework", "iteration s", "vs rlzoo", "tokens generated", "mean response", "reward mean",
                   "optimizer steps", "whole call s"):
        race.add_column(column, justify="left" if column == "framework" else "right")
    base = median(rl, lambda r: r["iteration"])
    for name, runs in (("rlzoo", rl), ("TRL GRPOTrainer", tr)):
        its = [r["iteration"] for r in runs]
        race.add_row(name, f"{statistics.median(its):.2f} ({min(its):.2f}-{max(its):.2f})",
                     f"{statistics.median(its) / base:.2f}x", f"{median(runs, lambda r: r['tokens']):,.0f}",
                     f"{median(runs, lambda r: r['length']):.1f}", f"{median(runs, lambda r: r['reward']):.2f}",
                     f"{runs[0]['steps']}", f"{median(runs, lambda r: r['call']):.2f}")
    console.print(race)

    stages = Table(title="Where the time goes (seconds, medians per stage)")
    for column in ("stage", "rlzoo", "TRL", "TRL / rlzoo"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for stage in STAGES + ("iteration",):
        a = median(rl, lambda r: r["iteration"] if stage == "iteration" else r["stages"][stage])
        b = median(tr, lambda r: r["iteration"] if stage == "iteration" else r["stages"][stage])
        stages.add_row(stage, f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x" if min(a, b) > 5e-3 else "-")
    console.print(stages)
    console.print("whole call: rlzoo's train() (policy + reference loading, two one-problem evaluations, checkpoint) or "
                  "TRL's train() (without building the trainer). rlzoo's reward stage includes building the batch "
                  "tensors; TRL pads inside its log-prob stage. TRL's update includes the trainer's per-step bookkeeping.")
    console.print(f"TRL / rlzoo time for one iteration: [bold]{statistics.median(r['iteration'] for r in tr) / base:.2f}x[/bold] "
                  "(> 1: rlzoo is faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "benchmarks" / "quick.gin"), help="gin config giving the shape ('' for rlzoo's defaults)")
    parser.add_argument("--set", dest="bindings", action="append", default=[], help="extra gin binding, e.g. train.prompts_per_iteration=32")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (1 on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny", help="built-in policy preset: tiny (108k params) or default (0.86M)")
    parser.add_argument("--work", default="", help="folder for the run folders and TRL's output (default: a temp dir, deleted)")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames of TRL's config fields
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    setup = race_setup(args.config, args.bindings, args.seed, args.preset)
    work = Path(args.work or tempfile.mkdtemp(prefix="peer-race-"))
    load_before = os.getloadavg()[0]
    results = {"rlzoo": [], "trl": []}
    try:
        for round_ in range(args.repeats + 1):  # round 0: warm-up, not counted
            order = ("rlzoo", "trl") if round_ % 2 == 0 else ("trl", "rlzoo")
            for name in order:
                run = run_rlzoo if name == "rlzoo" else run_trl
                result = run(setup, work / f"{name}-{round_}")
                if result["threads"] != args.threads:
                    raise RuntimeError(f"{name} changed torch's thread count to {result['threads']}")
                console.print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: {name:5s} iteration {result['iteration']:.2f} s  "
                              + "  ".join(f"{k} {v:.2f}" for k, v in result["stages"].items()))
                if round_:
                    results[name].append(result)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report(setup, results, args.threads, (load_before, os.getloadavg()[0]), console)


if __name__ == "__main__":
    main()
