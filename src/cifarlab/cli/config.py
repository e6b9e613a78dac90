"""`cifarlab config`: print a resolved recipe (--recipe, --config, --set) without training."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cifarlab.cli.common import add_recipe_args, data_dir_arg, fmt, printable

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "print a resolved recipe (--recipe, --config, --set) without training"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "config",
        help=HELP,
        **fmt(
            "Resolve and validate a recipe exactly as `cifarlab train` would (base recipe, then --config,\n"
            "then each --set) and print it as YAML, marking the keys that differ from the base recipe and\n"
            "describing the registered model, optimizer, schedule, augmentation and callbacks it names.\n"
            "The output is itself a valid --config file. Nothing is loaded or trained.",
            "cifarlab config --recipe reference --set lr=2e-3 --set widths=32,64,64",
        ),
    )
    add_recipe_args(p)
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from cifarlab import config
    from cifarlab.recipes import DEFAULT_RECIPE, Recipe, choices, get_recipe, unused_size_keys
    from cifarlab.registry import registered_description

    recipe = config.recipe_from_args(args)
    d = recipe.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    file_recipe = config.load_config_file(args.config).get("recipe") if args.config else None
    base_name = args.recipe or file_recipe or DEFAULT_RECIPE
    base = get_recipe(base_name).to_dict()
    print(f"recipe: {base_name}")
    variant = config.machine_variant(recipe, "auto")
    if variant is not None:  # a comment line: the output stays a valid --config file
        print(f"# on this machine `cifarlab train` trains {variant} instead (fp32 on a CPU); see --recipe {variant}")
    group = None
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    unused = unused_size_keys(recipe)
    for key, value in d.items():
        if key == "name" and value == base_name:
            continue
        if fields[key].metadata.get("group") != group:  # the recipe's groups, as airbench's dict reads
            group = fields[key].metadata.get("group")
            print(f"# -- {group}")
        # One flow-style line per key: the whole output is itself a valid --config file.
        line = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000, sort_keys=False)
        line = line.strip()[1:-1]
        notes = []
        described = registered_description(key, value)
        if described is not None:  # what the registered name is (a plugin's model says what it builds)
            notes.append(printable(described))
        if base.get(key) != value:
            notes.append(f"{base_name}: {json.dumps(base.get(key))}")
        if key in unused:  # a size key this model does not read (validate refuses changing it)
            notes.append(f"not used by {recipe.model}")
        allowed = choices(key)
        if allowed is not None:
            # A list key (callbacks) takes several of them, and a plugin registers more.
            many = isinstance(value, list)
            listed = ", ".join(allowed) + (" (plugins may register more)" if many else "")
            notes.append(("any of " if many else "one of ") + listed if allowed else "none registered")
        print(line + (f"  # {'; '.join(notes)}" if notes else ""))
    return 0
