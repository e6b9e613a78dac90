"""Registries: the accepted values of every recipe choice come from what is registered.

As in timm's `@register_model`, a new model, augmentation, optimizer or LR schedule is one decorated function
in one file. The recipe checks, `--set`, `cifarlab config` and the report read the registries, so nothing
else needs editing:

    from cifarlab.registry import AUGMENTS

    @AUGMENTS.register("cutout", description="random 8x8 square set to zero")
    def cutout(recipe):
        return MyCutout(size=8)

The built-in entries register when their modules are imported (`load_builtins`). A registration from code
outside cifarlab (a plugin, a script) loads them first, so its `replace=True` overrides a built-in whatever the
import order, and a name it reuses without `replace=True` is refused right there, at the user's line.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cifarlab.errors import ConfigError

__all__ = [
    "AUGMENTS",
    "BUILTIN_RECIPES",
    "CALLBACKS",
    "DEFAULT_RECIPE",
    "MODELS",
    "OPTIMIZERS",
    "REGISTRIES",
    "SCHEDULES",
    "Entry",
    "Registry",
    "load_builtins",
    "recipe_names",
    "registered_description",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    fn: F
    description: str
    check: Callable[[Any], None] | None = None  # recipe rules of this entry (raise ConfigError), run by validate
    # A model's: the model-size recipe keys it reads (`Recipe` fields marked `size=True`: widths, depth, ...);
    # validate refuses a changed value of the others. None: not declared (not checked).
    uses: frozenset[str] | None = None


class Registry(Generic[F]):
    """Named factories of one kind ("model", "augmentation", ...), in registration order."""

    def __init__(self, kind: str, recipe_key: str, var: str = "") -> None:
        self.kind = kind
        self.recipe_key = recipe_key  # the Recipe field whose value names an entry
        self.var = var or f"{kind.upper()}S"  # the name users import it by, for messages
        self._entries: dict[str, Entry[F]] = {}
        # Entries seen only by the code running inside `overlay` (this thread or task), over the shared ones
        self._overlay: contextvars.ContextVar[dict[str, Entry[F]] | None] = contextvars.ContextVar(
            f"cifarlab.registry.{kind}.overlay", default=None
        )

    def _visible(self) -> dict[str, Entry[F]]:
        over = self._overlay.get()
        return {**self._entries, **over} if over else self._entries

    @contextlib.contextmanager
    def overlay(self, name: str, fn: F, *, description: str = "") -> Iterator[None]:
        """`name` builds with `fn` for the code inside this block only: this thread (or asyncio task) sees it over
        any shared entry of that name; other threads, and this one afterwards, see the registry unchanged.
        (`cifarlab.load(run, model=...)`: a run's model given as an instance, without a registration that two
        threads loading two runs would overwrite.)"""
        token = self._overlay.set({**(self._overlay.get() or {}), name: Entry(name, fn, description or name)})
        try:
            yield
        finally:
            self._overlay.reset(token)

    def register(
        self,
        name: str | None = None,
        *,
        description: str = "",
        replace: bool = False,
        check: Callable[[Any], None] | None = None,
        uses: Iterable[str] | None = None,
    ) -> Callable[[F], F]:
        """Decorator: register `fn` under `name` (default: its __name__). The description (default: the first
        line of its docstring) is what the report and `cifarlab config` show. `check(recipe)`, if given, raises
        a ConfigError for recipe values this entry cannot take; `recipes.validate` runs it whenever the recipe
        names this entry, so the rules of a model live in the model's file. `uses` (models): the model-size keys
        the factory reads, e.g. `uses=("widths",)`; `recipes.validate` then refuses a value of another size key
        (widths, depth, width_factor, dense_width, whiten_kernel, whiten_width, head_scale) changed from the
        recipe's, which the model would ignore, and `--budget` scales `widths` or `width_factor` if it is among
        them. Left out, nothing is checked and `--budget` plans epochs only."""
        used = None if uses is None else frozenset((uses,) if isinstance(uses, str) else uses)

        def deco(fn: F) -> F:
            key = name or fn.__name__
            if not _is_builtin(fn):
                # User code: the built-ins first, else a built-in registering later would clash with (or silently
                # undo) this entry, and the error would point into cifarlab instead of at the user's line.
                load_builtins()
            if key in self._entries and not replace:
                raise ValueError(
                    f"{self.kind} {key!r} is already registered (pass replace=True to override it: "
                    f"@{self.var}.register({key!r}, replace=True))"
                )
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[key] = Entry(key, fn, description or (doc[0] if doc else key), check, used)
            return fn

        return deco

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._visible())

    def __contains__(self, name: object) -> bool:
        return name in self._visible()

    def __iter__(self) -> Iterator[str]:
        return iter(self._visible())

    def __len__(self) -> int:
        return len(self._visible())

    def get(self, name: str) -> Entry[F]:
        entries = self._visible()
        try:
            return entries[name]
        except KeyError:
            raise ConfigError(
                f"{self.recipe_key}={name!r} is not valid; accepted values: {', '.join(entries)}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name).fn(*args, **kwargs)

    def describe(self, name: str) -> str:
        return self.get(name).description

    def wrong_return(self, name: str, value: Any, must: str) -> ConfigError:
        """The error for a factory that returned `value` where it must return `must`: it names the entry, its
        function and file, and what came back, so the user's bug is found before (or instead of) a late, foreign
        error deep in training."""
        fn = self.get(name).fn
        code = getattr(fn, "__code__", None)
        where = f" ({code.co_filename}, line {code.co_firstlineno})" if code is not None else ""
        qualname = getattr(fn, "__qualname__", repr(fn))
        return ConfigError(
            f"{self.recipe_key}={name!r}: the registered {self.kind} factory {qualname}{where} returned "
            f"{_returned(value)}; it must return {must}"
        )


def _returned(value: Any) -> str:
    """What a factory returned, in words, with the likely fix for the common slips."""
    if value is None:
        return "None (is its `return` missing?)"
    if isinstance(value, type):
        return f"the class {value.__qualname__} itself (create one: return {value.__name__}(...))"
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"a {type(value).__qualname__} ({text})"


# The registries. Their entries live beside what they build (models/, augment.py, train/optim.py,
# train/techniques.py); `load_builtins` imports those modules.
MODELS: Registry[Callable[..., Any]] = Registry("model", "model", "MODELS")
AUGMENTS: Registry[Callable[..., Any]] = Registry("augmentation", "augment", "AUGMENTS")
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer", "optimizer", "OPTIMIZERS")
SCHEDULES: Registry[Callable[..., Any]] = Registry("LR schedule", "schedule", "SCHEDULES")
# Callbacks a recipe switches on by name (`--set callbacks=name1,name2`): a factory `(recipe) -> Callback`.
CALLBACKS: Registry[Callable[..., Any]] = Registry("callback", "callbacks", "CALLBACKS")
REGISTRIES: tuple[Registry[Callable[..., Any]], ...] = (MODELS, AUGMENTS, OPTIMIZERS, SCHEDULES, CALLBACKS)

# The built-in recipes' names, in the order of `cifarlab.recipes.RECIPES`, and the default recipe: here, so that
# `--recipe`'s help lists them without importing cifarlab.recipes, which imports torch (~1-3 s of every
# `cifarlab train --help` or mistyped option). tests/test_cli.py checks that they match RECIPES.
BUILTIN_RECIPES: tuple[str, ...] = ("reference", "fast", "air94", "resnet18", "wrn16_8", "effnet_b0")
DEFAULT_RECIPE = "fast"


def recipe_names() -> tuple[str, ...]:
    """The names `--recipe` accepts, plugins' recipes included, without importing torch where none can have been
    added: a recipe is registered through cifarlab.recipes (and a plugin loads the built-ins, that module among
    them, before it runs), so while that module is not imported the built-in names are the whole list."""
    recipes = sys.modules.get("cifarlab.recipes")
    return tuple(recipes.RECIPES) if recipes is not None else BUILTIN_RECIPES


# The modules whose import registers the built-in entries (recipes.py: the built-in recipes, and it imports
# the others too).
_BUILTIN_MODULES = (
    "cifarlab.models",
    "cifarlab.augment",
    "cifarlab.train.optim",
    "cifarlab.train.techniques",
    "cifarlab.recipes",
)
_builtins = "no"  # "no", "loading", "yes"


def _is_builtin(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return module == "cifarlab" or module.startswith("cifarlab.")


def load_builtins() -> None:
    """Register every built-in model, augmentation, optimizer, schedule, callback and recipe (once). Plugins
    load after this, so a plugin's `replace=True` wins over a built-in and a clash is reported at its line."""
    global _builtins
    if _builtins != "no":  # done, or under way further up this stack
        return
    _builtins = "loading"
    try:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    except BaseException:
        _builtins = "no"
        raise
    _builtins = "yes"


def registered_description(key: str, value: Any) -> str | None:
    """The registered description of a recipe value (`model: airnet` -> the airnet's line), for `cifarlab config`
    and the report; a list value (`callbacks`) gives `name: description` for each. None where nothing is
    registered under the value, or its description is only its name."""
    reg = next((r for r in REGISTRIES if r.recipe_key == key), None)
    if reg is None:
        return None

    def one(name: Any) -> str | None:
        if not isinstance(name, str) or name not in reg:
            return None
        # One line, whatever the description held; without its full stop, as it is one note among others.
        text = " ".join(reg.describe(name).split()).removesuffix(".")
        return text if text and text != name else None

    if isinstance(value, (list, tuple)):
        parts = [f"{name}: {d}" for name in value if (d := one(name)) is not None]
        return "; ".join(parts) or None
    return one(value)
