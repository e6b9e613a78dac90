"""DropBlock (Ghiasi, Lin, Le 2018, "DropBlock: A regularization method for convolutional networks").

Dropout on a feature map drops single pixels, which neighbouring pixels largely restore; DropBlock drops whole
`block_size` x `block_size` squares instead, so the network cannot read the dropped region from its
surroundings. Algorithm 1 of the paper, per sample and per channel (the paper's better variant):

1. gamma = drop_prob / block_size**2 * (H * W) / ((H - block_size + 1) * (W - block_size + 1)), so that the
   expected share of dropped units is about drop_prob although blocks are seeded only where they fit;
2. seeds ~ Bernoulli(gamma) on the valid region (every block lies inside the map);
3. every seed zeroes the block_size square it anchors;
4. the kept units are scaled by count(mask) / count_ones(mask).

A map smaller than `block_size` clips the block to the map in that dimension (a 3-block on a 2x8 map drops
2x3 rectangles). The layer is the identity in eval mode and at drop_prob 0, and it has no parameters or
buffers, so inserting it changes no state-dict key. `drop_prob` is the current probability: a schedule
(`cifarlab.train.techniques.DropBlockSchedule`, the paper's linear ramp) moves it from 0 to `target_prob`.

`DropPath` (stochastic depth, Huang et al. 2016) lives here too: the same idea one level up, dropping a whole
residual branch per sample. The deeper models share both. `refuse_unused` is the recipe check of a model that
lacks some of these regularizers: a value the model would ignore is an error, not a silent no-op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import ConfigError

__all__ = ["DropBlock2d", "DropPath", "block_sizes", "dropblock_gamma", "dropblock_layer", "refuse_unused"]

_REGULARIZERS = {"dropout": "dropout", "dropblock_prob": "DropBlock", "stochastic_depth": "residual blocks to drop"}


def refuse_unused(recipe: Any, model: str, keys: tuple[str, ...]) -> None:
    """Raise ConfigError if any of `keys` (dropout, dropblock_prob, stochastic_depth) is set: `model` has no use
    for it, and training without what the user asked for would mislead them."""
    for key in keys:
        value = getattr(recipe, key)
        if value:
            off = "()" if isinstance(value, tuple) else "0"
            raise ConfigError(
                f"{key}={value!r}: model {model} has no {_REGULARIZERS[key]}, so the value would be ignored; "
                f"set {key}={off}, or pick a model that has it"
            )


def block_sizes(block_size: int, height: int, width: int) -> tuple[int, int]:
    """The block's (height, width) on a height x width map: block_size, clipped to the map."""
    return min(block_size, height), min(block_size, width)


def dropblock_gamma(drop_prob: float, block_size: int, height: int, width: int) -> float:
    """The paper's seed rate gamma for a height x width map (clipped blocks use their clipped area)."""
    bh, bw = block_sizes(block_size, height, width)
    valid = (height - bh + 1) * (width - bw + 1)
    return min(1.0, drop_prob / (bh * bw) * (height * width) / valid)


class DropBlock2d(nn.Module):
    """Drop `block_size` squares of each channel of (N, C, H, W) maps with total probability about `drop_prob`."""

    def __init__(self, block_size: int = 3, drop_prob: float = 0.1) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.block_size = block_size
        self.target_prob = drop_prob  # what a schedule ramps up to
        self.drop_prob = drop_prob  # the probability in use now

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, drop_prob={self.drop_prob:g}, target_prob={self.target_prob:g}"

    def block_mask(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """A float32 keep-mask (1 keep, 0 drop) of `shape` (N, C, H, W), drawn from the global torch RNG."""
        n, c, h, w = shape
        bh, bw = block_sizes(self.block_size, h, w)
        gamma = dropblock_gamma(self.drop_prob, self.block_size, h, w)
        # Seeds anchor a block's top-left corner in the valid region (the paper's centres, shifted by a constant).
        seeds = (torch.rand(n, c, h - bh + 1, w - bw + 1, device=device) < gamma).float()
        # Unit (i, j) is dropped when a seed lies in the bh x bw window above-left of it: a max pool over the
        # seeds, zero-padded by the block size minus one on every side, gives exactly the H x W map.
        covered = F.max_pool2d(F.pad(seeds, (bw - 1, bw - 1, bh - 1, bh - 1)), (bh, bw), stride=1)
        return 1.0 - covered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        mask = self.block_mask(x.shape, x.device)
        # Rescale by count / count_ones over the whole batch (Algorithm 1, step 6); the clamp guards an
        # all-dropped mask, which only happens for drop probabilities near 1 on tiny maps.
        scale = mask.numel() / mask.sum().clamp_min(1.0)
        # Cast to x's dtype: under autocast x is bf16/fp16, and a float32 mask would promote the product.
        keep = (mask * scale).to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            keep = keep.contiguous(memory_format=torch.channels_last)
        return x * keep


def dropblock_layer(block_size: int, drop_prob: float) -> DropBlock2d | None:
    """A DropBlock2d, or None at drop_prob 0: models then insert nothing, so a model without DropBlock keeps
    exactly its modules, its forward pass and its random draws."""
    return DropBlock2d(block_size, drop_prob) if drop_prob > 0 else None


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random `drop_prob` share of the samples, scaling the kept
    ones by 1 / (1 - drop_prob) so that evaluation (the identity) needs no rescaling."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = (torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) < keep).to(x.dtype)
        return x * (mask / keep)
