"""Plugins: user code that registers models, augmentations, optimizers, schedules, recipes or callbacks before a
command runs, so the CLI can use them (`--set model=mynet`).

A plugin is a `.py` file or an importable module name. They come from `cifarlab --plugin FILE_OR_MODULE`
(repeatable), from `$CIFARLAB_PLUGINS` (separated by the path separator, ':' on Linux), and from installed
packages that declare an entry point in the group `cifarlab.plugins`. Loading a run folder never loads a plugin:
only what the user names runs.

- The built-in entries are registered before the first plugin loads, so a plugin may override one with
  `register(name, replace=True)`; reusing a name without `replace=True` is an error that names the plugin's line.
- While a `.py` plugin is imported, its folder is first on `sys.path` (as Python does for a script), so it can
  import modules beside it (`import helper` for `helper.py`). The folder is taken off again afterwards: import
  such modules at the plugin's top level, not first inside a function that runs later.
- A plugin loads once per process: the same file under two spellings (`myplugin.py`, `./myplugin.py`, its
  absolute path, `--plugin` and `$CIFARLAB_PLUGINS`) is one plugin.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import site
import sys
import sysconfig
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from cifarlab.errors import UserError
from cifarlab.registry import load_builtins

__all__ = [
    "ENV",
    "GROUP",
    "command_plugins",
    "is_loaded",
    "is_user_file",
    "load_plugin",
    "load_plugins",
    "plugin_key",
    "raised_in_user_code",
]

ENV = "CIFARLAB_PLUGINS"
GROUP = "cifarlab.plugins"
# Loaded plugins by key: a .py file's resolved path, else the module name.
_loaded: dict[str, ModuleType] = {}


def _is_file_spec(spec: str, path: Path) -> bool:
    return spec.endswith(".py") or path.is_file()


def _module_name(path: Path) -> str:
    """`cifarlab_plugin_<stem>`, made unique when another file of the same stem is loaded already."""
    base = name = f"cifarlab_plugin_{path.stem}"
    k = 2
    while name in sys.modules and Path(getattr(sys.modules[name], "__file__", "") or "").resolve() != path:
        name, k = f"{base}_{k}", k + 1
    return name


@functools.cache
def _roots() -> tuple[str, tuple[str, ...]]:
    """cifarlab's folder, and the folders of the standard library and of installed packages (with a separator
    at the end, for prefix tests)."""
    paths = sysconfig.get_paths()
    libs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    libs.update(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE and site.USER_SITE:
        libs.add(site.USER_SITE)
    here = os.path.realpath(os.path.dirname(__file__)) + os.sep
    return here, tuple(sorted({os.path.realpath(p) + os.sep for p in libs}))


def _kind(filename: str) -> str:
    """'cifarlab', 'library' (the standard library, installed packages, Python's frozen and generated code) or
    'user' for the file of a traceback frame."""
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return "library"
    path = os.path.realpath(filename)
    here, libs = _roots()
    if path.startswith(here):  # first: an installed cifarlab lives in site-packages
        return "cifarlab"
    return "library" if path.startswith(libs) else "user"


def is_user_file(filename: str) -> bool:
    """Whether a traceback frame's file is user code: not cifarlab, the standard library or an installed package."""
    return _kind(filename) == "user"


def raised_in_user_code(exc: BaseException) -> bool:
    """Whether `exc` came from user code (a plugin's callback, a script): the innermost frame of its traceback that
    is not in the standard library or an installed package is outside cifarlab. An OSError from there is a bug to
    show with its traceback; one from cifarlab's own code (a full disk) is a one-line message."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        kind = _kind(frame.filename)
        if kind != "library":
            return kind == "user"
    return False


def _location(exc: BaseException, origin: Path | None) -> str:
    """Where in the plugin the error happened: the last traceback frame in its file (for a SyntaxError, the
    line Python could not read), plus the innermost frame of user code elsewhere (a module the plugin imports)
    when that is where it raised."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}, line {exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if origin is not None and os.path.realpath(f.filename) == str(origin)]
    where = ""
    if mine:
        f = mine[-1]
        where = f"{f.filename}, line {f.lineno}" + (f", in {f.name}" if f.name != "<module>" else "")
    inner = next((f for f in reversed(frames) if is_user_file(f.filename)), None)
    if inner is not None and (not mine or inner is not mine[-1]):
        raised = f"{inner.filename}, line {inner.lineno}, in {inner.name}"
        where = f"{where}; raised at {raised}" if where else raised
    return where


def _load_file(spec: str, path: Path) -> ModuleType:
    name = _module_name(path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--plugin {spec}: cannot load it as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)  # as for a script: it imports the modules beside it
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)  # half a module: a second try runs it again, not this
        raise
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:  # the plugin took it off itself
            pass
    return module


