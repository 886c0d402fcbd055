"""The training loop, top to bottom: sample prompts → rollouts → rewards → advantages → PPO epochs →
periodic evaluation → log and checkpoint. It never asks which strategy it runs: everything
strategy-specific sits behind the estimator's declared needs and its one method.

The run folder's format is documented in ``rlzoo.runs``; re-running the same command on the same
folder resumes from its last checkpoint, and on CPU the finished run's metrics equal an
uninterrupted run's (every random draw derives from (seed, iteration), and all state is saved).
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import gin
import torch

from rlzoo import distributed, runs
from rlzoo.algorithms import Estimator, build_estimator
from rlzoo.engine import ENGINES, SamplingParams
from rlzoo.errors import UserError, check_ranges
from rlzoo.ppo import PPOConfig, batched_logprobs, kl_k1, kl_k3, masked_mean, masked_whiten, positions_run, ppo_update
from rlzoo.rollout import EstimatorContext, build_batch
from rlzoo.tasks import Problem, Task, get_task


@gin.configurable("train")
@dataclass
class TrainConfig:
    algo: str = "grpo"  # credit-assignment strategy (a registered estimator name)
    task: str = "arith"  # a registered task name
    model: str = "default"  # HF hub id, local path, or "default" (the built-in arith policy)
    seed: int = 0  # every random draw of the run derives from it
    engine: str = "torch"  # sampling backend: "torch" or "vllm"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", ...
    iterations: int = 100  # budget: updates to run (also the horizon of the learning-rate schedule)
    max_episodes: int = 0  # budget: stop once this many responses were trained on (0: no limit)
    max_seconds: float = 0.0  # budget: stop once training (evaluation excluded) took this long (0: no limit)
    prompts_per_iteration: int = 32  # prompts sampled per iteration (each gets estimator.group_size responses)
    temperature: float = 0.6  # training sampler temperature (the paper: 0.6)
    top_p: float = 0.9  # training sampler nucleus (the paper: 0.9)
    max_new_tokens: int = 0  # response budget in tokens (0: the task's default); `rlzoo eval` reads it too
    lr: float = 1e-6  # policy AdamW learning rate (the paper: 1e-6)
    warmup_ratio: float = 0.03  # linear warm-up over this fraction of the planned optimizer steps
    lr_schedule: str = "constant"  # after warm-up: "constant", "linear" (to 0) or "cosine" (to 0)
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: tuple = (0.9, 0.999)  # AdamW betas
    eval_every: int = 10  # evaluate every this many iterations (and at the start and the end)
    eval_samples: int = 16  # samples per problem at evaluation (pass@1 is their mean; maj@k their vote)
    eval_temperature: float = 0.35  # evaluation sampler temperature (the paper: 0.35)
    eval_top_p: float = 0.9  # evaluation sampler nucleus
    eval_train_problems: int = 256  # size of the fixed train subset evaluated for train accuracy
    eval_test_problems: int = 0  # problems per eval split (0: all)
    eval_splits: tuple = ()  # task splits evaluated beside the train subset (empty: the task's own eval_splits)
    checkpoint_every: int = 10  # checkpoint every this many iterations (and at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    engine_batch_size: int = 256  # rows the engine decodes at once
    deepspeed_config: str = ""  # DeepSpeed JSON (ZeRO 1-3, offload) to train the policy and any critic with; "": PyTorch (DDP under a launcher)

    def __post_init__(self):
        check_ranges(self, {
            "iterations": ">= 1", "max_episodes": ">= 0", "max_seconds": ">= 0", "prompts_per_iteration": ">= 1",
            "temperature": "> 0", "top_p": "in (0, 1]", "max_new_tokens": ">= 0", "lr": ">= 0", "warmup_ratio": "in [0, 1]",
            "weight_decay": ">= 0", "eval_every": ">= 1", "eval_samples": ">= 1", "eval_temperature": ">= 0",
            "eval_top_p": "in (0, 1]", "eval_train_problems": ">= 0", "eval_test_problems": ">= 0",
            "checkpoint_every": ">= 1", "keep_checkpoints": ">= 1", "engine_batch_size": ">= 1"}, "train")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise UserError(f"train.lr_schedule = {self.lr_schedule!r}; expected 'constant', 'linear' or 'cosine'")


def derive_seed(seed: int, iteration: int, salt: int) -> int:
    """A distinct, reproducible seed for each (run seed, iteration, purpose)."""
    return (seed * 1_000_003 + iteration * 10_007 + salt) % (2**31 - 1)


def iteration_problems(problems: list[Problem], iteration: int, count: int, seed: int) -> list[Problem]:
    """The prompts of ``iteration``: consecutive slices of seeded permutations of the train split,
    one permutation per pass, so every strategy and a resumed run see the same prompts in the same order."""
    n = len(problems)
    orders: dict[int, torch.Tensor] = {}  # one permutation per pass touched by this iteration
    out = []
    for k in range(iteration * count, (iteration + 1) * count):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 17)))
        out.append(problems[int(orders[epoch][i])])
    return out


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = max(1, int(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())
        return 1.0

    return factor


def peak_memory_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss


# ----------------------------------------------------------------------------- compute


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters of ``module``, embeddings included, shared ones once (a ZeRO-3 partition counts whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def estimated_flops(params: int, tokens: int, backward: bool = False) -> int:
    """The one FLOPs estimate of rlzoo: 2·N per token position run forward through a model of N
    parameters (a multiply and an add per parameter), 6·N forward + backward (the backward costs twice
    the forward). Attention over the context and optimizer steps are left out (Kaplan et al. 2020).
    ``tokens`` are positions actually run, padding included: padding is compute spent too."""
    return (6 if backward else 2) * int(params) * int(tokens)


class TokenMeter:
    """Token positions run through ``module``, counted by a forward pre-hook, so every caller counts
    (the estimator itself, DDP, DeepSpeed) without the loop knowing who calls it: ``forward`` with
    autograd off, ``trained`` with it on (a training forward, whose backward follows)."""

    def __init__(self, module: torch.nn.Module):
        self.forward = self.trained = 0
        module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)  # [b, L] token ids
        if isinstance(ids, torch.Tensor):
            if torch.is_grad_enabled():
                self.trained += ids.numel()
            else:
                self.forward += ids.numel()

    def counts(self) -> list[int]:
        return [self.forward, self.trained]


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to save and stop at the end of the iteration; a second Ctrl-C stops
    now. A second SIGTERM does not: the parent-death signal a bench sets (``_stop_with_parent``) can fire once per
    thread of a killed bench as the orphan is handed from one to the next, and the orphan must still save."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        print("\nrlzoo: stopping after this iteration (checkpoint will be saved); Ctrl-C again to stop now", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- checkpoints


def batch_on(batch, device):
    """The tensors the PPO update reads, moved to ``device`` (a no-op on CPU)."""
    if device.type == "cpu":
        return batch
    return replace(batch, **{k: getattr(batch, k).to(device) for k in
                             ("input_ids", "attention_mask", "response_mask", "old_logprobs")},
                   ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs.to(device))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one "latest" names, else the newest complete one (a checkpoint folder
    is renamed into place whole, so one with its state.pt is complete): a lost or stale pointer costs no progress."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else ""
    if re.fullmatch(r"iter_\d+", name) and (root / name / "state.pt").is_file():
        return root / name
    complete = sorted(p for p in root.glob("iter_*") if (p / "state.pt").is_file())
    return complete[-1] if complete else None


def save_checkpoint(run_dir: Path, state: dict, trained: dict, tokenizer, estimator: Estimator, keep: int) -> None:
    """Write iter_NNNNNN/ beside the others (atomically: a temp folder renamed), then point "latest" at it.
    Every rank calls it: each trained module writes its weights and optimizer state (``Trained.save``)."""
    root = run_dir / "checkpoints"
    name = f"iter_{state['iteration']:06d}"
    tmp = root / f".{name}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    for module_name, module in trained.items():
        module.save(tmp, module_name)
    distributed.barrier()
    if distributed.is_main():
        tokenizer.save_pretrained(tmp / "policy")
        torch.save({**state, "estimator": estimator.state_dict(), "processes": distributed.world_size()}, tmp / "state.pt")
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        (root / "latest.tmp").write_text(name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def check_launch(cfg: TrainConfig, ppo_cfg: PPOConfig, group_size: int) -> dict | None:
    """Refuse a launch whose batches do not split evenly over the processes (every rank must run as
    many forward/backward passes) before any collective; returns the DeepSpeed config, if any."""
    world = distributed.world_size()
    rows = cfg.prompts_per_iteration * group_size
    if world > 1 and cfg.prompts_per_iteration % world:
        raise UserError(f"train.prompts_per_iteration = {cfg.prompts_per_iteration} does not split over {world} processes; "
                        f"use a multiple of {world}")
    if world > 1 and rows % (ppo_cfg.minibatches * world):
        raise UserError(f"the {rows} rows of an iteration do not split into ppo.minibatches = {ppo_cfg.minibatches} "
                        f"equal parts per process over {world} processes; pick a divisor of {rows // world}")
    return distributed.load_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config else None


def check_config(cfg: TrainConfig) -> tuple[PPOConfig, Task, Estimator]:
    """The run's PPO config, task and estimator, each checked as it is built (their ``__post_init__``), and the
    bindings that are only wrong together. Run before anything is written; ``rlzoo bench`` runs it for each
    strategy before its bench.json exists, so a bad binding never leaves a half-made run or bench."""
    from rlzoo.policy import check_model, check_model_for_task, pretrain_config

    ppo_cfg = PPOConfig()
    check_model(cfg.model)
    if cfg.model == "default":
        pretrain_config()  # the bindings the built-in policy would be built with
    task = get_task(cfg.task)
    check_model_for_task(cfg.model, cfg.task)
    unknown = [s for s in cfg.eval_splits if s not in task.splits or s == "train"]
    if unknown:
        raise UserError(f"train.eval_splits names {', '.join(map(repr, unknown))}; task {task.name!r} can evaluate "
                        f"{', '.join(s for s in task.splits if s != 'train')} (the train subset is always evaluated)")
    return ppo_cfg, task, build_estimator(cfg.algo)


def run_problems(cfg: TrainConfig, task: Task) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """The train split and the evaluation sets (a fixed, seeded subset of the train split; each eval split, cut
    to train.eval_test_problems). Reading them checks a dataset-backed task's files."""
    train_problems = task.problems("train")
    if not train_problems:
        raise UserError(f"task {task.name!r} has no train problems")
    subset_order = torch.randperm(len(train_problems), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 0, 23)))
    eval_sets = {"train": [train_problems[int(i)] for i in subset_order[: cfg.eval_train_problems]]}
    for split in cfg.eval_splits or task.eval_splits:
        problems = task.problems(split)
        eval_sets[split] = problems[: cfg.eval_test_problems] if cfg.eval_test_problems else problems
    return train_problems, eval_sets


