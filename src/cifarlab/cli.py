"""The `cifarlab` command. Each subcommand's work lives in the module named for it; this file only parses."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cifarlab import __version__

EPILOG_DATA = "Data lookup: --data-dir, else $CIFARLAB_DATA, else ~/.cache/cifarlab."


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _fmt(description: str, example: str) -> dict:
    return {
        "description": description,
        "epilog": f"example:\n  {example}\n\n{EPILOG_DATA}",
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset folder (archives, extracted batches or an ImageFolder tree); default $CIFARLAB_DATA "
        "or ~/.cache/cifarlab",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifarlab",
        **_fmt(
            "Train, evaluate, explain and serve CNN image classifiers for CIFAR-10 and datasets like it.",
            "cifarlab train --data-dir ../shared/data",
        ),
    )
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # -- data ---------------------------------------------------------------------------------------
    p_data = sub.add_parser(
        "data",
        help="inspect datasets",
        **_fmt(
            "Inspect datasets: counts, checksums, sample grids.",
            "cifarlab data info --data-dir ../shared/data",
        ),
    )
    data_sub = p_data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    from cifarlab import data_cli

    data_cli.add_commands(data_sub, _fmt, _data_dir_arg)

    # -- model --------------------------------------------------------------------------------------
    p_model = sub.add_parser(
        "model", help="inspect models", **_fmt("Inspect models.", "cifarlab model summary reference")
    )
    model_sub = p_model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")
    model_sub.required = True
    p_sum = model_sub.add_parser(
        "summary",
        help="Keras-style layer table of a recipe's model",
        **_fmt(
            "Print a Keras-style table of a recipe's model: layer, output shape, parameters, totals.",
            "cifarlab model summary reference",
        ),
    )
    p_sum.add_argument("recipe", help="recipe name (reference, fast, air94)")
    p_sum.set_defaults(func=_cmd_model_summary)

    # -- train / evaluate / report / runs / predict / export ------------------------------------------
    from cifarlab import report_cli, tools_cli, train_cli

    train_cli.add_commands(sub, _fmt, _data_dir_arg)
    report_cli.add_commands(sub, _fmt, _data_dir_arg)
    tools_cli.add_commands(sub, _fmt, _data_dir_arg)
    return parser


def _cmd_model_summary(args: argparse.Namespace) -> int:
    from cifarlab.models import build_model, summary
    from cifarlab.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    print(summary(build_model(recipe), recipe.input_shape))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "data_dir", None) is None and os.environ.get("CIFARLAB_DATA"):
        args.data_dir = Path(os.environ["CIFARLAB_DATA"])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # user-facing errors carry their own advice
        from cifarlab.errors import UserError

        if isinstance(exc, (UserError, CliError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
