"""Pre-activation ResNet-18 for CIFAR-sized images (He, Zhang, Ren, Sun 2016, "Identity Mappings in Deep
Residual Networks"), 11.2M parameters for 32x32 RGB and 10 classes.

The CIFAR variant of ResNet-18: a 3x3 stride-1 stem and no max pool (a 32x32 image keeps its resolution into
the first stage), then four stages of two basic blocks with 64, 128, 256 and 512 channels (times
`width_factor`), strides 1, 2, 2, 2, and BN-ReLU, global average pool and a linear head. Every block is
pre-activated (BN-ReLU before each conv, an untouched identity path; fig. 4e of the paper), so the residual
stream is a clean sum. `PreActBlock` is shared with the Wide-ResNet (`wrn`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models.dropblock import DropPath, dropblock_layer
from cifarlab.registry import MODELS

__all__ = ["PreActBlock", "PreActResNet", "init_resnet", "scaled", "stage_dropblock"]


def scaled(channels: int, factor: float) -> int:
    """`channels` times `factor`, at least 1 (tiny test networks use factors well below 1)."""
    return max(1, round(channels * factor))


def stage_dropblock(stage: int, n_stages: int, recipe: Any) -> tuple[int, float]:
    """(block_size, drop_prob) for one stage: DropBlock in the last two stages only, as the paper applies it to
    the later groups of a ResNet, where features are semantic and maps are small."""
    return recipe.dropblock_size, recipe.dropblock_prob if stage >= n_stages - 2 else 0.0


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the input (through a 1x1 conv when the shape changes).

    Options: `dropout` between the convs (Wide-ResNet), DropBlock after each conv and on the shortcut (where the
    DropBlock paper applies it in a ResNet), and stochastic depth on the residual branch.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int = 1,
        *,
        dropout: float = 0.0,
        dropblock: tuple[int, float] = (3, 0.0),
        drop_path: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in, eps=bn_eps, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        # The projection reads the pre-activated input, as in the paper's code for shape-changing blocks.
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None
        self.dropblock = dropblock_layer(*dropblock)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.norm1(x))
        skip = self.shortcut(a) if self.shortcut is not None else x
        out = self.conv1(a)
        if self.dropblock is not None:
            out = self.dropblock(out)
        out = F.relu(self.norm2(out))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        if self.dropblock is not None:
            out, skip = self.dropblock(out), self.dropblock(skip)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + skip


def init_resnet(model: nn.Module) -> None:
    """He-normal convs (fan_out, as in the ResNet papers' code), BN scale 1 and shift 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _Head(nn.Module):
    """BN-ReLU (the last block's output is not yet activated), global average pool, dropout, linear."""

    def __init__(self, c_in: int, num_classes: int, dropout: float, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in, eps=bn_eps, momentum=bn_momentum)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(x)).mean((2, 3))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


class PreActResNet(nn.Module):
    """Stem conv, stages of pre-activation basic blocks, BN-ReLU, global average pool, linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        in_channels: int = 3,
        stem_width: int | None = None,
        *,
        dropout: float = 0.0,
        head_dropout: float = 0.0,
        dropblock: tuple[tuple[int, float], ...] | None = None,
        stochastic_depth: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        stem_width = stem_width or widths[0]
        # No BN-ReLU after the stem: the first block pre-activates its input.
        self.stem = nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
        dropblock = dropblock or tuple((3, 0.0) for _ in blocks)
        total, k = sum(blocks), 0
        groups: list[nn.Module] = []
        c_in = stem_width
        for s, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for i in range(n):
                k += 1
                layers.append(
                    PreActBlock(
                        c_in,
                        w,
                        stride=2 if s > 0 and i == 0 else 1,
                        dropout=dropout,
                        dropblock=dropblock[s],
                        # Stochastic depth's linear rule: deeper blocks are dropped more, the last at the full rate.
                        drop_path=stochastic_depth * k / total,
                        bn_momentum=bn_momentum,
                        bn_eps=bn_eps,
                    )
                )
                c_in = w
            groups.append(nn.Sequential(*layers))
        # `body`, not `stages`: stages() is the method fine-tuning's freeze_stages calls.
        self.body = nn.Sequential(*groups)
        self.head = _Head(c_in, num_classes, head_dropout, bn_momentum, bn_eps)
        init_resnet(self)

    def regularized_weights(self) -> list[torch.Tensor]:
        """Conv and linear kernels (what `l2` applies to; not biases, not BN)."""
        return [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def saliency_layer(self) -> nn.Module:
        """The last block (its output is the last feature map), the layer Grad-CAM explains."""
        last = self.body[-1]
        assert isinstance(last, nn.Sequential)
        return last[-1]

    def stages(self) -> list[nn.Module]:
        """The stages of blocks, input first, the stem with the first: what the recipe's `freeze_stages` freezes
        (the head, with its final BN, always trains)."""
        return [nn.ModuleList([self.stem, self.body[0]]), *list(self.body)[1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _one_dropout(recipe: Any) -> float:
    return recipe.dropout[0] if recipe.dropout else 0.0


def _check(r: Any) -> None:
    if len(r.dropout) > 1:
        raise ConfigError(
            f"dropout={r.dropout!r}: preact_resnet18 takes one rate (before its classifier) or none, e.g. dropout=0.2"
        )


@MODELS.register("preact_resnet18", check=_check, uses=("width_factor",))
def preact_resnet18(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> PreActResNet:
    """Pre-activation ResNet-18 for 32x32: 3x3 stem, no max pool, 4 stages x 2 basic blocks (64-512 x width_factor)."""
    widths = tuple(scaled(w, recipe.width_factor) for w in (64, 128, 256, 512))
    return PreActResNet(
        num_classes,
        (2, 2, 2, 2),
        widths,
        input_shape[0],
        head_dropout=_one_dropout(recipe),
        dropblock=tuple(stage_dropblock(s, 4, recipe) for s in range(4)),
        stochastic_depth=recipe.stochastic_depth,
        bn_momentum=recipe.bn_momentum,
        bn_eps=recipe.bn_eps,
    )
