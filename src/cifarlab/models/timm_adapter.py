"""Any timm model by name (`--set model=timm --set timm_name=resnet18`), where timm can be imported.

timm is optional and imported only when this model is built: it imports torchvision, which does not load beside
the CPU build of torch on our CPU machines, so there the model fails with one clear ConfigError instead of a
traceback. Weights start random: nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models.dropblock import refuse_unused
from cifarlab.registry import MODELS

__all__ = ["TimmModel", "import_timm"]


def import_timm() -> Any:
    """The timm module, or a ConfigError that says why it is not available."""
    try:
        import timm
    except Exception as e:  # torchvision can fail with RuntimeError/OSError, not only ImportError
        raise ConfigError(
            f"model=timm needs the timm package, which cannot be imported here ({type(e).__name__}: {e}); "
            "install it (pip install timm) where torchvision loads, or choose a built-in model"
        ) from None
    return timm


class TimmModel(nn.Module):
    """A timm network (`self.net`) with cifarlab's optional model methods."""

    def __init__(self, name: str, num_classes: int, in_channels: int) -> None:
        super().__init__()
        timm = import_timm()
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except RuntimeError as e:  # timm's "Unknown model (...)"
            raise ConfigError(f"timm_name={name!r}: {e}") from None
        self.name = name

    def regularized_weights(self) -> list[torch.Tensor]:
        """Conv and linear kernels: every weight of more than one dimension (not biases, not norms)."""
        return [p for n, p in self.net.named_parameters() if n.endswith("weight") and p.dim() > 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _check(r: Any) -> None:
    if not r.timm_name:
        raise ConfigError("model=timm needs timm_name, the timm model to build, e.g. timm_name=resnet18")
    refuse_unused(r, "timm", ("dropout", "dropblock_prob", "stochastic_depth"))


@MODELS.register("timm", check=_check, uses=())  # timm_name sizes it
def timm_model(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> TimmModel:
    """A timm model named by timm_name (needs the optional timm package; random init)."""
    if not recipe.timm_name:
        raise ConfigError("model=timm needs timm_name, e.g. --set timm_name=resnet18 (timm_name='resnet18' in Python)")
    return TimmModel(recipe.timm_name, num_classes, input_shape[0])
