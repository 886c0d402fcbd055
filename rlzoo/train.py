"""The training loop, top to bottom: sample prompts → rollouts → rewards → advantages → PPO epochs →
periodic evaluation → log and checkpoint. It never asks which strategy it runs: everything
strategy-specific sits behind the estimator's declared needs and its one method.

Read it in order: ``train`` checks everything and takes the run folder; ``_train_owned`` is setup, then the loop;
``train_iteration(trainer, it)`` is one iteration, a function of the ``Trainer`` that ``build_trainer`` makes (so it
runs alone, e.g. in a test); ``resume`` and ``write_run_start`` are the run-folder bookkeeping. Under data
parallelism the ranks meet only at the places marked "ranks meet" (``estimator.sample``, ``logprobs_of``, ...).

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import gin
import torch

from rlzoo import distributed, runs
from rlzoo.algorithms import Estimator, build_estimator
from rlzoo.engine import ENGINES, SamplingParams, context_length
from rlzoo.errors import UserError, check_ranges
from rlzoo.ppo import PPOConfig, batched_logprobs, kl_k1, kl_k3, masked_mean, masked_whiten, plan_rows, ppo_update
from rlzoo.rollout import EstimatorContext, RolloutBatch
from rlzoo.seeds import Salt, derive_seed
from rlzoo.tasks import PROMPT_TOKENIZATIONS, Problem, Task, fit_to_context, get_task, tokenization_mismatch


@gin.configurable("train")
@dataclass
class TrainConfig:
    algo: str = ""  # credit-assignment strategy: a registered estimator name (`rlzoo list`); `rlzoo train --algo` sets it
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
    min_response_tokens: int = 0  # keep problems whose prompt leaves this much context for the response (their budget shrinks to fit); 0: the whole max_new_tokens
    prompt_tokenization: str = "alone"  # prompt tokens: "alone" (the prompt text by itself) or "joint" (with the SFT target's fixed lead, e.g. "\n"); `rlzoo eval` reads it too
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
    old_logprobs: str = "sampler"  # the sampling policy's log-probs of the rollouts: "sampler" (the torch engine's, taken as it samples: the same module and weights, float rounding apart) or "recompute" (one more forward over the batch, as verl does; engines that return none, vLLM, always recompute)
    deepspeed_config: str = ""  # DeepSpeed JSON (ZeRO 1-3, offload) to train the policy and any critic with; "": PyTorch (DDP under a launcher)

    def __post_init__(self):
        check_ranges(self, {
            "iterations": ">= 1", "max_episodes": ">= 0", "max_seconds": ">= 0", "prompts_per_iteration": ">= 1",
            "temperature": "> 0", "top_p": "in (0, 1]", "max_new_tokens": ">= 0", "min_response_tokens": ">= 0", "lr": ">= 0", "warmup_ratio": "in [0, 1]",
            "weight_decay": ">= 0", "eval_every": ">= 1", "eval_samples": ">= 1", "eval_temperature": ">= 0",
            "eval_top_p": "in (0, 1]", "eval_train_problems": ">= 0", "eval_test_problems": ">= 0",
            "checkpoint_every": ">= 1", "keep_checkpoints": ">= 1", "engine_batch_size": ">= 1"}, "train")
        if self.prompt_tokenization not in PROMPT_TOKENIZATIONS:
            raise UserError(f"train.prompt_tokenization = {self.prompt_tokenization!r}; expected 'alone' or 'joint'")
        if self.old_logprobs not in ("sampler", "recompute"):
            raise UserError(f"train.old_logprobs = {self.old_logprobs!r}; expected 'sampler' or 'recompute'")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise UserError(f"train.lr_schedule = {self.lr_schedule!r}; expected 'constant', 'linear' or 'cosine'")


def iteration_problems(problems: list[Problem], iteration: int, count: int, seed: int) -> list[Problem]:
    """The prompts of ``iteration``: consecutive slices of seeded permutations of the train split,
    one permutation per pass, so every strategy and a resumed run see the same prompts in the same order."""
    n = len(problems)
    orders: dict[int, torch.Tensor] = {}  # one permutation per pass touched by this iteration
    out = []
    for k in range(iteration * count, (iteration + 1) * count):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch, Salt.PROMPT_ORDER)))
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
            # Once asked to stop, a repeated SIGTERM that lands after the loop (while run.json is written, or as the
            # CLI exits) must not kill the stopping process either: it stays ignored for the rest of the process.
            signal.signal(s, signal.SIG_IGN if s == signal.SIGTERM and self.requested else h)


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

    if not cfg.algo:
        raise UserError("no strategy to train: pass --algo NAME (or bind train.algo); `rlzoo list` names them")
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


def run_problems(cfg: TrainConfig, task: Task, fit=None) -> tuple[list[Problem], dict[str, list[Problem]], dict[str, list[str]]]:
    """The train split and the evaluation sets (a fixed, seeded subset of the train split; each eval split, cut
    to train.eval_test_problems), and the ids of the problems ``fit`` dropped from each split (``fit``: problems ->
    (kept, dropped ids), ``rlzoo.tasks.fit_to_context`` for the run's model; None keeps all). Reading them checks
    a dataset-backed task's files."""
    fit = fit or (lambda problems: (list(problems), []))
    train_problems, dropped_train = fit(task.problems("train"))
    if not train_problems:
        raise UserError(f"task {task.name!r} has no train problems" + (
            f" whose prompt fits the model's context with room for the response ({len(dropped_train)} dropped); "
            "lower train.max_new_tokens or set train.min_response_tokens" if dropped_train else ""))
    dropped = {"train": dropped_train}
    subset_order = torch.randperm(len(train_problems), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 0, Salt.EVAL_SUBSET)))
    eval_sets = {"train": [train_problems[int(i)] for i in subset_order[: cfg.eval_train_problems]]}
    for split in cfg.eval_splits or task.eval_splits:
        problems, dropped[split] = fit(task.problems(split))
        eval_sets[split] = problems[: cfg.eval_test_problems] if cfg.eval_test_problems else problems
    return train_problems, eval_sets, dropped


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
    run_problems(cfg, task)  # reads (checks) the task's data before anything is built; fitted to the model later
    deepspeed_config = check_launch(cfg, ppo_cfg, estimator.group_size)
    device = distributed.init(cfg.device)  # joins the launcher's process group (torchrun / deepspeed), if any
    if deepspeed_config is not None:
        distributed.check_deepspeed_device(deepspeed_config, device, cfg.deepspeed_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runs.owned(run_dir, distributed.is_main()):  # rank 0 writes the run folder, so it holds it
        return _train_owned(run_dir, cfg, ppo_cfg, task, estimator, deepspeed_config, device, command)


@dataclass
class Trainer:
    """What the loop builds once and every iteration reads: the run's settings, models, engine and estimator."""

    cfg: TrainConfig
    ppo_cfg: PPOConfig  # with the estimator's loss aggregation, if it has one
    task: Task
    estimator: Estimator
    train_problems: list[Problem]  # the train split, fitted to the model's context
    eval_sets: dict[str, list[Problem]]  # the train subset and each eval split, fitted likewise
    task_fit: dict  # what run.json records of the fitting: problems dropped per split, prompt tokenization mismatch
    start_digest: str  # ``policy.weights_digest`` of the policy as loaded, before any update (rank 0; "" elsewhere)
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # the frozen initial policy (None without a KL term)
    tokenizer: Any
    engine: Any
    ctx: EstimatorContext
    sampling: SamplingParams  # the training sampler (its seed is set per iteration)
    device: torch.device
    norm_tokens: int  # the loss normaliser of ppo_update
    policy_params: int  # N of the FLOPs estimate, for the policy, its reference and its sampler
    # Each model the estimator owns (its critic, a frozen reference of its own: ``owned_models``): its N and a meter of
    # the token positions run through it, wherever it runs (its forward in `advantages`, its update in `critic`)
    owned: list[tuple[int, "TokenMeter"]]


@dataclass
class Progress:
    """What the run has done so far; a checkpoint keeps it, a resume restores it."""

    iteration: int = 0
    episodes: int = 0
    train_seconds: float = 0.0
    tokens: dict = field(default_factory=dict)  # tokens generated by purpose, cumulative
    flops: int = 0


def _train_owned(run_dir: Path, cfg: TrainConfig, ppo_cfg: PPOConfig, task: Task, estimator: Estimator,
                 deepspeed_config: dict | None, device: torch.device, command: str) -> Path:
    """``train``'s loop, in a run folder this process owns, with its config checked: setup, then the loop."""
    main = distributed.is_main()  # rank 0 writes the run folder; every rank computes
    torch.manual_seed(cfg.seed)
    identity, previous = check_identity(run_dir, cfg, ppo_cfg)
    if previous.get("status") == "finished":
        if main:
            print(f"rlzoo: {run_dir} is finished; nothing to do")
        return run_dir
    trainer = build_trainer(cfg, ppo_cfg, task, estimator, deepspeed_config, device)
    eval_sets = trainer.eval_sets
    recorded = previous.get("model_sha256")
    moved = main and bool(recorded) and recorded != trainer.start_digest
    # ranks meet: a resume reloads the base model as its frozen KL reference, so it must be the run's starting point
    distributed.check(not moved, f"{run_dir} started from other weights than model {cfg.model!r} loads now (model_sha256 "
                      f"{recorded[:12]}..., now {trainer.start_digest[:12]}...; the built-in policy differs by CPU kind): "
                      "resume it where those weights are, or pick a fresh --out" if moved else "")
    progress = resume(run_dir, trainer, deepspeed_config)
    if main:
        # The digest of the weights the run started from, as first recorded (a resume reloads the base model only for
        # its frozen reference; the policy comes from the checkpoint).
        start = {"model_sha256": previous.get("model_sha256") or trainer.start_digest}
        write_run_start(run_dir, identity | trainer.task_fit | start, cfg, command, previous)
    distributed.barrier()  # no rank reads the run folder while rank 0 rewrites it
    log = MetricsLog(run_dir, progress) if main else None
    # One sampling seed for every evaluation of the run (and, with the same run seed, of every strategy):
    # with the same problems too, an unchanged policy scores the same, so a curve moves by learning alone.
    eval_seed = derive_seed(cfg.seed, 0, Salt.EVAL)

    def checkpoint_now() -> None:
        save_checkpoint(run_dir, asdict(progress), trainer.ctx.trained, trainer.tokenizer, estimator, cfg.keep_checkpoints)

    try:
        with Interrupt() as interrupt:
            while True:
                if progress.iteration % cfg.eval_every == 0 or not budget_left(cfg, progress):
                    record = run_eval(trainer, eval_sets, eval_seed)
                    if log:
                        log(record)
                # ranks meet: a signal to any rank stops all
                stop = distributed.all_reduce(float(interrupt.requested), "max") > 0
                if not budget_left(cfg, progress) or stop:
                    break
                record = train_iteration(trainer, progress.iteration)
                progress.iteration += 1
                progress.episodes += record.pop("episodes")
                progress.train_seconds += record["time/iteration"]
                progress.tokens = dict(trainer.ctx.tokens)
                progress.flops += sum(v for k, v in record.items() if k.startswith("flops/"))
                if log:
                    log(record)
                if progress.iteration % cfg.checkpoint_every == 0:
                    checkpoint_now()
            checkpoint_now()
            finished = not budget_left(cfg, progress)
    except FloatingPointError as e:
        if main:
            runs.write_run(run_dir, runs.read_run(run_dir) | {"status": "failed", "error": str(e)})
        kept = latest_checkpoint(run_dir)
        where = f"the last good checkpoint, {kept}, is intact" if kept else "no checkpoint had been saved yet"
        raise UserError(f"{e} (stopped at iteration {progress.iteration}; {where})") from None
    finally:
        if log:
            log.close()
    if main:
        runs.write_run(run_dir, runs.read_run(run_dir) | {"status": "finished" if finished else "running"})
    distributed.barrier()  # the CLI reads run.json on every rank
    return run_dir


# ----------------------------------------------------------------------------- setup and bookkeeping


def check_identity(run_dir: Path, cfg: TrainConfig, ppo_cfg: PPOConfig) -> tuple[dict, dict]:
    """(identity, run.json as found): what run.json says of this run, checked equal on every rank and against a
    run already in the folder (a resume must be the same run)."""
    identity = {"algo": cfg.algo, "task": cfg.task, "model": cfg.model, "seed": cfg.seed, "config": asdict(cfg) | {"ppo": asdict(ppo_cfg)}}
    identity = json.loads(json.dumps(identity))  # as run.json holds it (tuples become lists), so a resume compares equal
    # ranks meet: every rank must run the same config
    if len(set(distributed.gather_objects(json.dumps(identity, sort_keys=True)))) > 1:
        raise UserError("the processes of this launch were given different configs; launch every rank with the same command")
    previous = runs.read_run(run_dir)
    if previous and any(previous.get(k) != v for k, v in identity.items()):
        raise UserError(f"{run_dir} holds another run ({previous.get('algo')}, {previous.get('task')}, seed "
                        f"{previous.get('seed')}) or another config; pick a fresh --out or delete it")
    return identity, previous


def build_trainer(cfg: TrainConfig, ppo_cfg: PPOConfig, task: Task, estimator: Estimator,
                  deepspeed_config: dict | None, device: torch.device) -> Trainer:
    """The policy, its frozen reference (the *initial* policy, also on resume), the engine, the task's problems
    fitted to the model, the estimator's context, the policy made trainable (one process, DDP or DeepSpeed, as
    launched) and the estimator set up."""
    from rlzoo.policy import load_policy, weights_digest

    policy, tokenizer = load_policy(cfg.model, device=device)
    start_digest = weights_digest(policy) if distributed.is_main() else ""  # run.json's model_sha256 (rank 0 writes it)
    policy_params = parameter_count(policy)
    use_ref = ppo_cfg.kl_mode != "none" and ppo_cfg.kl_coef > 0
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if use_ref else None
    engine = ENGINES.get(cfg.engine)(policy, tokenizer, max_batch_size=cfg.engine_batch_size)

    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    context, task_fit = context_length(policy), {}
    train_problems, eval_sets, task_fit["dropped_problems"] = fit_task(cfg, task, tokenizer, context, max_new_tokens)
    task_fit["prompt_tokenization_mismatch"] = check_prompt_tokenization(cfg, task, tokenizer, train_problems)
    sampling = SamplingParams(n=estimator.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=max_new_tokens, stop=task.stop, logprobs=cfg.old_logprobs == "sampler")
    ctx = EstimatorContext(policy=policy, tokenizer=tokenizer, engine=engine, task=task, sampling=sampling,
                           model_path=policy.config._name_or_path, device=device, seed=cfg.seed,
                           prompt_tokenization=cfg.prompt_tokenization, share_prompts=ppo_cfg.share_prompts,
                           deepspeed_config=deepspeed_config, batch_rows=cfg.prompts_per_iteration * estimator.group_size)
    # The policy trains through DDP or DeepSpeed when launched so (ctx.prepare); the engine samples from `policy` itself.
    total_steps = cfg.iterations * ppo_cfg.epochs * ppo_cfg.minibatches
    ctx.prepare("policy", policy, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                max_grad_norm=ppo_cfg.max_grad_norm, micro_batch_size=ppo_cfg.micro_batch_size, lr_lambda=lr_lambda(cfg, total_steps))
    estimator.setup(ctx)
    return Trainer(cfg=cfg, ppo_cfg=replace(ppo_cfg, loss_agg=estimator.loss_agg or ppo_cfg.loss_agg), task=task,
                   estimator=estimator, train_problems=train_problems, eval_sets=eval_sets, task_fit=task_fit, start_digest=start_digest,
                   policy=policy, reference=reference, tokenizer=tokenizer,
                   engine=engine, ctx=ctx, sampling=sampling, device=device,
                   norm_tokens=ppo_cfg.loss_norm_tokens or max_new_tokens, policy_params=policy_params,
                   owned=[(parameter_count(m), TokenMeter(m)) for m in owned_models(estimator, policy)])


def owned_models(estimator: Estimator, policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The models an estimator holds after ``setup``, each once: its ``critic`` and any other (PRIME's frozen π_ref),
    found by type, not by name, so that every model a strategy runs counts in its FLOPs; not the policy (metered
    by the loop, its extra rollouts by the engine)."""
    found = [estimator.critic] + [v for v in vars(estimator).values() if isinstance(v, torch.nn.Module)]
    return list({id(m): m for m in found if m is not None and m is not policy}.values())


def fit_task(cfg: TrainConfig, task: Task, tokenizer, context: int | None, max_new_tokens: int):
    """The task for this model: problems whose prompt leaves too little room for a response are dropped now, never
    a failure mid-run. Returns the train problems, the eval sets and the count dropped per split (for run.json and
    the leaderboard)."""
    train_problems, eval_sets, dropped = run_problems(cfg, task, lambda problems: fit_to_context(
        tokenizer, task, problems, context, max_new_tokens, cfg.min_response_tokens, cfg.prompt_tokenization))
    counts = {split: len(ids) for split, ids in dropped.items()}
    if distributed.is_main() and any(counts.values()):
        print(f"rlzoo: dropped problems whose prompt leaves less than {cfg.min_response_tokens or max_new_tokens} tokens "
              f"of the model's {context}-token context for the response: "
              + ", ".join(f"{split} {n} of {len(task.problems(split))}" for split, n in counts.items() if n))
    return train_problems, eval_sets, counts


def check_prompt_tokenization(cfg: TrainConfig, task: Task, tokenizer, train_problems: list[Problem]) -> dict:
    """Whether the task's prompts tokenize (as ``train.prompt_tokenization`` says) as they do at the start of prompt +
    SFT target: a model fine-tuned on jointly tokenized text would see unfamiliar splits. Warns; returns the measure."""
    mismatch = tokenization_mismatch(tokenizer, task, train_problems)
    if distributed.is_main() and mismatch[cfg.prompt_tokenization] > 0:
        other = "joint" if cfg.prompt_tokenization == "alone" else "alone"
        print(f"rlzoo: warning: {mismatch[cfg.prompt_tokenization]:.0%} of {mismatch['sampled']} {task.name} train prompts "
              f"tokenize ({cfg.prompt_tokenization}) differently from the start of prompt + SFT target"
              + (f" (alone {mismatch['example'][0]} vs joint {mismatch['example'][1]})" if "example" in mismatch else "")
              + f": a model fine-tuned on jointly tokenized text sees unfamiliar prompt tokens; train.prompt_tokenization = "
              f"{other!r} mismatches {mismatch[other]:.0%}")
    return mismatch


def resume(run_dir: Path, trainer: Trainer, deepspeed_config: dict | None) -> Progress:
    """The progress to start from: a fresh run's, or the latest checkpoint's with every trained module (weights,
    optimizer, schedule), the estimator and the token counters restored, and metrics.jsonl cut back to what that
    checkpoint had seen (replaced whole: a kill mid-write must not cut records the checkpoint had logged)."""
    main = distributed.is_main()
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        if main:
            (run_dir / "metrics.jsonl").write_text("")
        return Progress()
    saved = runs.load_torch_file(checkpoint / "state.pt")
    if deepspeed_config is not None and saved.get("processes", 1) != distributed.world_size():
        raise UserError(f"{checkpoint} was written by {saved.get('processes', 1)} process(es), each holding its part of "
                        f"DeepSpeed's optimizer state; resume it with {saved.get('processes', 1)}, not {distributed.world_size()}")
    ctx = trainer.ctx
    for name, module in ctx.trained.items():  # weights, optimizer and schedule of the policy and any critic
        module.load(checkpoint, name)
    with ctx.sampling_weights():
        trainer.engine.sync_weights(trainer.policy)
    trainer.estimator.load_state_dict(saved["estimator"])
    fresh = asdict(Progress())
    progress = Progress(**{k: saved.get(k, v) for k, v in fresh.items()})  # a checkpoint from before FLOPs were counted has none
    ctx.tokens.update(progress.tokens)
    lost = []  # train records the checkpoint had logged that metrics.jsonl no longer holds (cut or edited since)
    if main:  # keep exactly what the checkpoint had seen: train records up to it, evals before it
        kept = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl")
                if r.get("iteration", -1) < progress.iteration
                or (r.get("kind") == "train" and r.get("iteration") == progress.iteration)]
        lost = sorted(set(range(1, progress.iteration + 1)) - {r.get("iteration") for r in kept if r.get("kind") == "train"})
    # ranks meet: all stop if rank 0 found a hole
    distributed.check(not lost, f"{run_dir / 'metrics.jsonl'} lacks the train records of iterations {lost[0]}..{lost[-1]} "
                      f"that {checkpoint} had logged; resuming would leave a hole in its curves: restore the file, "
                      f"or delete {run_dir} to start over" if lost else "")
    if main:
        (run_dir / "metrics.jsonl.tmp").write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(run_dir / "metrics.jsonl.tmp", run_dir / "metrics.jsonl")
        print(f"rlzoo: resuming {run_dir} from iteration {progress.iteration}")
    return progress


def write_run_start(run_dir: Path, identity: dict, cfg: TrainConfig, command: str, previous: dict) -> None:
    """config.gin (the operative config) and run.json, marked running (rank 0)."""
    (run_dir / "config.gin").write_text(gin.operative_config_str() or gin.config_str())
    runs.write_run(run_dir, identity | {"format": runs.FORMAT, "status": "running", "command": command,
                                         "budget": {"iterations": cfg.iterations, "episodes": cfg.max_episodes, "seconds": cfg.max_seconds},
                                         "rlzoo_version": __import__("rlzoo").__version__, "processes": distributed.world_size(),
                                         "started": previous.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z")})


class MetricsLog:
    """Appends records to metrics.jsonl and TensorBoard (rank 0), stamped with the run's progress."""

    def __init__(self, run_dir: Path, progress: Progress):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.progress, self.tb = run_dir / "metrics.jsonl", progress, SummaryWriter(str(run_dir / "tb"))

    def __call__(self, record: dict) -> None:
        p = self.progress
        record = {"kind": record.pop("kind"), "iteration": p.iteration, "episodes": p.episodes,
                  "time/train_total": p.train_seconds, "flops/total": p.flops} | record
        runs.append_jsonl(self.path, record)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "iteration":
                self.tb.add_scalar(key, value, p.iteration)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def budget_left(cfg: TrainConfig, progress: Progress) -> bool:
    return (progress.iteration < cfg.iterations
            and not (cfg.max_episodes and progress.episodes >= cfg.max_episodes)
            and not (cfg.max_seconds and progress.train_seconds >= cfg.max_seconds))


def run_eval(trainer: Trainer, eval_sets: dict[str, list[Problem]], seed: int) -> dict:
    """The eval record: every eval set, each rank evaluating its part of the problems, merged."""
    from rlzoo.evaluate import evaluate

    t, cfg = trainer, trainer.cfg
    t0 = time.perf_counter()
    record = {"kind": "eval"}
    for split, problems in eval_sets.items():
        mine = distributed.shard(len(problems))  # each rank evaluates its part of the problems
        with t.ctx.sampling_weights():
            result = evaluate(t.policy, t.tokenizer, t.engine, t.task, split, problems=problems[mine.start : mine.stop],
                              samples=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                              max_new_tokens=t.sampling.max_new_tokens, seed=seed,
                              prompt_tokenization=cfg.prompt_tokenization, first_index=mine.start)
        # ranks meet: every rank's part of the split
        result = merge_eval(distributed.gather_objects({k: v for k, v in result.items() if k != "problems"}))
        record |= {f"eval/{split}/{k}": v for k, v in result.items()
                   if k.startswith(("pass@", "maj@")) or k in ("mean_response_tokens", "truncated", "n_problems")}
    record["time/eval"] = time.perf_counter() - t0
    return record


# ----------------------------------------------------------------------------- one iteration


def logprobs_of(t: Trainer, model, batch: RolloutBatch) -> torch.Tensor:
    """Log-probs [B, L] of the batch's tokens under ``model``; each rank runs its rows (ranks meet: the rows gathered)."""
    ids, attn, prompt_lens = batch.input_ids.to(t.device), batch.attention_mask.to(t.device), scoring_prompt_lens(t, batch)
    return distributed.gather_rows(lambda rows: batched_logprobs(
        model, ids[rows.start : rows.stop], attn[rows.start : rows.stop], t.cfg.temperature, t.ppo_cfg.micro_batch_size,
        None if prompt_lens is None else prompt_lens[rows.start : rows.stop]), ids.shape[0])


def scoring_prompt_lens(t: Trainer, batch: RolloutBatch) -> torch.Tensor | None:
    """The rows' prompt lengths [B] where forwards run each distinct prompt once (``ppo.share_prompts``), else None."""
    return batch.prompt_lens if t.ppo_cfg.share_prompts else None


def train_iteration(t: Trainer, it: int) -> dict:
    """One iteration: rollouts, rewards, log-probs, credit, critic, PPO update. Returns its train record.
    Ranks meet only where the code says so (``estimator.sample``, ``logprobs_of``, the estimator's own heavy parts,
    ``ppo_update``'s gradient all-reduce, and the sums of the counters at the end)."""
    cfg, ppo_cfg, ctx, estimator = t.cfg, t.ppo_cfg, t.ctx, t.estimator
    t_start = time.perf_counter()
    watch, tokens_before, rollout_tokens_before = ctx.watch, dict(ctx.tokens), dict(ctx.forward_tokens)
    watch.seconds.clear()
    ctx.iteration = it
    ctx.sampling = replace(t.sampling, seed=derive_seed(cfg.seed, it, Salt.ROLLOUTS))

    # 1-2. Rollouts and their rewards, as the strategy samples them: by default group_size responses to each prompt
    #      (``rollout.sample_groups``; a strategy that owns the shape of its samples draws its own, e.g. a tree).
    #      Ranks meet inside: every rank then holds the whole batch.
    problems = iteration_problems(t.train_problems, it, cfg.prompts_per_iteration, cfg.seed)
    engine_tokens_before = t.engine.stats.forward_tokens  # this rank's
    batch = estimator.sample(problems, ctx)
    generation_tokens = t.engine.stats.forward_tokens - engine_tokens_before  # this rank's prefill + decode

    # 3. Log-probs of the sampled tokens under the sampling policy (the sampler's own, where it returned them:
    #    ``train.old_logprobs``) and under the reference.
    with watch("logprobs"):
        mask = batch.response_mask
        recomputed = batch.old_logprobs is None or cfg.old_logprobs == "recompute"
        if recomputed:
            batch.old_logprobs = logprobs_of(t, t.policy, batch)
        kl_stats = {}
        if t.reference is not None:
            batch.ref_logprobs = logprobs_of(t, t.reference, batch)
            kl_stats = {"kl/ref_k1": masked_mean(kl_k1(batch.old_logprobs, batch.ref_logprobs), mask).item(),
                        "kl/ref": masked_mean(kl_k3(batch.old_logprobs, batch.ref_logprobs), mask).item()}
            if ppo_cfg.kl_mode == "k1-reward":
                batch.token_rewards = batch.token_rewards - ppo_cfg.kl_coef * kl_k1(batch.old_logprobs, batch.ref_logprobs) * mask

    # 4. Credit: the only strategy-specific step. Its extra rollouts time themselves under their own purpose
    #    (nested spans: the stopwatch counts each second once, in the innermost span).
    owned_counts = lambda: [n for _, meter in t.owned for n in meter.counts()]  # noqa: E731  [forward, trained] per model
    owned_before = owned_counts()
    with watch("advantages"):
        credit = estimator.advantages(batch, ctx)
    owned_mid = owned_counts()
    with watch("critic"):
        critic_stats = estimator.update_critic(batch, credit, ctx)
    owned_after = owned_counts()
    raw = credit.advantages
    loss_mask = mask if credit.loss_mask is None else credit.loss_mask  # [B, L]: the tokens the loss covers
    advantages = masked_whiten(raw, loss_mask) if ppo_cfg.whiten_advantages else raw  # [B, L]

    # 5. PPO epochs on the policy (each rank its rows of every minibatch); the engine then samples from the new weights.
    with watch("update"):
        update_stats = ppo_update(ctx.trained["policy"], batch_on(replace(batch, response_mask=loss_mask), t.device),
                                  advantages.to(t.device), ppo_cfg, cfg.temperature,
                                  torch.Generator().manual_seed(derive_seed(cfg.seed, it, Salt.PPO_MINIBATCHES)), t.norm_tokens)
        if not all(torch.isfinite(p).all() for p in t.policy.parameters()):
            raise FloatingPointError("the PPO update made the policy's weights non-finite: lower train.lr or raise ppo.kl_coef")
        with ctx.sampling_weights():
            t.engine.sync_weights(t.policy)

    # 6. Estimated FLOPs by stage (``estimated_flops``) of the positions each pass ran (micro-batches cut to their
    #    longest row); generation, update and critic counts are per rank, hence the sum (ranks meet).
    batch_tokens = batch.size * batch.input_ids.shape[1]
    generation_tokens, update_tokens, *owned_tokens = map(int, distributed.all_reduce(
        [float(generation_tokens), float(update_stats.pop("ppo/positions"))]
        + [float(b - a) for a, b in zip(owned_before + owned_mid, owned_mid + owned_after)]))
    owned_flops = lambda counts: sum(estimated_flops(n, forward) + estimated_flops(n, trained, backward=True)  # noqa: E731
                                     for (n, _), forward, trained in zip(t.owned, counts[::2], counts[1::2]))
    stage_flops = {
        "generation": estimated_flops(t.policy_params, generation_tokens),
        "logprobs": estimated_flops(t.policy_params, plan_rows(batch.input_ids, batch.attention_mask, ppo_cfg.micro_batch_size,
                                                              scoring_prompt_lens(t, batch)).positions
                                    * (int(recomputed) + int(t.reference is not None))),
        **{p: estimated_flops(t.policy_params, n - rollout_tokens_before.get(p, 0)) for p, n in ctx.forward_tokens.items()},
        "advantages": owned_flops(owned_tokens[: len(owned_before)]),  # the estimator's models inside it (a critic's forward)
        "critic": owned_flops(owned_tokens[len(owned_before) :]),
        "update": estimated_flops(t.policy_params, update_tokens, backward=True),
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
        "batch/real_tokens": int(batch.attention_mask.sum()),  # B x L less the padding: what a pass over whole rows runs at least
        "batch/response_tokens": int(batch.response_mask.sum()),  # the least any pass can run (prompts shared: ``ppo.plan_rows``)
        **{f"flops/{k}": v for k, v in stage_flops.items() if v},
        "time/iteration": distributed.all_reduce(time.perf_counter() - t_start, "max"),  # the slowest rank's: budgets agree (ranks meet)
    } | {"memory/peak_rss_mb": peak_memory_mb()}
