"""Plugins: user code that registers models, augmentations, optimizers, schedules, recipes or callbacks before a
command runs, so the CLI can use them (`--set model=mynet`).

A plugin is a `.py` file or an importable module name. They come from `cifarlab --plugin FILE_OR_MODULE`
(repeatable), from `$CIFARLAB_PLUGINS` (separated by the path separator, ':' on Linux), and from installed
packages that declare an entry point in the group `cifarlab.plugins`. Loading a run folder never loads a plugin:
only what the user names runs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from cifarlab.errors import UserError

__all__ = ["ENV", "GROUP", "load_plugin", "load_plugins"]

ENV = "CIFARLAB_PLUGINS"
GROUP = "cifarlab.plugins"
_loaded: dict[str, ModuleType] = {}


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin: a path to a .py file, or a module name. Loading the same one twice is a no-op."""
    if spec in _loaded:
        return _loaded[spec]
    path = Path(spec).expanduser()
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise UserError(f"--plugin {spec}: no such file")
            name = f"cifarlab_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise UserError(f"--plugin {spec}: cannot load it as a Python file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except UserError:
        raise
    except ModuleNotFoundError as e:
        raise UserError(f"--plugin {spec}: module not found ({e}); pass a .py file or an importable module") from None
    except Exception as e:  # the plugin's own error: say which plugin, keep the cause
        raise UserError(f"--plugin {spec} failed while loading: {type(e).__name__}: {e}") from e
    _loaded[spec] = module
    return module


def load_plugins(specs: Iterable[str] = (), *, env: bool = True, entry_points: bool = True) -> list[ModuleType]:
    """Load the entry-point plugins, then `$CIFARLAB_PLUGINS`, then `specs`, in that order."""
    names: list[str] = []
    if entry_points:
        for ep in importlib.metadata.entry_points(group=GROUP):
            names.append(ep.value.split(":")[0])
    if env and os.environ.get(ENV):
        names += [s for s in os.environ[ENV].split(os.pathsep) if s.strip()]
    names += list(specs)
    return [load_plugin(s) for s in names]
