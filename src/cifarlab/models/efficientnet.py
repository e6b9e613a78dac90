"""EfficientNet-B0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs") adapted to 32x32 images;
4.0M parameters for RGB and 10 classes (5.3M with the paper's 1000-class head).

The paper's B0 (table 1): a stride-2 3x3 stem with 32 channels, seven stages of MBConv blocks (inverted
residual: 1x1 expansion, depthwise kxk, squeeze-and-excitation at 1/4 of the block's input channels, 1x1
linear projection; SiLU throughout), a 1x1 conv to 1280 channels, global average pool, dropout 0.2, linear.
On ImageNet it downsamples 32x (224 -> 7). A 32x32 image would end at 1x1, so here the stem and the second
stage keep stride 1: 8x overall, a 4x4 final map, and the first stages run at full resolution where small
images keep their detail. Channel counts are multiplied by `width_factor` and rounded to multiples of 8, as
the paper's scaling does. Stochastic depth (`stochastic_depth`, the paper's "drop connect" 0.2) grows linearly
over the blocks; DropBlock (when on) drops squares of the residual branch in the stages of the last two
resolutions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models.dropblock import DropPath, dropblock_layer
from cifarlab.registry import MODELS

__all__ = ["B0_STAGES", "EfficientNet", "MBConv", "round_channels"]

# (expansion, kernel, stride on 32x32 (ImageNet's in the comment), channels, repeats): table 1 of the paper.
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),  # stride 1
    (6, 3, 1, 24, 2),  # ImageNet: 2 (kept at 1 for 32x32)
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


def round_channels(channels: int, factor: float, divisor: int = 8) -> int:
    """channels * factor rounded to a multiple of `divisor`, never 10% below the product (the paper's rule)."""
    c = channels * factor
    rounded = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * c else rounded


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> BN -> SiLU (or no activation)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, groups: int, act: bool, bn: tuple[float, float]
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(c_out, momentum=bn[0], eps=bn[1])
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()


class SqueezeExcite(nn.Module):
    """Channel gates from the global average: 1x1 reduce, SiLU, 1x1 expand, sigmoid."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted residual block: expand (1x1), depthwise (kxk), squeeze-excite, project (1x1, linear)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        expansion: int,
        kernel: int,
        stride: int,
        *,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
        dropblock: tuple[int, float] = (3, 0.0),
        bn: tuple[float, float] = (0.01, 1e-3),
    ) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.expand = ConvNormAct(c_in, hidden, 1, 1, 1, True, bn) if expansion != 1 else None
        self.depthwise = ConvNormAct(hidden, hidden, kernel, stride, hidden, True, bn)
        self.se = SqueezeExcite(hidden, max(1, int(c_in * se_ratio)))
        self.project = ConvNormAct(hidden, c_out, 1, 1, 1, False, bn)
        self.residual = stride == 1 and c_in == c_out
        self.dropblock = dropblock_layer(*dropblock)
        # Stochastic depth needs an identity path to fall back on.
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.se(self.depthwise(out)))
        if self.dropblock is not None:
            out = self.dropblock(out)
        if not self.residual:
            return out
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + x


class EfficientNet(nn.Module):
    """Stem, MBConv stages, 1x1 head conv, global average pool, dropout, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_factor: float = 1.0,
        stages: tuple[tuple[int, int, int, int, int], ...] = B0_STAGES,
        *,
        stem_stride: int = 1,
        head_width: int = 1280,
        dropout: float = 0.2,
        stochastic_depth: float = 0.0,
        dropblock: tuple[int, float] = (3, 0.0),
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        bn = (bn_momentum, bn_eps)
        c = round_channels(32, width_factor)
        self.stem = ConvNormAct(in_channels, c, 3, stem_stride, 1, True, bn)
        # DropBlock goes into the stages at the last two resolutions (after the last two stride-2 stages begin).
        down = [i for i, st in enumerate(stages) if st[2] > 1]
        first_late = down[-2] if len(down) >= 2 else 0
        total, k = sum(st[4] for st in stages), 0
        blocks: list[nn.Module] = []
        self._stage_sizes = [st[4] for st in stages]
        for i, (e, kernel, stride, width, repeats) in enumerate(stages):
            c_out = round_channels(width, width_factor)
            for r in range(repeats):
                blocks.append(
                    MBConv(
                        c,
                        c_out,
                        e,
                        kernel,
                        stride if r == 0 else 1,
                        drop_path=stochastic_depth * k / total,  # the paper's rate grows linearly with depth
                        dropblock=dropblock if i >= first_late else (dropblock[0], 0.0),
                        bn=bn,
                    )
                )
                c, k = c_out, k + 1
        self.blocks = nn.Sequential(*blocks)
        head = round_channels(head_width, width_factor)
        self.head = ConvNormAct(c, head, 1, 1, 1, True, bn)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(head, num_classes)
        self._init()

    def _init(self) -> None:
        # The paper's code: He-normal (fan_out) convs, linear uniform in +-1/sqrt(classes), BN 1 and 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def regularized_weights(self) -> list[torch.Tensor]:
        """Conv and linear kernels (what `l2` applies to; not biases, not BN)."""
        return [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def stages(self) -> list[nn.Module]:
        """The MBConv stages, input first, the stem with the first: what the recipe's `freeze_stages` freezes (the
        1x1 head conv and the classifier always train)."""
        groups, start = [], 0
        for n in self._stage_sizes:
            groups.append(nn.ModuleList(list(self.blocks)[start : start + n]))
            start += n
        groups[0].insert(0, self.stem)
        return list(groups)

    def saliency_layer(self) -> nn.Module:
        """The 1x1 head conv's block: the last feature map before pooling, the layer Grad-CAM explains."""
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x))).mean((2, 3))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


def _check(r: Any) -> None:
    if len(r.dropout) > 1:
        raise ConfigError(
            f"dropout={r.dropout!r}: efficientnet_b0 takes one rate (before its classifier) or none, e.g. dropout=0.2"
        )


@MODELS.register("efficientnet_b0", check=_check, uses=("width_factor",))
def efficientnet_b0(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> EfficientNet:
    """EfficientNet-B0 for 32x32: MBConv + squeeze-excitation + SiLU, stride-1 stem and second stage (8x overall)."""
    return EfficientNet(
        num_classes,
        input_shape[0],
        recipe.width_factor,
        dropout=recipe.dropout[0] if recipe.dropout else 0.0,
        stochastic_depth=recipe.stochastic_depth,
        dropblock=(recipe.dropblock_size, recipe.dropblock_prob),
        bn_momentum=recipe.bn_momentum,
        bn_eps=recipe.bn_eps,
    )
