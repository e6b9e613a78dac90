"""The reference talk's Keras CNN (752,650 parameters for 32x32 RGB and 10 classes, as Keras counts them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models.dropblock import dropblock_layer, refuse_unused
from cifarlab.registry import MODELS


class ReferenceCNN(nn.Module):
    """Conv(64)-BN-Pool, Conv(128)-BN-Pool, Conv(128)-BN-Pool, Dropout, Dense 256-BN-Dropout, Dense 10.

    Keras' Conv2D(activation="relu") applies ReLU before the BatchNormalization that follows it, so the
    order here is conv -> ReLU -> BN -> pool. Keras' Flatten works on NHWC; ours flattens NCHW. With
    random init this is the same model up to a fixed permutation of the dense layer's inputs.

    `dropblock=(block_size, drop_prob)` with drop_prob > 0 adds DropBlock after the pooling of the last two
    stages. It goes into the pool's slot, as Sequential(pool, DropBlock): pools and DropBlock hold no parameters,
    so every state-dict key stays the same, and at drop_prob 0 nothing is added at all.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 128, 128),
        dense_width: int = 256,
        dropout: tuple[float, ...] = (0.4, 0.3),
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        dropblock: tuple[int, float] = (3, 0.0),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, height, width = input_shape
        if min(height, width) < 2 ** len(widths):
            raise ConfigError(
                f"{len(widths)} pooling blocks need images of at least {2 ** len(widths)} px; got {height}x{width} "
                "(NHWC arrays are read as channels-last only with 1, 3 or 4 channels)"
            )
        for s, w in enumerate(widths):
            pool: nn.Module = nn.MaxPool2d(2)
            drop = dropblock_layer(*dropblock) if s >= len(widths) - 2 else None
            if drop is not None:
                pool = nn.Sequential(pool, drop)
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.BatchNorm2d(w, eps=bn_eps, momentum=bn_momentum),
                pool,
            ]
            c_in = w
        self.features = nn.Sequential(*layers)
        flat = c_in * (height // 2 ** len(widths)) * (width // 2 ** len(widths))
        d_in, d_hidden = dropout if len(dropout) == 2 else (0.0, 0.0)
        self.head = nn.Sequential(
            nn.Dropout(d_in),
            nn.Flatten(),
            nn.Linear(flat, dense_width),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(dense_width, eps=bn_eps, momentum=bn_momentum),
            nn.Dropout(d_hidden),
            nn.Linear(dense_width, num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Keras defaults: glorot-uniform kernels, zero biases (PyTorch's default is kaiming-uniform).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def regularized_weights(self) -> list[torch.Tensor]:
        """The kernels Keras' kernel_regularizer=l2(...) applies to (not biases, not BN)."""
        return [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def saliency_layer(self) -> nn.Module:
        """The last convolution, the layer Grad-CAM explains (`cifarlab.explain`)."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)][-1]

    def stages(self) -> list[nn.Module]:
        """The conv blocks (conv, ReLU, BN, pool), input first: what the recipe's `freeze_stages` freezes. The
        dense layers are not stages: a fine-tuned model always trains its classifier."""
        return [self.features[i : i + 4] for i in range(0, len(self.features), 4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _check(r: Any) -> None:
    if len(r.dropout) not in (0, 2):  # the model drops dropout unless it gets exactly two rates
        raise ConfigError(
            f"dropout={r.dropout!r}: the reference_cnn takes two rates (before the dense layer, after it), "
            "e.g. 0.4,0.3, or () for none"
        )
    refuse_unused(r, "reference_cnn", ("stochastic_depth",))


@MODELS.register("reference_cnn", check=_check, uses=("widths", "dense_width"))
def reference_cnn(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> ReferenceCNN:
    """The talk's Keras CNN: three conv-ReLU-BN-pool blocks, dropout, Dense 256-BN, dropout, Dense."""
    return ReferenceCNN(
        num_classes,
        recipe.widths,
        recipe.dense_width,
        recipe.dropout,
        recipe.bn_momentum,
        recipe.bn_eps,
        input_shape=input_shape,
        dropblock=(recipe.dropblock_size, recipe.dropblock_prob),
    )
