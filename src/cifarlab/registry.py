"""Registries: the accepted values of every recipe choice come from what is registered.

As in timm's `@register_model`, a new model, augmentation, optimizer or LR schedule is one decorated function
in one file. The recipe checks, `--set`, `cifarlab config` and the report read the registries, so nothing
else needs editing:

    from cifarlab.registry import AUGMENTS

    @AUGMENTS.register("cutout", description="random 8x8 square set to zero")
    def cutout(recipe):
        return MyCutout(size=8)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cifarlab.errors import ConfigError

__all__ = ["AUGMENTS", "CALLBACKS", "MODELS", "OPTIMIZERS", "SCHEDULES", "Entry", "Registry"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    fn: F
    description: str
    check: Callable[[Any], None] | None = None  # recipe rules of this entry (raise ConfigError), run by validate


class Registry(Generic[F]):
    """Named factories of one kind ("model", "augmentation", ...), in registration order."""

    def __init__(self, kind: str, recipe_key: str) -> None:
        self.kind = kind
        self.recipe_key = recipe_key  # the Recipe field whose value names an entry
        self._entries: dict[str, Entry[F]] = {}

    def register(
        self,
        name: str | None = None,
        *,
        description: str = "",
        replace: bool = False,
        check: Callable[[Any], None] | None = None,
    ) -> Callable[[F], F]:
        """Decorator: register `fn` under `name` (default: its __name__). The description (default: the first
        line of its docstring) is what the report and `cifarlab config` show. `check(recipe)`, if given, raises
        a ConfigError for recipe values this entry cannot take; `recipes.validate` runs it whenever the recipe
        names this entry, so the rules of a model live in the model's file."""

        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries and not replace:
                raise ValueError(f"{self.kind} {key!r} is already registered (pass replace=True to override it)")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[key] = Entry(key, fn, description or (doc[0] if doc else key), check)
            return fn

        return deco

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Entry[F]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"{self.recipe_key}={name!r} is not valid; accepted values: {', '.join(self._entries)}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name).fn(*args, **kwargs)

    def describe(self, name: str) -> str:
        return self.get(name).description


# The registries. Their entries live beside what they build (models/, augment.py, train/optim.py); recipes.py
# imports those modules, so the built-in entries are registered once any recipe is used.
MODELS: Registry[Callable[..., Any]] = Registry("model", "model")
AUGMENTS: Registry[Callable[..., Any]] = Registry("augmentation", "augment")
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer", "optimizer")
SCHEDULES: Registry[Callable[..., Any]] = Registry("LR schedule", "schedule")
# Callbacks a recipe switches on by name (`--set callbacks=name1,name2`): a factory `(recipe) -> Callback`.
CALLBACKS: Registry[Callable[..., Any]] = Registry("callback", "callbacks")