def plugin_key(spec: str) -> str:
    """How a plugin is known once loaded, and recorded in a run's config.json: a .py file's absolute resolved path
    (the same file under any spelling), else the module name."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if _is_file_spec(spec, path) and path.is_file() else spec


def is_loaded(recorded: str) -> bool:
    """Whether the plugin a run recorded (`plugin_key`) is loaded in this process: that file or module, or for a
    file that was moved, a loaded .py plugin of the same file name."""
    if plugin_key(recorded) in _loaded or recorded in _loaded:
        return True
    if not recorded.endswith(".py"):
        return False
    name = Path(recorded).name
    return any(key.endswith(".py") and Path(key).name == name for key in _loaded)


def command_plugins(specs: Iterable[str] = ()) -> list[str]:
    """The plugins a command named, as a run records them (`plugin_key`, each once): `$CIFARLAB_PLUGINS`'s, then
    `specs` (its --plugin arguments). Not the entry-point plugins: an installed package loads them every time."""
    names = [s for s in os.environ.get(ENV, "").split(os.pathsep) if s.strip()] + list(specs)
    return list(dict.fromkeys(plugin_key(s) for s in names))


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin: a path to a .py file, or a module name. Loading the same one twice (under any spelling
    of its path) is a no-op. The built-in registry entries are registered first, so a plugin can override them."""
    path = Path(spec).expanduser()
    is_file = _is_file_spec(spec, path)
    key = plugin_key(spec)
    if key in _loaded:
        return _loaded[key]
    load_builtins()
    origin: Path | None = path.resolve() if is_file and path.is_file() else None
    try:
        if is_file:
            if origin is None:
                raise UserError(f"--plugin {spec}: no such file")
            module = _load_file(spec, origin)
        else:
            origin = _find_origin(spec)
            module = importlib.import_module(spec)
    except UserError:
        raise
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not is_file and (spec == missing or spec.startswith(f"{missing}.")):
            raise UserError(
                f"--plugin {spec}: module not found ({e}); pass a .py file or an importable module"
            ) from None
        where = _location(e, origin)
        raise UserError(
            f"--plugin {spec}: the plugin's import of {missing or 'a module'!r} failed ({e})"
            + (f" at {where}" if where else "")
            + "; install it, or put it where Python finds it (a .py plugin also finds modules in its own folder)"
        ) from e
    except Exception as e:  # the plugin's own error: say which plugin and where, keep the cause
        where = _location(e, origin)
        raise UserError(
            f"--plugin {spec} failed while loading" + (f" at {where}" if where else "") + f": {type(e).__name__}: {e}"
        ) from e
    _loaded[key] = module
    return module


def _find_origin(spec: str) -> Path | None:
    """The file a module plugin would load from, if Python can tell without importing it (for error lines)."""
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):  # a parent package is missing or broken: the import reports it
        return None
    if found is None or not found.origin or found.origin in ("built-in", "frozen"):
        return None
    return Path(found.origin).resolve()


def load_plugins(specs: Iterable[str] = (), *, env: bool = True, entry_points: bool = True) -> list[ModuleType]:
    """Load the entry-point plugins, then `$CIFARLAB_PLUGINS`, then `specs`, in that order (each once)."""
    names: list[str] = []
    if entry_points:
        for ep in importlib.metadata.entry_points(group=GROUP):
            names.append(ep.value.split(":")[0])
    if env and os.environ.get(ENV):
        names += [s for s in os.environ[ENV].split(os.pathsep) if s.strip()]
    names += list(specs)
    modules: list[ModuleType] = []
    for s in names:
        module = load_plugin(s)
        if all(module is not m for m in modules):
            modules.append(module)
    return modules
