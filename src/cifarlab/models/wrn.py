"""Wide-ResNet WRN-d-k (Zagoruyko & Komodakis 2016, "Wide Residual Networks"); WRN-16-8 has 11.0M parameters
for 32x32 RGB and 10 classes.

A 3x3 conv to 16 channels, then three groups of (d - 4) / 6 pre-activation basic blocks with 16k, 32k and 64k
channels (strides 1, 2, 2), BN-ReLU, global average pool and a linear head. The paper's dropout sits between
the two convs of each block (`dropout`, one rate; it used 0.3). d is the recipe's `depth`, k its
`width_factor`. The blocks are the pre-activation ResNet's (`PreActBlock`).
"""

from __future__ import annotations

from typing import Any

from cifarlab.errors import ConfigError
from cifarlab.models.preact_resnet import PreActResNet, scaled, stage_dropblock
from cifarlab.registry import MODELS

__all__ = ["WideResNet", "blocks_per_group"]


def blocks_per_group(depth: int) -> int:
    """n in the paper's depth = 6n + 4 (three groups of n blocks of two 3x3 convs, plus four layers)."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"depth={depth}: a Wide-ResNet has 6n + 4 layers (10, 16, 22, 28, 40, ...)")
    return (depth - 4) // 6


class WideResNet(PreActResNet):
    """WRN-depth-width_factor; `kwargs` go to `PreActResNet` (dropblock, stochastic_depth, BN settings)."""

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 16,
        width_factor: float = 8.0,
        in_channels: int = 3,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        n = blocks_per_group(depth)
        widths = tuple(scaled(w, width_factor) for w in (16, 32, 64))
        # The stem keeps 16 channels at any width, as in the paper's table 1.
        super().__init__(num_classes, (n, n, n), widths, in_channels, stem_width=16, dropout=dropout, **kwargs)


def _check(r: Any) -> None:
    if len(r.dropout) > 1:
        raise ConfigError(f"dropout={r.dropout!r}: wrn takes one rate (between its convs) or none, e.g. dropout=0.2")
    if (r.depth - 4) % 6:
        raise ConfigError(f"depth={r.depth}: a Wide-ResNet has 6n + 4 layers (10, 16, 22, 28, 40, ...)")


@MODELS.register("wrn", check=_check, uses=("depth", "width_factor"))
def wrn(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> WideResNet:
    """Wide-ResNet WRN-depth-width_factor (e.g. 16-8): 3 groups of pre-activation blocks, dropout between convs."""
    return WideResNet(
        num_classes,
        recipe.depth,
        recipe.width_factor,
        input_shape[0],
        dropout=recipe.dropout[0] if recipe.dropout else 0.0,
        dropblock=tuple(stage_dropblock(s, 3, recipe) for s in range(3)),
        stochastic_depth=recipe.stochastic_depth,
        bn_momentum=recipe.bn_momentum,
        bn_eps=recipe.bn_eps,
    )
