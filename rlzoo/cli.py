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
