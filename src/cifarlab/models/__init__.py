"""Models: each architecture is one file that registers a factory in `cifarlab.registry.MODELS`.

A factory takes `(recipe, num_classes, input_shape)` and returns an `nn.Module` mapping float images
(N, C, H, W) to logits. Models return logits; the softmax of the reference's output layer is applied by the
loss (log-softmax inside cross-entropy) and by `inference.predict_proba`. A model may define
`regularized_weights()` (the kernels the recipe's `l2` applies to) and `init_from_data(images)` (a
data-dependent init run once before training, e.g. the airnet's patch whitening).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from cifarlab.models.airnet import AirNet, init_whitening
from cifarlab.models.reference_cnn import ReferenceCNN
from cifarlab.models.summary import count_parameters, summary
from cifarlab.registry import MODELS

# Every module of this package registers its model on import: a new architecture is one new file here.
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MODELS", "AirNet", "ReferenceCNN", "build_model", "count_parameters", "init_whitening", "summary"]


def build_model(recipe: Any, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32)) -> nn.Module:
    """The registered model `recipe.model`, for `num_classes` classes and images of `input_shape` (C, H, W)."""
    net = MODELS.build(recipe.model, recipe, num_classes, tuple(input_shape))
    if not isinstance(net, nn.Module):  # else a foreign AttributeError (`.to`, `.parameters`) later
        raise MODELS.wrong_return(recipe.model, net, "an nn.Module (float images (N, C, H, W) -> logits)")
    return net
