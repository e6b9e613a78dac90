"""cifarlab: train, evaluate, explain and serve CNN image classifiers for CIFAR-10 and datasets like it.

The Python API (see docs/API.md) is importable from here; heavy modules load on first use, so `cifarlab --help`
stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "fit": "cifarlab.api",
    "load": "cifarlab.api",
    "TrainedRun": "cifarlab.api",
    "Recipe": "cifarlab.recipes",
    "get_recipe": "cifarlab.recipes",
    "register_recipe": "cifarlab.recipes",
    "MODELS": "cifarlab.registry",
    "AUGMENTS": "cifarlab.registry",
    "OPTIMIZERS": "cifarlab.registry",
    "SCHEDULES": "cifarlab.registry",
    "CALLBACKS": "cifarlab.registry",
    "Callback": "cifarlab.train.callbacks",
    "from_arrays": "cifarlab.data",
    "from_torch_dataset": "cifarlab.data",
    "load_dataset": "cifarlab.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    import importlib
    import importlib.util

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # Submodules on first use too: `import cifarlab` then `cifarlab.errors.UserError`, `cifarlab.data.Dataset`.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
