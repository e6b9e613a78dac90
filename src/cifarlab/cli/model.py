"""`cifarlab model summary`: a Keras-style layer table of a recipe's model."""

from __future__ import annotations

import argparse
from typing import Any

from cifarlab.cli.common import fmt

CIFAR_SHAPE = (3, 32, 32)


# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "inspect models"


def add_parser(sub: Any) -> None:
    p_model = sub.add_parser("model", help=HELP, **fmt("Inspect models.", "cifarlab model summary reference"))
    model_sub = p_model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")
    model_sub.required = True
    p_sum = model_sub.add_parser(
        "summary",
        help="Keras-style layer table of a recipe's model",
        **fmt(
            "Print a Keras-style table of a recipe's model: layer, output shape, parameters, totals.",
            "cifarlab model summary reference",
        ),
    )
    p_sum.add_argument("recipe", help="a recipe name, e.g. fast or reference (an unknown name lists them all)")
    p_sum.set_defaults(func=cmd_model_summary)


def cmd_model_summary(args: argparse.Namespace) -> int:
    from cifarlab.models import build_model, summary
    from cifarlab.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    shape = CIFAR_SHAPE  # the input shape now comes from the dataset, not the recipe: CIFAR's 32x32 RGB
    print(summary(build_model(recipe, input_shape=shape), shape))
    return 0
