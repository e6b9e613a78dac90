"""Model registry: `build_model(recipe)` and a Keras-style `summary`.

Models return logits; the softmax of the reference's output layer is applied by the loss (log-softmax
inside cross-entropy, numerically the same as Keras' softmax + sparse categorical cross-entropy) and by
`inference.predict_proba`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.recipes import Recipe

# -- the reference Keras CNN ------------------------------------------------------------------------------


class ReferenceCNN(nn.Module):
    """Conv(64)-BN-Pool, Conv(128)-BN-Pool, Conv(128)-BN-Pool, Dropout, Dense 256-BN-Dropout, Dense 10.

    Keras' Conv2D(activation="relu") applies ReLU before the BatchNormalization that follows it, so the
    order here is conv -> ReLU -> BN -> pool. Keras' Flatten works on NHWC; ours flattens NCHW. With
    random init this is the same model up to a fixed permutation of the dense layer's inputs.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 128, 128),
        dense_width: int = 256,
        dropout: tuple[float, ...] = (0.4, 0.3),
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.BatchNorm2d(w, eps=bn_eps, momentum=bn_momentum),
                nn.MaxPool2d(2),
            ]
            c_in = w
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** len(widths)
        d_in, d_hidden = dropout if len(dropout) == 2 else (0.0, 0.0)
        self.head = nn.Sequential(
            nn.Dropout(d_in),
            nn.Flatten(),
            nn.Linear(c_in * side * side, dense_width),
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
                nn.init.zeros_(m.bias)

    def regularized_weights(self) -> list[torch.Tensor]:
        """The kernels Keras' kernel_regularizer=l2(...) applies to (not biases, not BN)."""
        return [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# -- the fast airbench-style network ----------------------------------------------------------------------


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
    ) -> None:
        super().__init__()
        k = whiten_kernel
        self.whiten = nn.Conv2d(3, 2 * 3 * k * k, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_whitening, never trained
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        x = torch.amax(x, dim=(2, 3))  # global max pool (the 3x3 map left after three pools)
        return self.fc(x) * self.head_scale


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set `conv`'s filters to the PCA-whitening transform of the k x k patches of `images`.

    images: float (N, 3, H, W), already normalised as the model will see them. The first half of the
    filters are eigenvectors / sqrt(eigenvalue + eps), the second half their negatives, so after GELU both
    signs of every whitened direction survive.
    """
    k = conv.kernel_size[0]
    c = images.shape[1]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
    cov = patches.T @ patches / len(patches)
    evals, evecs = torch.linalg.eigh(cov)
    filters = (evecs.T / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).reshape(c * k * k, c, k, k)
    filters = filters.flip(0)  # largest eigenvalue first
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))


# -- registry --------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[[Recipe, int], nn.Module]] = {
    "reference_cnn": lambda r, n: ReferenceCNN(
        n, r.widths, r.dense_width, r.dropout, r.bn_momentum, r.bn_eps
    ),
    "airnet": lambda r, n: AirNet(n, r.widths, r.whiten_kernel, r.bn_momentum, r.bn_eps, r.head_scale),
}


def build_model(recipe: Recipe, num_classes: int = 10) -> nn.Module:
    return MODELS[recipe.model](recipe, num_classes)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Keras' counts: trainable params; non-trainable = frozen params + BN moving mean/variance."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return {"total": trainable + frozen + stats, "trainable": trainable, "non_trainable": frozen + stats}


_KERAS_NAMES = {
    nn.Conv2d: "Conv2D",
    nn.Linear: "Dense",
    nn.BatchNorm1d: "BatchNormalization",
    nn.BatchNorm2d: "BatchNormalization",
    nn.MaxPool2d: "MaxPooling2D",
    nn.Dropout: "Dropout",
    nn.Flatten: "Flatten",
}


def summary(model: nn.Module, input_shape: tuple[int, int, int] = (3, 32, 32)) -> str:
    """A Keras-style table: layer (type), output shape (NHWC, as Keras prints it), parameter count.

    Activations fused into the previous layer in Keras (Conv2D/Dense activation=...) are not listed.
    """
    rows: list[tuple[str, str, int]] = []
    seen: dict[str, int] = {}
    hooks = []

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        kind = next((v for k, v in _KERAS_NAMES.items() if isinstance(mod, k)), type(mod).__name__)
        base = "".join("_" + ch.lower() if ch.isupper() else ch for ch in kind).lstrip("_")
        base = base.replace("conv2_d", "conv2d").replace("max_pooling2_d", "max_pooling2d")
        i = seen.get(base, 0)
        seen[base] = i + 1
        name = base if i == 0 else f"{base}_{i}"
        shape = list(out.shape[1:])
        if len(shape) == 3:  # NCHW -> NHWC, Keras' layout
            shape = shape[1:] + shape[:1]
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        n += sum(
            b.numel() for k, b in mod.named_buffers(recurse=False) if k in ("running_mean", "running_var")
        )
        rows.append((f"{name} ({kind})", "(None, " + ", ".join(map(str, shape)) + ")", n))

    for m in model.modules():
        if len(list(m.children())) == 0 and not isinstance(m, (nn.ReLU, nn.GELU)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    counts = count_parameters(model)
    w0 = max(32, max(len(r[0]) for r in rows) + 2)
    line = "━" * (w0 + 40)
    out = [
        f'Model: "{type(model).__name__}"',
        line,
        f"{'Layer (type)':<{w0}}{'Output Shape':<26}{'Param #':>14}",
        line,
    ]
    for name, shape, n in rows:
        out.append(f"{name:<{w0}}{shape:<26}{n:>14,}")
    out += [
        line,
        f" Total params: {counts['total']:,}",
        f" Trainable params: {counts['trainable']:,}",
        f" Non-trainable params: {counts['non_trainable']:,}",
    ]
    return "\n".join(out)
