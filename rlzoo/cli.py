"""The rlzoo command line. Nothing imports this module; it imports everything else lazily,
so that ``rlzoo --help`` is instant."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
import typer

from rlzoo.errors import UserError

# typer >= 0.20 raises the exceptions of the click it vendors (typer._click), older typer click's own: catch both.
try:
    from typer._click import exceptions as _typer_click_exceptions
except ImportError:
    _typer_click_exceptions = click.exceptions
NO_ARGS_ERRORS = (click.exceptions.NoArgsIsHelpError, _typer_click_exceptions.NoArgsIsHelpError)
USAGE_ERRORS = (click.UsageError, _typer_click_exceptions.UsageError)
ABORTS = (click.exceptions.Abort, typer.Abort)
EXITS = (click.exceptions.Exit, typer.Exit)

# The arguments of this invocation, set by main: the command a run or report records, which sys.argv is not when
# main is called in-process (tests, scripts).
_argv: list[str] = []


def invoked_command() -> str:
    """This invocation as a shell command line, as the user gave it."""
    return shlex.join(["rlzoo", *_argv])


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="rlzoo: controlled comparisons of credit-assignment strategies for RL fine-tuning of LLMs.",
)


@app.command()
def train(
    algo: str = typer.Option(..., help="credit-assignment strategy, e.g. vineppo, ppo, grpo, rloo (see `rlzoo list`)"),
    task: str = typer.Option("arith", help="task name (see `rlzoo list`)"),
    model: str = typer.Option("default", help="HF hub id, local path, or 'default' (the built-in arith policy)"),
    seed: int = typer.Option(0, help="run seed: prompts, sampling and updates all derive from it"),
    out: str = typer.Option(None, help="run folder (default runs/<algo>-<task>-seed<seed>); re-run to resume"),
    config: list[str] = typer.Option([], help="gin config file(s), e.g. benchmarks/quick.gin"),
    set_: list[str] = typer.Option([], "--set", help="gin binding, e.g. train.lr=1e-5 (repeatable)"),
    budget: str = typer.Option(None, help="iterations=N | episodes=N | seconds=N (overrides the config)"),
    deepspeed: str = typer.Option(None, "--deepspeed", help="DeepSpeed JSON config (ZeRO 1-3, offload), e.g. "
                                  "benchmarks/deepspeed/zero2.json; same as --set train.deepspeed_config=FILE"),
) -> None:
    """Train one strategy on one task: rollouts -> rewards -> advantages -> PPO -> eval, into a run folder.
    Runs as is under `torchrun --nproc_per_node N -m rlzoo.cli train ...` or the `deepspeed` launcher."""
    from rlzoo import distributed
    from rlzoo.bench import budget_bindings
    from rlzoo.config import apply_gin
    from rlzoo.train import TrainConfig
    from rlzoo.train import train as run_training

    identity = [f"train.algo = {algo!r}", f"train.task = {task!r}", f"train.model = {model!r}", f"train.seed = {seed}"]
    if deepspeed:
        identity.append(f"train.deepspeed_config = {deepspeed!r}")
    apply_gin(config, list(set_) + budget_bindings(budget) + [b.replace("'", '"') for b in identity])
    run_dir = out or f"runs/{algo}-{task}-seed{seed}"
    run_training(run_dir, TrainConfig(), command=invoked_command())
    from rlzoo.runs import read_run

    if read_run(run_dir).get("status") != "finished":
        if distributed.is_main():
            print(f"rlzoo: interrupted; checkpoint saved in {run_dir}; run the same command to resume", file=sys.stderr)
        raise typer.Exit(130)
    if distributed.is_main():
        print(f"rlzoo: run folder {run_dir}")


@app.command()
def pretrain(
    task: str = typer.Option("arith", help="Task whose worked solutions the policy imitates."),
    preset: str = typer.Option("default", help="default (the built-in policy) or tiny (seconds; for tests)."),
    config: list[str] = typer.Option([], "--config", help="Gin config file (repeatable)."),
    set_: list[str] = typer.Option([], "--set", help="Gin binding, e.g. pretrain.steps=600 (repeatable)."),
    force: bool = typer.Option(False, help="Rebuild even if the policy is cached."),
) -> None:
    """Build the built-in default policy by SFT (cached: built once per config)."""
    from rlzoo.config import apply_gin
    from rlzoo.policy import describe_policy, policy_folder, pretrain as build, pretrain_config

    apply_gin(config, set_)
    cfg = pretrain_config(preset, task=task)
    cached = (policy_folder(cfg) / "pretrain.json").is_file() and not force
    folder = build(cfg, force=force)
    info = describe_policy(folder)
    print(f"policy: {folder}{' (cached)' if cached else ''}")
    print(f"{info['params'] / 1e6:.2f}M parameters, built in {info['seconds']:.0f}s, final SFT loss {info['final_loss']:.3f}")


@app.command("eval")
def eval_(
    model: str = typer.Option("default", help="Hub id, local folder, or 'default' (the built-in policy)."),
    task: str = typer.Option("arith", help="Registered task (see `rlzoo list`)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    samples: int = typer.Option(16, min=1, help="Samples per problem (k of maj@k)."),
    temperature: float = typer.Option(0.35, min=0.0, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling mass, in (0, 1]."),
    limit: int = typer.Option(None, min=1, help="Evaluate the first N problems only."),
    seed: int = typer.Option(0, help="Sampling seed."),
    max_new_tokens: int = typer.Option(None, min=1, help="Response budget in tokens (default: train.max_new_tokens "
                                       "if --config/--set bind it, else the task's), as in `rlzoo train`."),
    engine: str = typer.Option("torch", help="Generation engine (see `rlzoo list`)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    out: Path = typer.Option(None, help="Write the results as JSON here."),
    config: list[str] = typer.Option([], "--config", help="Gin config file (repeatable)."),
    set_: list[str] = typer.Option([], "--set", help="Gin binding, e.g. pretrain.steps=600 (repeatable)."),
) -> None:
    """Evaluate a model on a task split: pass@1 and maj@k."""
    import json

    from rich.console import Console
    from rich.table import Table

    from rlzoo import distributed
    from rlzoo.config import apply_gin
    from rlzoo.engine import ENGINES
    from rlzoo.evaluate import evaluate
    from rlzoo.policy import check_model_for_task, load_policy
    from rlzoo.runs import check_out_dir
    from rlzoo.engine import context_length
    from rlzoo.tasks import fit_to_context, get_task
    from rlzoo.train import TrainConfig

    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p {top_p}: must be in (0, 1]")
    if out is not None:  # checked before the evaluation, whose result it would hold
        check_out_dir(out.parent, "--out")
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; give the path of the JSON file to write")
    device = str(distributed.init(device or "auto"))
    apply_gin(config, set_)
    task_obj = get_task(task)
    if split not in task_obj.splits:
        raise UserError(f"task {task!r} has no split {split!r}; splits: {', '.join(task_obj.splits)}")
    check_model_for_task(model, task)
    # One knob for train and eval on every task, so that a model evaluates with the budget it trains with.
    budget = max_new_tokens or TrainConfig().max_new_tokens or task_obj.max_new_tokens
    engine_cls = ENGINES.get(engine)
    policy, tokenizer = load_policy(model, device=device)
    train_cfg = TrainConfig()
    # As train does: problems whose prompt leaves too little room in the model's context are dropped, and counted.
    problems, dropped = fit_to_context(tokenizer, task_obj, task_obj.problems(split), context_length(policy), budget,
                                       train_cfg.min_response_tokens, train_cfg.prompt_tokenization)
    if dropped:
        print(f"rlzoo: dropped {len(dropped)} of {len(task_obj.problems(split))} {task}/{split} problems whose prompt leaves "
              f"too little room in the model's {context_length(policy)}-token context for a response")
    result = evaluate(policy, tokenizer, engine_cls(policy, tokenizer), task_obj, split, samples, temperature, top_p, limit, seed,
                      problems=problems, max_new_tokens=budget, prompt_tokenization=train_cfg.prompt_tokenization)
    result = {"model": model, "task": task, "max_new_tokens": budget, "dropped_problems": len(dropped), **result}

    table = Table(title=f"{model} on {task}/{split}: {result['n_problems']} problems x {samples} samples, T={temperature}")
    for column in ("pass@1", f"maj@{samples}", "mean tokens", f"cut at {budget}", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['pass@1']:.3f}", f"{result[f'maj@{samples}']:.3f}", f"{result['mean_response_tokens']:.1f}",
                  f"{result['truncated']:.1%}", f"{result['seconds']:.1f}")
    Console().print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


@app.command("list")
def list_() -> None:
    """Registered tasks, estimators and engines."""
    from rlzoo.algorithms import ESTIMATORS
    from rlzoo.engine import ENGINES
    from rlzoo.tasks import TASKS

    for title, registry in (("tasks", TASKS), ("estimators", ESTIMATORS), ("engines", ENGINES)):
        print(f"{title}: {', '.join(registry.names())}")


@app.command()
def bench(
    algos: str = typer.Option(..., help="strategies to compare, comma-separated, e.g. vineppo,ppo,grpo,rloo"),
    task: str = typer.Option(..., help="task name (see `rlzoo list`)"),
    model: str = typer.Option("default", help="base policy for every run: 'default' (built-in, arith only) or a model folder"),
    seeds: int = typer.Option(3, help="seeds per strategy (0..N-1)"),
    budget: str = typer.Option(None, help="the same for every run: iterations=N | episodes=N | seconds=N (default: the config's)"),
    config: list[str] = typer.Option([], help="gin config file(s) for every run, e.g. benchmarks/quick.gin"),
    set_: list[str] = typer.Option([], "--set", help="gin binding for every run, e.g. train.lr=1e-5 (repeatable)"),
    out: Path = typer.Option(Path("bench"), help="bench folder: runs/, logs/, bench.json, leaderboard/; re-run to resume"),
    jobs: int = typer.Option(1, help="runs at once (wall-clock comparisons are fairest at 1)"),
    leaderboard: Path = typer.Option(None, help="where to write the leaderboard (default OUT/leaderboard)"),
    launcher: str = typer.Option(None, help="runs each train on several processes, e.g. 'torchrun --nproc_per_node 4 -m' "
                                 "or 'deepspeed --num_gpus 4 --module' (default: one python process)"),
    sweep: list[str] = typer.Option([], help="tune first: binding=v1,v2,... (repeatable: the grid is the product); every "
                                    "strategy runs the grid, picks by final train accuracy, then runs its pick on the seeds"),
    tune_seeds: int = typer.Option(1, help="with --sweep: tuning runs per (strategy, setting), seeds 1000, 1001, ..."),
) -> None:
    """Compare strategies under one budget: one run per (strategy, seed), skip finished, resume interrupted, then a leaderboard."""
    from rlzoo.bench import make_plan, run_bench

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UserError("run `rlzoo bench` as one process; to train each run on several processes give it "
                        "--launcher 'torchrun --nproc_per_node N -m'")
    plan = make_plan(algos, task, model=model, seeds=seeds, budget=budget, configs=config, bindings=set_, launcher=launcher,
                     sweep=sweep, tune_seeds=tune_seeds)
    result = run_bench(plan, out, jobs=jobs, leaderboard=leaderboard)
    if result.unfinished:
        print(f"rlzoo: {len(result.unfinished)} run(s) did not finish: {', '.join(result.unfinished)}; logs in {result.logs}; "
              "re-run the same command to resume", file=sys.stderr)
        raise typer.Exit(1)


@app.command("leaderboard")
def leaderboard_(
    runs: list[Path] = typer.Argument(..., help="run folders, or folders that contain them"),
    out: Path = typer.Option(Path("leaderboard"), help="output folder: README.md, results.csv/json, plots/, index.html"),
    baseline: str = typer.Option(None, help="strategy that speed-ups and Welch tests compare against (default: ppo)"),
    metric: str = typer.Option("pass@1", help="accuracy metric of the eval records (pass@1, maj@16, ...)"),
) -> None:
    """Aggregate run folders of one task: accuracy with CIs, generalization, speed, cost, plots, one HTML page."""
    from rlzoo.audit import leaderboard_sections
    from rlzoo.leaderboard import leaderboard_command, write_leaderboard
    from rlzoo.runs import check_out_dir, find_runs

    check_out_dir(out)
    found = find_runs(runs)
    algos = sorted({r.algo for r in found})
    if baseline is not None and baseline not in algos:  # named on purpose: a typo must not pass as "no baseline runs"
        raise UserError(f"--baseline {baseline!r}: no run of that strategy among the runs; they ran {', '.join(algos)}")
    baseline = baseline or "ppo"
    res = write_leaderboard(found, out, command=leaderboard_command(runs, out, baseline, metric), baseline=baseline, metric=metric,
                            sections=leaderboard_sections(out))  # `rlzoo audit` writes OUT/audit/ by default
    print(res["verdict"].replace("**", ""))
    print(f"rlzoo: leaderboard of {len(res['runs'])} runs in {out}/ (README.md, index.html)")


@app.command()
def audit(
    algos: str = typer.Option("ppo,vineppo,grpo,rloo", help="strategies whose credit is audited, comma-separated"),
    task: str = typer.Option("arith", help="task name (see `rlzoo list`); its test split is held out"),
    policy: str = typer.Option(None, help="model folder, hub id, 'default', or a run folder (its latest checkpoint); "
                               "default: the first --critic run's policy, else 'default'"),
    critic: list[Path] = typer.Option([], help="a run folder of an audited strategy that learns a critic (ppo, prime): its latest "
                                      "checkpoint's; repeat it for each such strategy"),
    critic_iterations: int = typer.Option(20, help="without --critic: train such a strategy's critic for N iterations (policy frozen) into OUT/"),
    problems: int = typer.Option(64, help="held-out problems (the first N of the test split)"),
    truth_samples: int = typer.Option(256, help="continuations per state for the Monte-Carlo ground truth"),
    alternatives: int = typer.Option(5, help="next steps drawn from every state for the ranking metric (at least 2)"),
    out: Path = typer.Option(Path("leaderboard/audit"), help="output folder: audit.json, audit.md, plots"),
    seed: int = typer.Option(0, help="every random draw of the audit derives from it"),
    config: list[str] = typer.Option([], help="gin config file(s), e.g. benchmarks/quick.gin (sampler, K, group size, critic training)"),
    set_: list[str] = typer.Option([], "--set", help="gin binding, e.g. vineppo.k=9 (a strategy's options; repeatable)"),
) -> None:
    """Audit credit assignment: each strategy's values and advantages against Monte-Carlo ground truth.
    A strategy's options are its gin bindings, as in training: --set vineppo.k=9 (VinePPO's continuations per state)."""
    from rlzoo.audit import AuditConfig, run_audit
    from rlzoo.config import apply_gin

    apply_gin(config, set_)
    cfg = AuditConfig(algos=tuple(dict.fromkeys(a.strip() for a in algos.split(",") if a.strip())), problems=problems,
                      truth_samples=truth_samples, alternatives=alternatives, seed=seed)
    run_audit(task, out, cfg, policy=policy, critics=critic, critic_iterations=critic_iterations,
              command=invoked_command())
    print(f"rlzoo: audit in {out}/ (audit.md, audit.json, plots)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (ours and the command line's) become one line and exit code 2.

    A rank started by a launcher (torchrun, deepspeed) leaves through ``distributed.shutdown``: process
    group destroyed, output flushed, ``os._exit``, so that gloo's teardown cannot abort it at exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]  # the deepspeed launcher's (LOCAL_RANK is set too)
    try:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by a launcher: be a rank from the start
            from rlzoo import distributed

            distributed.join()
        _run(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        distributed = sys.modules.get("rlzoo.distributed")
        if distributed is None or not distributed.launched():
            raise
        import traceback

        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    distributed = sys.modules.get("rlzoo.distributed")
    if distributed is not None and distributed.launched():
        distributed.shutdown(code)
    if code:
        sys.exit(code)


def _run(argv: list[str]) -> None:
    global _argv
    _argv = list(argv)
    try:
        code = app(args=argv, standalone_mode=False, prog_name="rlzoo")
        if isinstance(code, int) and code:  # a typer.Exit(code), returned in this mode
            sys.exit(code)
    except UserError as e:  # gin appends "In call to configurable ..." lines to errors raised while it builds a config
        print(f"rlzoo: error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        sys.exit(2)
    except NO_ARGS_ERRORS as e:
        if e.ctx:
            print(e.ctx.get_help())
        sys.exit(0)
    except USAGE_ERRORS as e:
        print(f"rlzoo: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except ABORTS:
        print("rlzoo: aborted", file=sys.stderr)
        sys.exit(130)
    except EXITS as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
