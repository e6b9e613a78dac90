"""`cifarlab tune`: parse, resolve the recipe and the search space (both checked before any work), run the study
(`cifarlab.tune`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from cifarlab.cli.common import add_recipe_args, data_dir_arg, fmt, folder_path, output_may_close, stop_signals, warn

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "search a recipe's hyperparameters with Optuna (TPE, pruning, resumable, many workers)"


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32 - 1024:  # numpy's seed range, with room for one seed per worker
        raise argparse.ArgumentTypeError(f"must be from 0 to {2**32 - 1025}, got {value}")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "tune",
        help=HELP,
        **fmt(
            "Search hyperparameters of a recipe with Optuna: a TPE sampler draws values from the search space\n"
            "(a YAML file; each built-in recipe ships one), every trial trains on the training split and reports\n"
            "its validation metric after each epoch, and the pruner stops unpromising trials early. The test set\n"
            "is never read by a trial: the best trial's full run is evaluated once at the end (--final-seeds).\n"
            "The study lives in runs/tune/<study>/study.db (SQLite) or --storage URL and resumes when the\n"
            "command runs again (trials killed while running are marked FAILED and re-queued). Writes\n"
            "best.yaml (for `cifarlab train --config`), trials.csv/.md, report.html/.md and study.json there.\n"
            "Needs the 'tune' extra: pip install 'cifarlab[tune]'.",
            "cifarlab tune --recipe reference --n-trials 24 --workers 4 --data-dir ../shared/data",
        ),
    )
    add_recipe_args(p)
    data_dir_arg(p)
    p.add_argument(
        "--space",
        type=Path,
        default=None,
        metavar="FILE",
        help="search space (YAML); default: the recipe's own (cifarlab/spaces/<recipe>.yaml)",
    )
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: the recipe's name)")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna RDB storage shared by all workers, e.g. postgresql://user:pass@host/db "
        "(default: sqlite in the study folder)",
    )
    p.add_argument(
        "--runs-dir",
        type=folder_path,
        default=Path("runs"),
        help="the study folder is <runs-dir>/tune/<study> (default: runs)",
    )
    p.add_argument(
        "--n-trials", type=int, default=20, help="complete + pruned trials for the whole study (default: 20)"
    )
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop starting trials after this")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes on this machine, sharing the storage (default: 1)"
    )
    p.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median", help="(default: median)")
    p.add_argument(
        "--prune-after",
        type=int,
        default=3,
        metavar="EPOCHS",
        help="no trial is pruned before this many epochs (default: 3)",
    )
    p.add_argument(
        "--metric",
        choices=("val_accuracy", "val_loss"),
        default=None,
        help="the objective (default: the space's metric, else the recipe's monitor, else val_accuracy)",
    )
    p.add_argument(
        "--trial-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe key for trials only, e.g. --trial-set epochs=12 (the final run keeps the recipe's)",
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="TPE sampler seed, >= 0; local worker i uses seed+i (default: 0)"
    )
    p.add_argument(
        "--startup-trials", type=int, default=10, help="random trials before TPE models the results (default: 10)"
    )
    p.add_argument(
        "--final-seeds",
        type=int,
        default=1,
        metavar="N",
        help="full runs of the best trial, seeds recipe seed .. +N-1, evaluated on the test set (default: 1; "
        "0: none, e.g. on all but one machine of a shared study)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip the study report and its figures, and the final runs' reports (tables, best.yaml, study.json stay)",
    )
    p.add_argument("--verbose", action="store_true", help="also print every trial's epochs")
    p.add_argument("--quiet", action="store_true", help="print only errors and the final result")
    p.set_defaults(func=cmd_tune)


def _space_recipe(path: Path | None) -> str | None:
    """The `recipe:` a space file names (read before the recipe is resolved, to pick the default base)."""
    if path is None:
        return None
    import yaml

    from cifarlab.config import _NoAliasLoader

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # load_space reports it properly
    name = data.get("recipe") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def cmd_tune(args: argparse.Namespace) -> int:
    from cifarlab import config
    from cifarlab.errors import ConfigError
    from cifarlab.recipes import DEFAULT_RECIPE
    from cifarlab.tune import OBJECTIVES, TuneSettings, load_space, require_optuna, tune

    require_optuna()
    file_recipe = config.load_config_file(args.config).get("recipe") if args.config else None
    space_recipe = _space_recipe(args.space)
    base_name = args.recipe or file_recipe or space_recipe or DEFAULT_RECIPE
    if space_recipe and space_recipe != base_name:
        raise ConfigError(f"--space {args.space} is a space for recipe {space_recipe!r}, not {base_name!r}")
    recipe = config.resolve_recipe(base_name, args.config, args.set or (), data_dir=args.data_dir)
    space = load_space(args.space, recipe, base_name)
    # A key the space draws is overwritten in every trial: a --set or --trial-set on it does nothing; said.
    tuned = {p.field for p in space.params}
    where = args.space or "the recipe's built-in space"
    for flag, items in (("--set", args.set or ()), ("--trial-set", args.trial_set or ())):
        for item in items:
            key = config.parse_set(item)[0].partition(".")[0]
            if key in tuned:
                warn(
                    f"{flag} {item}: {key!r} is drawn from the search space ({where}) in every trial and the final "
                    f"run, so this value is not used; to fix {key}, tune with a space without it (--space FILE)"
                )
    metric = args.metric or space.metric or (recipe.monitor if recipe.monitor in OBJECTIVES else "val_accuracy")
    study = args.study or base_name
    settings = TuneSettings(
        recipe=recipe,
        space=space,
        study_name=study,
        out_dir=args.runs_dir / "tune" / study,
        base_name=base_name,
        storage=args.storage,
        metric=metric,
        n_trials=args.n_trials,
        timeout=args.timeout,
        workers=args.workers,
        pruner=args.pruner,
        prune_after=args.prune_after,
        seed=args.seed,
        startup_trials=args.startup_trials,
        trial_overrides=tuple(config.parse_set(s) for s in args.trial_set),
        final_seeds=args.final_seeds,
        data_dir=args.data_dir,
        device=args.device,
        verbose=args.verbose,
        quiet=args.quiet,
        report=not args.no_report,
        plugins=tuple(getattr(args, "plugin", None) or ()),
    )
    settings.trial_recipe()  # --trial-set values checked before any work
    # `cifarlab tune | head`: the study goes on, its output is dropped; SIGTERM stops it as Ctrl-C does
    with stop_signals(), output_may_close():
        result = tune(settings, command="cifarlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if args.quiet:
        best = (
            f"best {settings.metric} {result.best_value:.4f} (trial {result.best_number})"
            if result.best_config
            else "no trial completed"
        )
        print(f"{result.out_dir}: {best}")
    return 0 if result.best_config is not None else 1
