"""Recipe overrides: `--config FILE` (YAML, TOML or a run's config.json) and `--set key=value`, typed and
validated before any data is loaded.

Order: the named recipe (`--recipe`, else the file's `recipe:`, else the default), then the file's keys, then
each `--set` in the order given, then `recipes.validate` plus the cross-field checks below. Every error names
the key, the value and what is accepted.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cifarlab.data.dataset import canonical_dataset_name
from cifarlab.errors import ConfigError, UserError
from cifarlab.files import require_regular_file
from cifarlab.recipes import DEFAULT_RECIPE, RECIPES, Recipe, choices, field_types, get_recipe, validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pyproject installs tomli there)
    import tomli as tomllib

__all__ = [
    "accepted_keys",
    "add_recipe_args",
    "apply_overrides",
    "load_config_file",
    "machine_variant",
    "parse_set",
    "parse_value",
    "recipe_from_args",
    "resolve_recipe",
]

_TRUE = frozenset({"true", "1", "yes", "on", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "n"})
# Keys a config file may hold besides recipe fields.
_FILE_ONLY_KEYS = ("recipe",)


# A config is a few hundred bytes; anything this large is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1 << 20


def accepted_keys() -> list[str]:
    return sorted(field_types())


_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        plural = _PLURALS.get(args[0], f"{args[0]} values")
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural} (e.g. 64,128,128)"
        return f"a list of {len(args)} {plural}"
    if origin is typing.Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# Names other tools use for our keys: suggested (never silently accepted) when one is given.
_ALIASES = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "bs": "batch_size",
    "batch": "batch_size",
    "wd": "weight_decay",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "n_epochs": "epochs",
    "patience": "early_stopping_patience",
    "smoothing": "label_smoothing",
    "arch": "model",
    "architecture": "model",
    "amp": "precision",
    "mixed_precision": "precision",
}


def _unknown_key(key: str) -> ConfigError:
    keys = accepted_keys()
    norm = key.strip().lower().replace("-", "_")
    close = [_ALIASES[norm]] if norm in _ALIASES else difflib.get_close_matches(norm, keys, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown recipe key {key!r}{hint}; accepted keys: {', '.join(keys)}")


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not valid: expected {expected}")


def _scalar(key: str, raw: Any, tp: Any, where: str) -> Any:
    """One value of type `tp` from a string (--set, or a YAML string such as PyYAML's '1e-3') or a parsed
    YAML/TOML/JSON scalar. bool is checked before int because bool is a subclass of int."""
    label = f"{key}{where}"
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise _bad(label, raw, "true/false (also yes/no, 1/0)")
    if tp is int:
        if isinstance(raw, bool):
            raise _bad(label, raw, "an integer")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d[\d_]*\s*", raw):
            return int(raw)
        raise _bad(label, raw, "an integer (no decimal point)")
    if tp is float:
        if isinstance(raw, bool):
            raise _bad(label, raw, "a number")
        if isinstance(raw, (int, float)):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise _bad(label, raw, "a number such as 0.001 or 1e-3") from None
        else:
            raise _bad(label, raw, "a number")
        if not math.isfinite(value):  # nan slips through every `< 0` range check in validate
            raise _bad(label, raw, "a finite number")
        return value
    if tp is str or typing.get_origin(tp) is typing.Literal:
        if not isinstance(raw, str):
            raise _bad(label, raw, "a string")
        return raw.strip()
    raise ConfigError(f"{label}: values of type {tp} cannot be set from a config")  # pragma: no cover


def _split_list(raw: str) -> list[str]:
    s = raw.strip()
    if (s.startswith("[") and s.endswith("]")) or (s.startswith("(") and s.endswith(")")):
        s = s[1:-1]
    parts = [p.strip() for p in s.split(",")]
    if parts == [""]:
        return []  # "", "[]" and "()" mean an empty tuple (e.g. dropout=() for the airnet)
    if parts and parts[-1] == "":
        parts = parts[:-1]  # allow a trailing comma: "0.4,"
    return parts


def parse_value(key: str, raw: Any) -> Any:
    """`raw` (a --set string or a value from a config file) converted to the type of recipe field `key`.

    float accepts 1e-3; int rejects 1.5; bool accepts true/false/1/0/yes/no; tuples accept 64,128,128 or
    [64,128,128]; str fields with a fixed set of values (registered or Literal) must be one of them.
    """
    types = field_types()
    if key not in types:
        raise _unknown_key(key)
    tp = types[key]
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        items = _split_list(raw) if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise _bad(key, raw, _type_name(tp))
        if len(args) == 2 and args[1] is Ellipsis:
            elem_types = [args[0]] * len(items)
        else:
            if len(items) != len(args):
                raise _bad(key, raw, _type_name(tp))
            elem_types = list(args)
        pairs = enumerate(zip(items, elem_types, strict=True))
        return tuple(_scalar(key, v, t, f"[{i}]") for i, (v, t) in pairs)
    value = _scalar(key, raw, tp, "")
    allowed = choices(key)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; accepted values: {', '.join(allowed)}")
    return value


def parse_set(item: str) -> tuple[str, str]:
    """'key=value' -> (key, value); the value may itself contain '='."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=0.002")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key before '=' is empty")
    if key in _FILE_ONLY_KEYS:
        raise ConfigError("choose the base recipe with --recipe NAME (or `recipe:` in a --config file), not --set")
    return key, value


