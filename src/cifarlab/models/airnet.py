"""The airbench-style network of the `fast` and `air94` recipes, and its patch-whitening first layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.models.dropblock import refuse_unused
from cifarlab.registry import MODELS


class FrozenScaleBN(nn.BatchNorm2d):
    """BatchNorm with a fixed scale of 1 and a learned shift: fewer parameters to tune, faster to train."""

    def __init__(self, num_features: int, momentum: float, eps: float) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class IdentityInitConv(nn.Conv2d):
    """3x3 conv, no bias, whose first in_channels filters start as the identity (an implicit residual)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, padding=1, bias=False)
        with torch.no_grad():
            n = min(c_in, c_out)
            nn.init.dirac_(self.weight[:n])


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.conv1 = IdentityInitConv(c_in, c_out)
        self.norm1 = FrozenScaleBN(c_out, bn_momentum, bn_eps)
        self.conv2 = IdentityInitConv(c_out, c_out)
        self.norm2 = FrozenScaleBN(c_out, bn_momentum, bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool right after the first conv: the BN and GELU then run on a quarter of the pixels.
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """Whitening conv -> 3 conv groups -> global max pool -> linear head (scaled)."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 256, 256),
        whiten_kernel: int = 2,
        bn_momentum: float = 0.4,
        bn_eps: float = 1e-12,
        head_scale: float = 1 / 9,
        in_channels: int = 3,
        whiten_width: int = 0,
    ) -> None:
        super().__init__()
        k = whiten_kernel
        # Full-rank whitening has 2*C*k*k filters, so its width follows the channel count; `whiten_width` keeps
        # another (a CIFAR source's 24 for grey images: --init then adapts the filters instead of dropping them).
        width = whiten_width or 2 * in_channels * k * k
        self.whiten = nn.Conv2d(in_channels, width, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_whitening, never trained
        if self.whiten.bias is not None:
            nn.init.zeros_(self.whiten.bias)
        groups, c_in = [], self.whiten.out_channels
        for w in widths:
            groups.append(ConvGroup(c_in, w, bn_momentum, bn_eps))
            c_in = w
        self.groups = nn.Sequential(*groups)
        self.fc = nn.Linear(c_in, num_classes, bias=False)
        self.head_scale = head_scale

    def regularized_weights(self) -> list[torch.Tensor]:
        return []

    def init_from_data(self, images: torch.Tensor) -> None:
        """Patch-whitening init of the first conv from (a sample of) the training images."""
        init_whitening(self.whiten, images)

    def saliency_layer(self) -> nn.Module:
        """The last convolution, the layer Grad-CAM explains (`cifarlab.explain`)."""
        last = self.groups[-1]
        assert isinstance(last, ConvGroup)
        return last.conv2

    def stages(self) -> list[nn.Module]:
        """The conv groups, input first, the whitening conv with the first: what `freeze_stages` freezes."""
        groups = list(self.groups)
        return [nn.ModuleList([self.whiten, groups[0]]), *groups[1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        # Global max pool (the 3x3 map left after three pools), taken in fp32: under bf16 autocast, torch.compile
        # (inductor, CPU) fuses the GELU into this reduction at fp32 but masks the backward's ties against the
        # bf16-rounded GELU, so no element matched the max and 0/0 made every gradient NaN. In eager mode the
        # upcast changes nothing (the max of upcast values is the upcast max; the same ties get the gradient).
        x = torch.amax(x.float(), dim=(2, 3))
        return self.fc(x) * self.head_scale


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set `conv`'s filters to the PCA-whitening transform of the k x k patches of `images`.

    images: float (N, C, H, W), already normalised as the model will see them. The first half of the
    filters are eigenvectors / sqrt(eigenvalue + eps), the second half their negatives, so after GELU both
    signs of every whitened direction survive. A conv with fewer than 2*C*k*k filters keeps the directions
    of largest variance; one with more repeats them (there is nothing left to whiten).
    """
    k = conv.kernel_size[0]
    c = images.shape[1]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
    cov = patches.T @ patches / len(patches)
    # The 12 x 12 (for RGB) eigendecomposition on the CPU: on a GPU the first call initializes a solver library,
    # a one-time cost far above the microseconds this takes on the CPU.
    evals, evecs = torch.linalg.eigh(cov.cpu())
    filters = (evecs.T / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).reshape(c * k * k, c, k, k)
    # Directions without variance (a colour channel constant in every image, say) give the same output for every
    # image: a constant channel that the BatchNorm after the next conv (eps 1e-12) turns into rounding noise / ~0,
    # NaN weights within an epoch. They are dropped; the others fill the width (repeated below).
    useful = evals > 1e-6 * evals.max().clamp_min(1e-30)
    filters = filters[useful] if useful.any() else filters
    filters = filters.flip(0)  # largest eigenvalue first
    width = conv.out_channels
    half = min(len(filters), -(-width // 2))  # (fewer than 12 when directions were dropped)
    out = torch.cat([filters[:half], -filters[:half]])
    # A wider conv repeats the filters: a zero filter would give a constant channel, which the BatchNorm after
    # the next conv (eps 1e-12) turns into a division of rounding noise by ~0.
    out = out.repeat(-(-width // len(out)), 1, 1, 1)[:width]
    conv.weight.copy_(out.to(conv.weight.device, conv.weight.dtype))


def _check(r: Any) -> None:
    refuse_unused(r, "airnet", ("dropout", "dropblock_prob", "stochastic_depth"))


@MODELS.register("airnet", check=_check, uses=("widths", "whiten_kernel", "whiten_width", "head_scale"))
def airnet(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> AirNet:
    """airbench-style net: frozen patch-whitening conv, conv-pool-BN-GELU groups, global max pool, scaled head."""
    return AirNet(
        num_classes,
        recipe.widths,
        recipe.whiten_kernel,
        recipe.bn_momentum,
        recipe.bn_eps,
        recipe.head_scale,
        in_channels=input_shape[0],
        whiten_width=getattr(recipe, "whiten_width", 0),
    )
