"""The rlzoo command line. Nothing imports this module; it imports everything else lazily,
so that ``rlzoo --help`` is instant."""

from __future__ import annotations

import sys

import click
import typer

from rlzoo.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="rlzoo: controlled comparisons of credit-assignment strategies for RL fine-tuning of LLMs.",
)


def parse_budget(budget: str | None) -> list[str]:
    """``iterations=N`` | ``episodes=N`` | ``seconds=N`` -> the gin binding that sets it."""
    if budget is None:
        return []
    kind, _, value = budget.partition("=")
    target = {"iterations": "train.iterations", "episodes": "train.max_episodes", "seconds": "train.max_seconds"}.get(kind)
    try:
        number = float(value)
    except ValueError:
        number = -1
    if target is None or number <= 0:
        raise UserError(f"--budget {budget!r}: expected iterations=N, episodes=N or seconds=N with N > 0")
    if kind == "iterations":
        return [f"{target} = {int(number)}"]
    return [f"{target} = {number if kind == 'seconds' else int(number)}", "train.iterations = 1000000000"]


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
) -> None:
    """Train one strategy on one task: rollouts -> rewards -> advantages -> PPO -> eval, into a run folder."""
    from rlzoo.config import apply_gin
    from rlzoo.train import TrainConfig
    from rlzoo.train import train as run_training

    identity = [f"train.algo = {algo!r}", f"train.task = {task!r}", f"train.model = {model!r}", f"train.seed = {seed}"]
    apply_gin(config, list(set_) + parse_budget(budget) + [b.replace("'", '"') for b in identity])
    run_dir = out or f"runs/{algo}-{task}-seed{seed}"
    run_training(run_dir, TrainConfig(), command=" ".join(["rlzoo"] + sys.argv[1:]))
    print(f"rlzoo: run folder {run_dir}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (ours and the command line's) become one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False, prog_name="rlzoo")
    except UserError as e:
        print(f"rlzoo: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as e:
        e.ctx and print(e.ctx.get_help())
        sys.exit(0)
    except click.UsageError as e:
        print(f"rlzoo: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("rlzoo: aborted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