# -- config files --------------------------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: nested aliases ("billion laughs") expand exponentially."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted in a cifarlab config", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # YAML lets a later duplicate key win silently; `lr: 0.1` twice in a config is a mistake to report.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_problem(e: Exception) -> str:
    """A YAML error on one line: where and what (str(e) spans several lines, with a caret)."""

    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    return (f"line {mark.line + 1}: " if mark is not None else "") + str(what)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


# The sections of a run's config.json besides "recipe" (`experiment._config`, plus `report`): what `--config
# run/config.json` reads past. `seed`, `dataset` and `precision` share a recipe key's name but are the run's record.
RUN_CONFIG_SECTIONS = (
    "budget",
    "command",
    "data_dir",
    "dataset",
    "deterministic",
    "distributed",
    "init",
    "machine",
    "model_class",
    "normalization",
    "precision",
    "report",
    "seed",
    "versions",
)


def _check_run_sections(path: Path, data: dict[str, Any], recipe: dict[str, Any]) -> None:
    """A run's config.json as --config: a key edited or added at top level (where the recipe is not) is refused,
    not dropped."""
    for key in data:
        if key == "recipe":
            continue
        if key == "seed" and "seed" in recipe and data["seed"] != recipe["seed"]:
            raise ConfigError(
                f"--config {path}: the top-level seed ({data['seed']!r}) is the run's record of recipe.seed "
                f'({recipe["seed"]!r}); change the seed under "recipe" or use --set seed=...'
            )
        if key in RUN_CONFIG_SECTIONS:
            continue
        if key in field_types():
            raise ConfigError(
                f"--config {path}: {key!r} is a recipe key at the top level of a run's config.json, where it would "
                f'be ignored; put it under "recipe" or use --set {key}=...'
            )
        close = difflib.get_close_matches(key, [*RUN_CONFIG_SECTIONS, *field_types()], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f'--config {path}: unknown top-level key {key!r} in a run\'s config.json{hint}; it holds "recipe" '
            f"and the run's sections: {', '.join(RUN_CONFIG_SECTIONS)}"
        )