def merge_eval(parts: list[dict]) -> dict:
    """One evaluation from the results of ranks that each evaluated a part of the problems:
    per-problem means weighted by problem counts (every problem has the same number of samples)."""
    if len(parts) == 1:
        return parts[0]
    n = sum(p["n_problems"] for p in parts)
    merged = {k: v for k, v in parts[0].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    for key, value in parts[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = sum(p[key] * p["n_problems"] for p in parts) / max(n, 1)
    merged |= {"n_problems": n, "seconds": max(p["seconds"] for p in parts)}
    for key in ("samples", "temperature", "top_p", "seed"):
        merged[key] = parts[0][key]
    return merged


# ----------------------------------------------------------------------------- the loop


def train(run_dir: str | Path, cfg: TrainConfig | None = None, command: str = "") -> Path:
    """Train one (strategy, task, seed) run into ``run_dir`` (resuming if it holds a checkpoint). Everything is
    checked before the folder is written, and then trained in only while this process owns it (``runs.owned``)."""
    cfg = cfg or TrainConfig()
    run_dir = Path(run_dir)
    runs.check_out_dir(run_dir, "run folder")
    ppo_cfg, task, estimator = check_config(cfg)
    train_problems, eval_sets = run_problems(cfg, task)
    deepspeed_config = check_launch(cfg, ppo_cfg, estimator.group_size)
    device = distributed.init(cfg.device)  # joins the launcher's process group (torchrun / deepspeed), if any
    if deepspeed_config is not None:
        distributed.check_deepspeed_device(deepspeed_config, device, cfg.deepspeed_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runs.owned(run_dir, distributed.is_main()):  # rank 0 writes the run folder, so it holds it
        return _train_owned(run_dir, cfg, ppo_cfg, task, estimator, train_problems, eval_sets, deepspeed_config, device, command)


def _train_owned(run_dir: Path, cfg: TrainConfig, ppo_cfg: PPOConfig, task: Task, estimator: Estimator,
                 train_problems: list[Problem], eval_sets: dict[str, list[Problem]], deepspeed_config: dict | None,
                 device: torch.device, command: str) -> Path:
    """``train``'s loop, in a run folder this process owns, with its config checked and its problems read."""
    from rlzoo.evaluate import evaluate
    from rlzoo.policy import load_policy

    main = distributed.is_main()  # rank 0 writes the run folder; every rank computes
    torch.manual_seed(cfg.seed)

    identity = {"algo": cfg.algo, "task": cfg.task, "model": cfg.model, "seed": cfg.seed, "config": asdict(cfg) | {"ppo": asdict(ppo_cfg)}}
    identity = json.loads(json.dumps(identity))  # as run.json holds it (tuples become lists), so a resume compares equal
    if len(set(distributed.gather_objects(json.dumps(identity, sort_keys=True)))) > 1:
        raise UserError("the processes of this launch were given different configs; launch every rank with the same command")
    previous = runs.read_run(run_dir)
    if previous and any(previous.get(k) != v for k, v in identity.items()):
        raise UserError(f"{run_dir} holds another run ({previous.get('algo')}, {previous.get('task')}, seed "
                        f"{previous.get('seed')}) or another config; pick a fresh --out or delete it")
    if previous.get("status") == "finished":
        main and print(f"rlzoo: {run_dir} is finished; nothing to do")
        return run_dir

    # Policy, frozen reference, engine. The reference is the *initial* policy, also on resume.
    policy, tokenizer = load_policy(cfg.model, device=device)
    policy_params = parameter_count(policy)  # N of the FLOPs estimate, for the policy, its reference and its sampler
    model_path = policy.config._name_or_path
    use_ref = ppo_cfg.kl_mode != "none" and ppo_cfg.kl_coef > 0
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if use_ref else None
    engine = ENGINES.get(cfg.engine)(policy, tokenizer, max_batch_size=cfg.engine_batch_size)

    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    norm_tokens = ppo_cfg.loss_norm_tokens or max_new_tokens
    sampling = SamplingParams(n=estimator.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=max_new_tokens, stop=task.stop)
    ctx = EstimatorContext(policy=policy, tokenizer=tokenizer, engine=engine, task=task, sampling=sampling,
                           model_path=model_path, device=device, seed=cfg.seed, deepspeed_config=deepspeed_config,
                           batch_rows=cfg.prompts_per_iteration * estimator.group_size)
    # The policy trains through DDP or DeepSpeed when launched so (ctx.prepare); the engine samples from `policy` itself.
    total_steps = cfg.iterations * ppo_cfg.epochs * ppo_cfg.minibatches
    trainer = ctx.prepare("policy", policy, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                          max_grad_norm=ppo_cfg.max_grad_norm, micro_batch_size=ppo_cfg.micro_batch_size,
                          lr_lambda=lr_lambda(cfg, total_steps))
    estimator.setup(ctx)
    # A critic the estimator owns is metered wherever it runs (its forward in `advantages`, its update in `critic`).
    critic_meter = TokenMeter(estimator.critic) if estimator.critic is not None else None
    critic_params = parameter_count(estimator.critic) if estimator.critic is not None else 0
    loss_agg = estimator.loss_agg or ppo_cfg.loss_agg
    ppo_cfg = replace(ppo_cfg, loss_agg=loss_agg)

    state = {"iteration": 0, "episodes": 0, "train_seconds": 0.0, "tokens": {}, "flops": 0}
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        saved = runs.load_torch_file(checkpoint / "state.pt")
        if deepspeed_config is not None and saved.get("processes", 1) != distributed.world_size():
            raise UserError(f"{checkpoint} was written by {saved.get('processes', 1)} process(es), each holding its part of "
                            f"DeepSpeed's optimizer state; resume it with {saved.get('processes', 1)}, not {distributed.world_size()}")
        for name, module in ctx.trained.items():  # weights, optimizer and schedule of the policy and any critic
            module.load(checkpoint, name)
        with ctx.sampling_weights():
            engine.sync_weights(policy)
        estimator.load_state_dict(saved["estimator"])
        state = {k: saved.get(k, state[k]) for k in state}  # a checkpoint from before FLOPs were counted has none
        ctx.tokens.update(state["tokens"])
        lost = []  # train records the checkpoint had logged that metrics.jsonl no longer holds (cut or edited since)
        if main:  # keep exactly what the checkpoint had seen: train records up to it, evals before it
            kept = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl")
                    if r.get("iteration", -1) < state["iteration"]
                    or (r.get("kind") == "train" and r.get("iteration") == state["iteration"])]
            lost = sorted(set(range(1, state["iteration"] + 1)) - {r.get("iteration") for r in kept if r.get("kind") == "train"})
        distributed.check(not lost, f"{run_dir / 'metrics.jsonl'} lacks the train records of iterations {lost[0]}..{lost[-1]} "
                          f"that {checkpoint} had logged; resuming would leave a hole in its curves: restore the file, "
                          f"or delete {run_dir} to start over" if lost else "")
        if main:  # replaced whole: a kill mid-write must not cut records the checkpoint had logged
            (run_dir / "metrics.jsonl.tmp").write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(run_dir / "metrics.jsonl.tmp", run_dir / "metrics.jsonl")
            print(f"rlzoo: resuming {run_dir} from iteration {state['iteration']}")
    elif main:
        (run_dir / "metrics.jsonl").write_text("")
    if main:
        (run_dir / "config.gin").write_text(gin.operative_config_str() or gin.config_str())
        runs.write_run(run_dir, identity | {"format": runs.FORMAT, "status": "running", "command": command,
                                             "budget": {"iterations": cfg.iterations, "episodes": cfg.max_episodes, "seconds": cfg.max_seconds},
                                             "rlzoo_version": __import__("rlzoo").__version__, "processes": distributed.world_size(),
                                             "started": previous.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    distributed.barrier()  # no rank reads the run folder while rank 0 rewrites it

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run_dir / "tb")) if main else None
    def log(record: dict) -> None:
        if not main:
            return
        record = {"kind": record.pop("kind"), "iteration": state["iteration"], "episodes": state["episodes"],
                  "time/train_total": state["train_seconds"], "flops/total": state["flops"]} | record
        runs.append_jsonl(run_dir / "metrics.jsonl", record)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "iteration":
                tb.add_scalar(key, value, state["iteration"])
        tb.flush()

    # One sampling seed for every evaluation of the run (and, with the same run seed, of every strategy):
    # with the same problems too, an unchanged policy scores the same, so a curve moves by learning alone.
    eval_seed = derive_seed(cfg.seed, 0, 29)

    def run_eval() -> None:
        t0 = time.perf_counter()
        record = {"kind": "eval"}
        for split, problems in eval_sets.items():
            mine = distributed.shard(len(problems))  # each rank evaluates its part of the problems
            with ctx.sampling_weights():
                result = evaluate(policy, tokenizer, engine, task, split, problems=problems[mine.start : mine.stop],
                                  samples=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                                  max_new_tokens=max_new_tokens, seed=eval_seed,
                                  first_index=mine.start)
            result = merge_eval(distributed.gather_objects({k: v for k, v in result.items() if k != "problems"}))
            record |= {f"eval/{split}/{k}": v for k, v in result.items()
                       if k.startswith(("pass@", "maj@")) or k in ("mean_response_tokens", "truncated", "n_problems")}
        record["time/eval"] = time.perf_counter() - t0
        log(record)

    def budget_left() -> bool:
        return (state["iteration"] < cfg.iterations
                and not (cfg.max_episodes and state["episodes"] >= cfg.max_episodes)
                and not (cfg.max_seconds and state["train_seconds"] >= cfg.max_seconds))

    def checkpoint_now() -> None:
        save_checkpoint(run_dir, state, ctx.trained, tokenizer, estimator, cfg.keep_checkpoints)

    def train_iteration(it: int) -> dict:
        """One iteration: rollouts, rewards, log-probs, credit, critic, PPO update. Returns its record."""
        t_start = time.perf_counter()
        watch, tokens_before, rollout_tokens_before = ctx.watch, dict(ctx.tokens), dict(ctx.forward_tokens)
        engine_tokens_before = engine.stats.forward_tokens  # this rank's
        watch.seconds.clear()
        ctx.iteration = it
        ctx.sampling = replace(sampling, seed=derive_seed(cfg.seed, it, 1))

        # 1. Rollouts: group_size responses to each of this iteration's prompts. Each rank samples its
        #    part of the prompts (a prompt's group stays on one rank), with the keys one process would use.
        problems = iteration_problems(train_problems, it, cfg.prompts_per_iteration, cfg.seed)
        prompt_ids = [tokenizer(task.prompt(p), add_special_tokens=True)["input_ids"] for p in problems]
        mine = distributed.shard(len(problems))
        with watch("generation"), ctx.sampling_weights():
            completions = engine.generate(prompt_ids[mine.start : mine.stop], replace(ctx.sampling, first_index=mine.start))  # [P_rank][G]
        generation_tokens = engine.stats.forward_tokens - engine_tokens_before  # this rank's prefill + decode

        # 2. Rewards (graded in worker processes for math-verify tasks); then every rank holds the whole batch.
        with watch("reward"):
            flat_problems = [p for p, group in zip(problems[mine.start : mine.stop], completions) for _ in group]
            scores = task.score(flat_problems, [c.text for group in completions for c in group])
            parts = distributed.gather_objects((completions, scores))
            completions, scores = [g for part, _ in parts for g in part], [s for _, part in parts for s in part]  # [P][G], [P * G]
            batch = build_batch(tokenizer, task, problems, prompt_ids, completions, scores)
        ctx.tokens["policy"] += sum(len(c.token_ids) for group in completions for c in group)

        # 3. Log-probs of the sampled tokens under the sampling policy and the reference (each rank its rows).
        with watch("logprobs"):
            ids, attn, mask = batch.input_ids.to(device), batch.attention_mask.to(device), batch.response_mask
            logprobs_of = lambda model: distributed.gather_rows(  # noqa: E731
                lambda rows: batched_logprobs(model, ids[rows.start : rows.stop], attn[rows.start : rows.stop],
                                              cfg.temperature, ppo_cfg.micro_batch_size), batch.size)
            batch.old_logprobs = logprobs_of(policy)
            kl_stats = {}
            if reference is not None:
                batch.ref_logprobs = logprobs_of(reference)
                kl_stats = {"kl/ref_k1": masked_mean(kl_k1(batch.old_logprobs, batch.ref_logprobs), mask).item(),
                            "kl/ref": masked_mean(kl_k3(batch.old_logprobs, batch.ref_logprobs), mask).item()}
                if ppo_cfg.kl_mode == "k1-reward":
                    batch.token_rewards = batch.token_rewards - ppo_cfg.kl_coef * kl_k1(batch.old_logprobs, batch.ref_logprobs) * mask

        # 4. Credit: the only strategy-specific step (its MC rollouts, if any, time themselves as "mc").
        t0 = time.perf_counter()
        critic_before = critic_meter.counts() if critic_meter else [0, 0]  # [forward, trained] token positions
        credit = estimator.advantages(batch, ctx)
        watch.seconds["advantages"] += time.perf_counter() - t0 - sum(watch.seconds[k] for k in ("mc", "baseline"))
        critic_mid = critic_meter.counts() if critic_meter else [0, 0]
        with watch("critic"):
            critic_stats = estimator.update_critic(batch, credit, ctx)
        critic_after = critic_meter.counts() if critic_meter else [0, 0]
        raw = credit.advantages
        advantages = masked_whiten(raw, mask) if ppo_cfg.whiten_advantages else raw  # [B, L]

        # 5. PPO epochs on the policy (each rank its rows of every minibatch); the engine then samples from the new weights.
        with watch("update"):
            update_stats = ppo_update(trainer, batch_on(batch, device), advantages.to(device), ppo_cfg, cfg.temperature,
                                      torch.Generator().manual_seed(derive_seed(cfg.seed, it, 3)), norm_tokens)
            if not all(torch.isfinite(p).all() for p in policy.parameters()):
                raise FloatingPointError("the PPO update made the policy's weights non-finite: lower train.lr or raise ppo.kl_coef")
            with ctx.sampling_weights():
                engine.sync_weights(policy)

        # 6. Estimated FLOPs by stage (``estimated_flops``) of the positions each pass ran (micro-batches cut to their
        #    longest row); generation, update and critic counts are per rank, hence the sum.
        batch_tokens = batch.size * batch.input_ids.shape[1]
        generation_tokens, update_tokens, *critic_tokens = map(int, distributed.all_reduce(
            [float(generation_tokens), float(update_stats.pop("ppo/positions"))]
            + [float(b - a) for a, b in zip(critic_before + critic_mid, critic_mid + critic_after)]))
        critic_flops = lambda forward, trained: (estimated_flops(critic_params, forward)  # noqa: E731
                                                  + estimated_flops(critic_params, trained, backward=True))
        stage_flops = {
            "generation": estimated_flops(policy_params, generation_tokens),
            "logprobs": estimated_flops(policy_params, positions_run(batch.attention_mask, ppo_cfg.micro_batch_size)
                                        * (2 if reference is not None else 1)),
            **{p: estimated_flops(policy_params, n - rollout_tokens_before.get(p, 0)) for p, n in ctx.forward_tokens.items()},
            "advantages": critic_flops(*critic_tokens[:2]),  # a critic's forward inside the estimator
            "critic": critic_flops(*critic_tokens[2:]),
            "update": estimated_flops(policy_params, update_tokens, backward=True),
        }

        lengths = batch.response_lens().float()
        return {
            "kind": "train", "episodes": batch.size,
            "reward/mean": batch.scores.mean().item(),
            "reward/std": batch.scores.std().item() if batch.size > 1 else 0.0,
            "response/length_mean": lengths.mean().item(),
            "response/truncated_frac": sum(r == "length" for r in batch.finish_reasons) / batch.size,
            "advantage/mean": masked_mean(raw, mask).item(),
            "advantage/std": masked_mean((raw - masked_mean(raw, mask)) ** 2, mask).sqrt().item(),
            "advantage/abs_max": (raw * mask).abs().max().item(),
            **{f"credit/{k}": v for k, v in credit.stats.items()}, **kl_stats, **critic_stats, **update_stats,
            **{f"time/{k}": v for k, v in watch.seconds.items()},
            **{f"tokens/{k}": ctx.tokens[k] for k in ctx.tokens},
            **{f"tokens_iter/{k}": ctx.tokens[k] - tokens_before.get(k, 0) for k in ctx.tokens},
            "batch/tokens": batch_tokens,
            "batch/real_tokens": int(batch.attention_mask.sum()),  # B x L less the padding: the least any pass can run
            **{f"flops/{k}": v for k, v in stage_flops.items() if v},
            "time/iteration": distributed.all_reduce(time.perf_counter() - t_start, "max"),  # the slowest rank's: budgets agree
            "memory/peak_rss_mb": peak_memory_mb(),
        }

    try:
        with Interrupt() as interrupt:
            while True:
                it = state["iteration"]
                if it % cfg.eval_every == 0 or not budget_left():
                    run_eval()
                stop = distributed.all_reduce(float(interrupt.requested), "max") > 0  # a signal to any rank stops all
                if not budget_left() or stop:
                    break
                record = train_iteration(it)
                state["iteration"] += 1
                state["episodes"] += record.pop("episodes")
                state["train_seconds"] += record["time/iteration"]
                state["tokens"] = dict(ctx.tokens)
                state["flops"] += sum(v for k, v in record.items() if k.startswith("flops/"))
                log(record)
                if state["iteration"] % cfg.checkpoint_every == 0:
                    checkpoint_now()
            checkpoint_now()
            finished = not budget_left()
    except FloatingPointError as e:
        if main:
            runs.write_run(run_dir, runs.read_run(run_dir) | {"status": "failed", "error": str(e)})
        kept = latest_checkpoint(run_dir)
        where = f"the last good checkpoint, {kept}, is intact" if kept else "no checkpoint had been saved yet"
        raise UserError(f"{e} (stopped at iteration {state['iteration']}; {where})") from None
    finally:
        tb and tb.close()
    if main:
        runs.write_run(run_dir, runs.read_run(run_dir) | {"status": "finished" if finished else "running"})
    distributed.barrier()  # the CLI reads run.json on every rank
    return run_dir