def load_config_file(path: Path | str) -> dict[str, Any]:
    """A flat mapping of recipe keys (plus an optional `recipe: NAME`) from YAML (.yaml/.yml), TOML (.toml) or
    JSON (.json). A run's config.json (whose `recipe` is the full recipe mapping) is accepted too, so
    `--config runs/<run>/config.json` re-creates that run's recipe."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; give a .yaml, .toml or .json file")
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"--config {path}: unknown file type {suffix or '(none)'!r}; use .yaml, .yml, .toml or .json")
    try:
        require_regular_file(path, "config file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config {path}: {size:,} bytes is too large for a config file (limit 1 MiB)")
        text = path.read_text(encoding="utf-8")
    except ConfigError:
        raise  # already names --config and the file
    except UserError as e:
        raise ConfigError(f"--config {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({e})") from None
    if suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
        except _DuplicateKey as e:  # as YAML's loader: a later duplicate silently won
            raise ConfigError(
                f"--config {path}: not valid as a config ({e.args[0]!r} appears twice in one mapping)"
            ) from None
    else:
        try:
            data = yaml.load(text, Loader=_NoAliasLoader)  # plain data only: no tags, no aliases
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({yaml_problem(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"--config {path}: expected a mapping of recipe keys (e.g. `lr: 0.002`), got {type(data).__name__}"
        )
    data = dict(data)
    # A run folder's config.json: take its full recipe mapping; the run's other sections say what it was trained
    # on and how, and are ignored. Anything else at top level would be ignored without a word: refused.
    if isinstance(data.get("recipe"), Mapping):
        full = dict(data["recipe"])
        _check_run_sections(path, data, full)
        name = full.get("name")
        return {"recipe": name if name in RECIPES else None, **full}
    for key, value in data.items():
        if isinstance(value, Mapping):
            raise ConfigError(
                f"--config {path}: key {key!r} holds a nested table; write recipe keys flat (e.g. `lr: 0.002`)"
            )
    return data


# -- resolution ----------------------------------------------------------------------------------------------


def apply_overrides(recipe: Recipe, overrides: Sequence[tuple[str, Any]], source: str = "--set") -> Recipe:
    """Apply (key, raw value) pairs in order; raises ConfigError naming the first bad key or value."""
    changes: dict[str, Any] = {}
    for key, raw in overrides:
        try:
            changes[key] = parse_value(key, raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return recipe.replace(**changes) if changes else recipe


def _canonical_dataset(value: str, data_dir: Path | None) -> str:
    """cifar10 / cifar100 / fashion_mnist under any spelling (CIFAR-10, Fashion-MNIST), else a path; a relative
    path that only exists inside `data_dir` (as `cifarlab.data.load_dataset` would find it) is recorded as that
    absolute path."""
    named = canonical_dataset_name(value)
    if named is not None:
        return named
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute() or data_dir is None:
        # Absolute, so the run's evaluate/report/--resume find it from any working directory.
        return str(path.resolve()) if path.exists() else value
    for suffix in ("", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz"):
        candidate = Path(data_dir).expanduser() / f"{value}{suffix}"
        if candidate.exists():
            return str(candidate.resolve())
    return value


def resolve_recipe(
    name: str | None = None,
    config_file: Path | str | None = None,
    sets: Sequence[str] = (),
    *,
    data_dir: Path | str | None = None,
    device: str | None = None,
) -> Recipe:
    """The named recipe with a config file's keys and then each `KEY=VALUE` in `sets` applied, validated.

    `name` None: the config file's `recipe:` key, else the default recipe. An explicit `name` wins over the
    file's `recipe:` (the command line overrides the file, like --set does). Raises ConfigError before any
    data is touched. `device` (what `--device` says; None: leave the choice of variant alone): where the
    result would train in fp32 on a CPU and names a `cpu_fp32_variant`, that recipe is the base instead (the
    same file keys and --set values applied to it; see `machine_variant`).
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = load_config_file(config_file)
    file_recipe = file_values.pop("recipe", None)
    if file_recipe is not None and not isinstance(file_recipe, str):
        raise ConfigError(
            f"--config {config_file}: recipe={file_recipe!r} must be a recipe name ({', '.join(RECIPES)})"
        )

    def build(base: Recipe) -> Recipe:
        recipe = apply_overrides(base, list(file_values.items()), source=f"--config {config_file}")
        recipe = apply_overrides(recipe, [parse_set(s) for s in sets], source="--set")
        return recipe.replace(dataset=_canonical_dataset(recipe.dataset, Path(data_dir) if data_dir else None))

    base = get_recipe(name or file_recipe or DEFAULT_RECIPE)
    recipe = build(base)
    variant = machine_variant(recipe, device) if device is not None else None
    if variant is not None:
        base = get_recipe(variant)
        recipe = build(base)
    return validate(recipe, base=base)  # (a size key the model ignores must keep the base's value)


def machine_variant(recipe: Recipe, device: str) -> str | None:
    """The recipe `recipe` hands over to on this machine: its `cpu_fp32_variant` where it would train in fp32 on a
    CPU (no bf16 there, or precision=fp32), else None: for a recipe whose best settings differ where a step costs
    5-6x a bf16 one. No built-in recipe names one today (`fast` serves both kinds of CPU)."""
    if not recipe.cpu_fp32_variant:
        return None
    from cifarlab.device import autocast_dtype, resolve_device

    dev = resolve_device(device)
    if dev.type != "cpu" or autocast_dtype(recipe.precision, dev) is not None:
        return None
    get_recipe(recipe.cpu_fp32_variant)  # an unknown name is an error, not a silent fallback
    return recipe.cpu_fp32_variant


# -- argparse wiring -----------------------------------------------------------------------------------------


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """--recipe NAME, --config FILE, --set KEY=VALUE (repeatable) on a subcommand's parser (see
    `cifarlab.cli.common.add_recipe_args`, which the commands' parsers call without importing this module)."""
    from cifarlab.cli.common import add_recipe_args as add

    add(parser)


def recipe_from_args(args: argparse.Namespace, device: str | None = None) -> Recipe:
    """The validated recipe from add_recipe_args' options (and --data-dir, used to find a dataset path); with
    `device`, the recipe's variant for that device where it has one (`machine_variant`)."""
    return resolve_recipe(
        getattr(args, "recipe", None),
        getattr(args, "config", None),
        getattr(args, "set", None) or (),
        data_dir=getattr(args, "data_dir", None),
        device=device,
    )
